"""A PyTorch eager peer of the ddnn_jax EKD train step, for side-by-side timing.

The same CIFAR ResNet family (3x3 stem, BasicBlocks, 1x1 projection shortcuts,
BatchNorm momentum 0.1 in torch's convention = 0.9 in flax's, eps 1e-5), the
same depths run in one step with the shared prefix computed once (as
`DDNNResNet.forward_depths` does), the same objective (CE of every depth, plus
for every sub-net alpha * T^2 * KL(full || sub) and beta * the z-score
attention distance on every stage, teacher detached) and the same optimiser
(SGD momentum 0.9, weight decay 5e-4 on conv and dense kernels only, added to
the gradient). fp32, channels-last, `torch.set_num_threads(threads)`.

`load_jax_variables` copies a ddnn_jax variable tree into the peer so that
bench/run_all.py can check that both compute the same loss before timing.
PyTorch is a bench-only dependency: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (16, 32, 64)


def _width(channels: int, multiplier: float) -> int:
  return max(1, int(round(channels * multiplier)))


class BasicBlock(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
    self.proj_conv = self.proj_bn = None
    if stride != 1 or in_ch != out_ch:
      self.proj_conv = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)
      self.proj_bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
    return F.relu(y + shortcut)


class CifarDDNN(nn.Module):
  """cifar_resnet{6n+2} holding every depth (k_1, k_2, k_3) with k_s <= n."""

  def __init__(self, blocks_per_stage: int = 3, width: float = 1.0,
               num_classes: int = 10):
    super().__init__()
    widths = [_width(w, width) for w in WIDTHS]
    self.stem_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(widths[0], eps=1e-5, momentum=0.1)
    self.blocks = nn.ModuleDict()
    in_ch = widths[0]
    for s, out_ch in enumerate(widths):
      for b in range(blocks_per_stage):
        self.blocks[f'stage{s + 1}_block{b}'] = BasicBlock(
            in_ch, out_ch, 2 if (b == 0 and s > 0) else 1)
        in_ch = out_ch
    self.head = nn.Linear(widths[-1], num_classes)

  def forward_depths(self, images, depths):
    """[(logits, [stage features])] per depth; a shared prefix runs once."""
    cache = {(): F.relu(self.stem_bn(self.stem_conv(images)))}
    outputs = []
    for depth in depths:
      path, x, features = (), cache[()], []
      for s, num_blocks in enumerate(depth):
        for b in range(num_blocks):
          path += ((s, b),)
          if path not in cache:
            cache[path] = self.blocks[f'stage{s + 1}_block{b}'](x)
          x = cache[path]
        features.append(x)
      outputs.append((self.head(x.mean(dim=(2, 3))), features))
    return outputs


def attention_map(features):
  """Channel sum standardised over each sample's positions (ddnn_jax's zscore_sum)."""
  a = features.float().sum(dim=1).flatten(1)
  mean = a.mean(dim=1, keepdim=True)
  var = a.var(dim=1, unbiased=False, keepdim=True)
  return (a - mean) * torch.rsqrt(var + 1e-5)


def ekd_loss(outputs, labels, alpha=1.0, beta=1.0, temperature=3.0):
  """The EKD objective over forward_depths' outputs; the last one is the teacher."""
  teacher_logits, teacher_features = outputs[-1]
  teacher_logits = teacher_logits.detach()
  teacher_maps = [attention_map(f.detach()) for f in teacher_features]
  t = temperature
  total = F.cross_entropy(outputs[-1][0], labels)
  for logits, features in outputs[:-1]:
    total = total + F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits / t, dim=-1),
                  F.log_softmax(teacher_logits / t, dim=-1),
                  reduction='batchmean', log_target=True)
    total = total + alpha * t * t * kl
    for f, teacher_map in zip(features, teacher_maps):
      total = total + beta * torch.mean(torch.square(attention_map(f) - teacher_map))
  return total


class Peer:
  """Model, optimiser and a `step(images, labels)` like ddnn_jax's train step."""

  def __init__(self, blocks_per_stage=3, width=1.0, num_classes=10,
               depths=((1, 1, 1), (2, 2, 2), (3, 3, 3)), threads=2, lr=0.1,
               ekd=True):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.depths = tuple(tuple(d) for d in depths)
    self.ekd = ekd
    self.model = CifarDDNN(blocks_per_stage, width, num_classes).to(
        memory_format=torch.channels_last)
    decay = [p for p in self.model.parameters() if p.ndim > 1]
    no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
    self.optimizer = torch.optim.SGD(
        [{'params': decay, 'weight_decay': 5e-4}, {'params': no_decay, 'weight_decay': 0.0}],
        lr=lr, momentum=0.9)

  def loss(self, images, labels):
    outputs = self.model.forward_depths(images, self.depths)
    if self.ekd:
      return ekd_loss(outputs, labels)
    return sum(F.cross_entropy(logits, labels) for logits, _ in outputs)

  def step(self, images, labels) -> float:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(images, labels)
    loss.backward()
    self.optimizer.step()
    return float(loss.detach())

  @torch.no_grad()
  def eval_logits(self, images):
    self.model.eval()
    return self.model.forward_depths(images, (self.depths[-1],))[0][0]


def to_torch_images(images: np.ndarray) -> torch.Tensor:
  """(N, H, W, C) float32 NumPy -> NCHW tensor in channels-last memory."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(
      memory_format=torch.channels_last)


def load_jax_variables(model: CifarDDNN, variables) -> None:
  """Copies ddnn_jax variables (shared BN) into the peer, converting layouts."""
  params, stats = variables['params'], variables['batch_stats']

  def conv(module, kernel):  # HWIO -> OIHW
    module.weight.data.copy_(torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1)))

  def bn(module, p, s):
    module.weight.data.copy_(torch.from_numpy(np.asarray(p['scale'])))
    module.bias.data.copy_(torch.from_numpy(np.asarray(p['bias'])))
    module.running_mean.copy_(torch.from_numpy(np.asarray(s['mean'])))
    module.running_var.copy_(torch.from_numpy(np.asarray(s['var'])))

  conv(model.stem_conv, params['stem']['conv']['kernel'])
  bn(model.stem_bn, params['stem']['bn'], stats['stem']['bn'])
  for name, block in model.blocks.items():
    p, s = params[name], stats[name]
    conv(block.conv1, p['conv1']['kernel'])
    bn(block.bn1, p['bn1'], s['bn1'])
    conv(block.conv2, p['conv2']['kernel'])
    bn(block.bn2, p['bn2'], s['bn2'])
    if block.proj_conv is not None:
      conv(block.proj_conv, p['proj_conv']['kernel'])
      bn(block.proj_bn, p['proj_bn'], s['proj_bn'])
  model.head.weight.data.copy_(torch.from_numpy(np.asarray(params['head']['kernel']).T))
  model.head.bias.data.copy_(torch.from_numpy(np.asarray(params['head']['bias'])))
