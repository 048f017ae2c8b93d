"""Depth-dynamic ResNets: one weight set, many depths.

A model is built from a preset (block type, blocks per stage, stem) and is called
with a static *depth*: a tuple holding, per stage, how many leading blocks to run.
Every distinct depth traces to its own XLA program that contains only its blocks,
so a sub-net costs exactly what the standalone ResNet of that depth costs.

Variable names follow the standalone nets: ``stem`` (``conv``, ``bn``),
``stage{s}_block{b}`` (s from 1, b from 0) and ``head``. With the private
BatchNorm modes a per-depth copy of a norm layer is named ``<layer>_<tag>`` where
``tag`` is :func:`depth_tag` of the depth (``bn1_d2-2-2``);
``subnets.extract_subnet`` turns any mode's variables into the standalone layout.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax import onednn_conv

Depth = tuple[int, ...]

BN_MODES = ('shared', 'private_stats', 'private_all')
# Which depths' losses train the shared classifier head: every depth's, or the
# full net's alone (the sub-nets read the head through a stop-gradient).
HEAD_GRADS = ('all', 'full')
BN_MOMENTUM = 0.9  # running statistics: new = m * old + (1 - m) * batch


@dataclasses.dataclass(frozen=True)
class Preset:
  """Architecture of a ResNet family member at its full depth."""

  block: str  # 'basic' or 'bottleneck'
  stage_sizes: Depth  # blocks per stage at full depth
  stem: str  # 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv)
  widths: tuple[int, ...]  # base channels per stage (bottleneck output is 4x)
  stem_width: int


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)


def _cifar_resnet(n: int) -> Preset:
  return Preset('basic', (n, n, n), 'cifar', _CIFAR_WIDTHS, 16)


PRESETS: dict[str, Preset] = {
    'resnet18': Preset('basic', (2, 2, 2, 2), 'imagenet', _IMAGENET_WIDTHS, 64),
    'resnet34': Preset('basic', (3, 4, 6, 3), 'imagenet', _IMAGENET_WIDTHS, 64),
    'resnet50': Preset('bottleneck', (3, 4, 6, 3), 'imagenet', _IMAGENET_WIDTHS, 64),
    'resnet101': Preset('bottleneck', (3, 4, 23, 3), 'imagenet', _IMAGENET_WIDTHS, 64),
    'resnet152': Preset('bottleneck', (3, 8, 36, 3), 'imagenet', _IMAGENET_WIDTHS, 64),
    'cifar_resnet20': _cifar_resnet(3),
    'cifar_resnet32': _cifar_resnet(5),
    'cifar_resnet44': _cifar_resnet(7),
    'cifar_resnet56': _cifar_resnet(9),
    'cifar_resnet110': _cifar_resnet(18),
    'cifar_resnet18': Preset('basic', (2, 2, 2, 2), 'cifar', _IMAGENET_WIDTHS, 64),
    'cifar_resnet34': Preset('basic', (3, 4, 6, 3), 'cifar', _IMAGENET_WIDTHS, 64),
}


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(
        f'unknown model {name!r}; choose one of: {", ".join(PRESETS)}')
  return PRESETS[name]


def preset_for_depth(name: str, depth: Sequence[int]) -> str | None:
  """Name of the preset that is ``name`` cut to ``depth``, if one exists."""
  preset = get_preset(name)
  cut = dataclasses.replace(preset, stage_sizes=tuple(depth))
  return next((n for n, p in PRESETS.items() if p == cut), None)


def depth_tag(depth: Sequence[int]) -> str:
  """Short stable name of a depth: (3, 4, 6, 3) -> 'd3-4-6-3'."""
  return 'd' + '-'.join(str(k) for k in depth)


def validate_depth(depth: Any, stage_sizes: Sequence[int]) -> Depth:
  """Returns ``depth`` as a tuple of ints or raises ValueError saying what is wrong."""
  num_stages = len(stage_sizes)
  if isinstance(depth, (str, bytes)) or not hasattr(depth, '__iter__'):
    raise ValueError(
        f'depth {depth!r} must be a sequence of {num_stages} integers, one per stage')
  depth = tuple(depth)
  if len(depth) != num_stages:
    raise ValueError(
        f'depth {depth} has {len(depth)} entries but the model has '
        f'{num_stages} stages {tuple(stage_sizes)}; give one block count per stage')
  for stage, (blocks, limit) in enumerate(zip(depth, stage_sizes), start=1):
    if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral):
      raise ValueError(
          f'depth {depth}: stage {stage} has {blocks!r}, which is not an '
          f'integer; allowed 1..{limit}')
    if not 1 <= int(blocks) <= limit:
      raise ValueError(
          f'depth {depth}: stage {stage} has {int(blocks)} blocks; '
          f'allowed 1..{limit}')
  return tuple(int(b) for b in depth)


def parse_depth(text: str) -> Depth:
  """'3,4,6,3' -> (3, 4, 6, 3); ValueError on anything that is not integers."""
  try:
    return tuple(int(part) for part in text.replace(' ', '').split(','))
  except ValueError:
    raise ValueError(
        f'depth {text!r} is not a comma-separated list of integers such as 2,2,2,2'
    ) from None


class DepthOutput(NamedTuple):
  logits: jax.Array  # (batch, classes), float32
  features: tuple[jax.Array, ...]  # output of each stage, (batch, H_s, W_s, C_s)


class Affine(nn.Module):
  """Per-channel scale and bias: the shared half of a ``private_stats`` norm."""

  scale_init: Callable = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', self.scale_init, (x.shape[-1],), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return (x * scale + bias).astype(self.dtype)


def batch_norm(x, *, name: str, mode: str, tag: str | None, train: bool,
               dtype: Any, scale_init: Callable = nn.initializers.ones):
  """BatchNorm in one of BN_MODES; ``tag`` names the depth for private modes.

  Must be called inside a compact method: the layers it creates belong to it.
  """
  kwargs = dict(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                dtype=dtype)
  if mode == 'shared':
    return nn.BatchNorm(name=name, scale_init=scale_init, **kwargs)(x)
  if mode == 'private_all':
    return nn.BatchNorm(name=f'{name}_{tag}', scale_init=scale_init, **kwargs)(x)
  normalised = nn.BatchNorm(name=f'{name}_{tag}', use_scale=False, use_bias=False,
                            **kwargs)(x)
  return Affine(scale_init=scale_init, dtype=dtype, name=name)(normalised)


_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class ResidualBlock(nn.Module):
  """BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1)."""

  kind: str
  width: int
  strides: int
  bn_mode: str
  dtype: Any
  zero_init_residual: bool
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, *, train: bool, tag: str | None):
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init,
        conv_general_dilated=onednn_conv.conv_general_dilated(self.conv_impl))
    norm = functools.partial(batch_norm, mode=self.bn_mode, tag=tag, train=train,
                             dtype=self.dtype)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    s, pad = (self.strides, self.strides), ((1, 1), (1, 1))
    if self.kind == 'basic':
      out_width = self.width
      y = conv(self.width, (3, 3), s, pad, name='conv1')(x)
      y = nn.relu(norm(y, name='bn1'))
      y = conv(self.width, (3, 3), (1, 1), pad, name='conv2')(y)
      y = norm(y, name='bn2', scale_init=last_scale)
    else:
      out_width = 4 * self.width
      y = conv(self.width, (1, 1), name='conv1')(x)
      y = nn.relu(norm(y, name='bn1'))
      y = conv(self.width, (3, 3), s, pad, name='conv2')(y)
      y = nn.relu(norm(y, name='bn2'))
      y = conv(out_width, (1, 1), name='conv3')(y)
      y = norm(y, name='bn3', scale_init=last_scale)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_width:
      shortcut = conv(out_width, (1, 1), s, 'VALID', name='proj_conv')(x)
      shortcut = norm(shortcut, name='proj_bn')
    return nn.relu(y + shortcut)


class Stem(nn.Module):
  """ImageNet stem (7x7/2 conv, 3x3/2 max-pool) or CIFAR stem (3x3/1 conv)."""

  kind: str
  width: int
  bn_mode: str
  dtype: Any
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, images, *, train: bool, tag: str | None):
    x = images.astype(self.dtype)
    conv = functools.partial(
        nn.Conv, self.width, use_bias=False, dtype=self.dtype, kernel_init=_conv_init,
        conv_general_dilated=onednn_conv.conv_general_dilated(self.conv_impl),
        name='conv')
    if self.kind == 'imagenet':
      x = conv((7, 7), (2, 2), ((3, 3), (3, 3)))(x)
    else:
      x = conv((3, 3), (1, 1), ((1, 1), (1, 1)))(x)
    x = nn.relu(batch_norm(x, name='bn', mode=self.bn_mode, tag=tag, train=train,
                           dtype=self.dtype))
    if self.kind == 'imagenet':
      x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    return x


class DDNNResNet(nn.Module):
  """A ResNet whose sub-nets of any smaller depth share its weights.

  ``model.apply(variables, images, depth=(2, 2, 2, 2))`` runs one depth and returns
  logits; ``forward_depths`` runs several depths in one program (the full net
  once) and returns each depth's logits and stage features.
  """

  block: str
  stage_sizes: Depth
  stem: str
  widths: tuple[int, ...]
  stem_width: int
  num_classes: int
  width_multiplier: float = 1.0
  bn_mode: str = 'shared'
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  # Convolution kernels: 'xla', 'onednn' or 'auto' (oneDNN on a one-device CPU
  # process, XLA elsewhere); see ddnn_jax.onednn_conv.
  conv_impl: str = 'xla'
  head_grad: str = 'all'  # one of HEAD_GRADS

  @property
  def full_depth(self) -> Depth:
    return tuple(self.stage_sizes)

  def _width(self, channels: int) -> int:
    return max(1, int(round(channels * self.width_multiplier)))

  def check_depth(self, depth: Any) -> Depth:
    return validate_depth(self.full_depth if depth is None else depth, self.stage_sizes)

  def __call__(self, images, depth: Depth | None = None, train: bool = False):
    """Logits of one depth (the full net when ``depth`` is None)."""
    return self.forward_depths(images, (self.check_depth(depth),), train)[0].logits

  def forward_depths(self, images, depths: Sequence[Depth],
                     train: bool = False) -> tuple[DepthOutput, ...]:
    """One output per entry of ``depths``; shared computation runs once."""
    depths = tuple(self.check_depth(d) for d in depths)
    return self._forward(images, depths, train)

  @nn.compact
  def _forward(self, images, depths: tuple[Depth, ...], train: bool):
    if self.bn_mode not in BN_MODES:
      raise ValueError(f'unknown bn_mode {self.bn_mode!r}; choose one of {BN_MODES}')
    blocks = {}
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        blocks[s, b] = ResidualBlock(
            self.block, self._width(self.widths[s]),
            2 if (b == 0 and s > 0) else 1, self.bn_mode, self.dtype,
            self.zero_init_residual, self.conv_impl, name=f'stage{s + 1}_block{b}')
    stem = Stem(self.stem, self._width(self.stem_width), self.bn_mode, self.dtype,
                self.conv_impl, name='stem')
    head = nn.Dense(self.num_classes, dtype=self.dtype, name='head')

    # Activations keyed by (blocks run so far, norm tag): a block that every
    # requested depth reaches along the same path runs once.
    cache = {}
    outputs = {}
    for depth in depths:
      if depth in outputs:
        continue
      tag = None if self.bn_mode == 'shared' else depth_tag(depth)
      path = ()
      if (path, tag) not in cache:
        cache[path, tag] = stem(images, train=train, tag=tag)
      x, features = cache[path, tag], []
      for s, num_blocks in enumerate(depth):
        for b in range(num_blocks):
          path += ((s, b),)
          if (path, tag) not in cache:
            cache[path, tag] = blocks[s, b](x, train=train, tag=tag)
          x = cache[path, tag]
        features.append(x)
      pooled = jnp.mean(x, axis=(1, 2))
      if (self.head_grad == 'full' and depth != self.full_depth
          and not self.is_initializing()):
        # Same logits; the sub-net's loss reaches its blocks, not the head.
        frozen = jax.lax.stop_gradient(head.variables['params'])
        logits = head.clone(parent=None).apply({'params': frozen}, pooled)
      else:
        logits = head(pooled)
      outputs[depth] = DepthOutput(logits.astype(jnp.float32), tuple(features))
    return tuple(outputs[d] for d in depths)


def create_model(name: str, num_classes: int, *, width_multiplier: float = 1.0,
                 bn_mode: str = 'shared', dtype: Any = jnp.float32,
                 zero_init_residual: bool = False, conv_impl: str = 'xla',
                 stage_sizes: Sequence[int] | None = None,
                 head_grad: str = 'all') -> DDNNResNet:
  """The preset ``name``; ``stage_sizes`` builds the standalone net of a cut depth."""
  preset = get_preset(name)
  if bn_mode not in BN_MODES:
    raise ValueError(f'unknown bn_mode {bn_mode!r}; choose one of {BN_MODES}')
  if head_grad not in HEAD_GRADS:
    raise ValueError(f'unknown head_grad {head_grad!r}; choose one of {HEAD_GRADS}')
  if not width_multiplier > 0:
    raise ValueError(f'width_multiplier must be > 0, got {width_multiplier}')
  if not (isinstance(num_classes, int) and num_classes >= 1):
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  if stage_sizes is not None:
    stage_sizes = validate_depth(stage_sizes, preset.stage_sizes)
  onednn_conv.conv_general_dilated(conv_impl)  # validates the name
  return DDNNResNet(
      block=preset.block, stage_sizes=tuple(stage_sizes or preset.stage_sizes),
      stem=preset.stem, widths=preset.widths, stem_width=preset.stem_width,
      num_classes=num_classes, width_multiplier=width_multiplier,
      bn_mode=bn_mode, dtype=jnp.dtype(dtype), zero_init_residual=zero_init_residual,
      conv_impl=conv_impl, head_grad=head_grad)


def init_variables(model: DDNNResNet, rng: jax.Array, images: jax.Array,
                   depths: Sequence[Depth] | None = None) -> dict:
  """Variables for every depth in ``depths`` (private BN modes make per-depth norms)."""
  depths = tuple(depths) if depths else (model.full_depth,)
  if model.full_depth not in map(tuple, depths):
    depths = depths + (model.full_depth,)
  return dict(model.init(rng, images, depths, False, method=model.forward_depths))


def member_name(model: nn.Module, member: Any) -> str:
  """A member's name in metrics and reports: `model.member_name(member)` for a
  model whose members are not depths (branches, peers), else the depth tag."""
  name = getattr(model, 'member_name', None)
  return name(member) if callable(name) else depth_tag(member)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
