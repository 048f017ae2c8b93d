"""MCOD, multistructure collaborative online distillation (METHODS.md section 4).

M peers of different architectures (CIFAR ResNets of several depths, a small
VGG-style net) train together on the same batches. The mean of their logits,
under a stop-gradient, teaches every peer:

  L = sum_i CE(z_i, y) + lambda(t) on(t) sum_i T^2 KL(softmax(z_e / T) || softmax(z_i / T)),
  z_e = stop_gradient(mean_i z_i)

`on(t)` switches the distillation on and off in periods of `mcod.period_epochs`,
on for the fraction `mcod.duty_cycle` of each (after the off part, or before
it with `mcod.on_first`); lambda(t) grows from `mcod.weight_start` to
`mcod.weight_end` over `mcod.growth_epochs`, linearly or in
`mcod.growth_levels` equal steps. The members are (i,) for peer i + 1
('peer1_cifar_resnet20', ...) and (M,) for the mean-logit ensemble
('ensemble', the reference evaluation compares the peers with); each peer's
variables are those of its standalone net.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax import losses, models, onednn_conv
from ddnn_jax.methods import base

# VGG-style nets: 3x3 conv layers per stage, base widths; 2x2 max-pool between stages.
VGG_PRESETS = {
    'vgg8': ((2, 2, 3), (32, 64, 128)),
    'vgg11': ((1, 1, 2, 2, 2), (64, 128, 256, 512, 512)),
}
GROWTHS = ('linear', 'step')


def architectures() -> tuple[str, ...]:
  """Every name a peer can have: the ResNet presets and the VGG-style nets."""
  return (*models.PRESETS, *VGG_PRESETS)


class VGG(nn.Module):
  """Conv3x3-BN-ReLU layers, max-pool between stages, global pool, one dense."""
  convs: tuple[int, ...]  # conv layers per stage
  widths: tuple[int, ...]  # base channels per stage
  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'

  @property
  def full_depth(self) -> tuple[int, ...]:
    return tuple(self.convs)

  def check_depth(self, depth: Any) -> tuple[int, ...]:
    if depth is not None and tuple(depth) != self.full_depth:
      raise ValueError(f'a VGG net runs its full depth {self.full_depth} only, got {depth}')
    return self.full_depth

  def __call__(self, images, depth: Any = None, train: bool = False) -> jax.Array:
    return self.forward_depths(images, (self.check_depth(depth),), train)[0].logits

  @nn.compact
  def forward_depths(self, images, depths: Sequence[Any], train: bool = False):
    for depth in depths:
      self.check_depth(depth)
    conv = functools.partial(
        nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False,
        dtype=self.dtype, kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
        conv_general_dilated=onednn_conv.conv_general_dilated(self.conv_impl))
    x, features = images.astype(self.dtype), []
    for s, (num_convs, width) in enumerate(zip(self.convs, self.widths, strict=True)):
      if s:
        x = nn.max_pool(x, (2, 2), (2, 2), 'SAME')
      for c in range(num_convs):
        x = conv(max(1, int(round(width * self.width_multiplier))), name=f'stage{s + 1}_conv{c}')(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=models.BN_MOMENTUM,
                                 epsilon=1e-5, dtype=self.dtype, name=f'stage{s + 1}_bn{c}')(x))
      features.append(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(jnp.mean(x, (1, 2)))
    output = models.DepthOutput(logits.astype(jnp.float32), tuple(features))
    return tuple(output for _ in depths)


class Peers(nn.Module):
  """Nets of the architectures `archs` side by side (variables 'peer1', ...);
  member (i,) is peer i + 1, (M,) the mean of the peers' logits."""
  archs: tuple[str, ...]
  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  conv_impl: str = 'xla'

  @property
  def full_depth(self) -> tuple[int]:
    return (len(self.archs),)

  def check_depth(self, member: Any) -> tuple[int]:
    if member is None:
      return self.full_depth
    n = len(self.archs)
    if not (isinstance(member, Sequence) and len(member) == 1
            and isinstance(member[0], int) and 0 <= member[0] <= n):
      raise ValueError(f'member {member!r} of MCOD is (i,): peer i + 1 for i < {n}, '
                       f'the ensemble for i = {n}')
    return (int(member[0]),)

  def member_name(self, member: Any) -> str:
    (i,) = self.check_depth(member)
    return 'ensemble' if i == len(self.archs) else f'peer{i + 1}_{self.archs[i]}'

  def member_variables(self, variables: Mapping[str, Any], member: Any) -> dict:
    """A peer's variables as its standalone net holds them; all for the ensemble."""
    (i,) = self.check_depth(member)
    if i == len(self.archs):
      return {name: dict(collection) for name, collection in variables.items()}
    return {name: dict(collection.get(f'peer{i + 1}', {}))
            for name, collection in variables.items()}

  def __call__(self, images, depth: Any = None, train: bool = False) -> jax.Array:
    return self.forward_depths(images, (self.check_depth(depth),), train)[0].logits

  def _net(self, i: int) -> nn.Module:
    arch, name = self.archs[i], f'peer{i + 1}'
    if arch in VGG_PRESETS:
      convs, widths = VGG_PRESETS[arch]
      return VGG(convs, widths, self.num_classes, self.width_multiplier, self.dtype,
                 self.conv_impl, name=name)
    p = models.get_preset(arch)
    return models.DDNNResNet(
        block=p.block, stage_sizes=p.stage_sizes, stem=p.stem, widths=p.widths,
        stem_width=p.stem_width, num_classes=self.num_classes,
        width_multiplier=self.width_multiplier, dtype=self.dtype,
        zero_init_residual=self.zero_init_residual, conv_impl=self.conv_impl, name=name)

  @nn.compact
  def forward_depths(self, images, depths: Sequence[Any], train: bool = False):
    members = tuple(self.check_depth(d) for d in depths)
    n = len(self.archs)
    needed = range(n) if (n,) in members else sorted({i for (i,) in members})
    outputs = {}
    for i in needed:
      net = self._net(i)
      outputs[i] = net.forward_depths(images, (net.full_depth,), train)[0]
    if (n,) in members:
      mean = jnp.mean(jnp.stack([outputs[i].logits for i in range(n)]), axis=0)
      outputs[n] = models.DepthOutput(mean, ())
    return tuple(outputs[i] for (i,) in members)


def distill_on(step, period: int, on_steps: int, on_first: bool) -> jax.Array:
  """on(t): 1.0 in the `on_steps` steps of each `period` with distillation on
  (the first ones with `on_first`, else the last ones), 0.0 in the others."""
  if on_steps >= period:
    return jnp.ones((), jnp.float32)
  if on_steps <= 0:
    return jnp.zeros((), jnp.float32)
  position = jnp.asarray(step, jnp.int32) % period
  on = position < on_steps if on_first else position >= period - on_steps
  return on.astype(jnp.float32)


def growing_weight(step, start: float, end: float, growth_steps: int, growth: str,
                   levels: int) -> jax.Array:
  """lambda(t): `start` at step 0, `end` from `growth_steps` on; 'linear' in
  between, or 'step': the growth split into `levels` equal parts, part k at
  start + (end - start) k / (levels - 1)."""
  if growth_steps <= 0 or (growth == 'step' and levels <= 1):
    return jnp.full((), end, jnp.float32)
  step = jnp.minimum(jnp.asarray(step, jnp.int32), growth_steps)
  if growth == 'step':
    fraction = jnp.minimum(step * levels // growth_steps, levels - 1) / (levels - 1)
  else:
    fraction = step / growth_steps
  return (start + (end - start) * fraction).astype(jnp.float32)


def objective(names: Sequence[str], temperature: float, on_fn, weight_fn) -> base.Objective:
  """MCOD's loss over the outputs of members ((0,), ..., (M,)): each peer's CE
  plus lambda(t) on(t) T^2 KL from the detached mean logits. Terms:
  '<peer>/ce', '<peer>/kl', 'ensemble/ce', 'kd_on', 'kd_weight'."""

  def loss_fn(outputs, labels, step, *, teacher_outputs=None):
    del teacher_outputs  # the teacher is the peers' ensemble of this step
    if on_fn is None:
      raise ValueError('mcod.period_epochs needs steps_per_epoch in create_method')
    *peers, ensemble = outputs
    if len(peers) != len(names):
      raise ValueError(f'got {len(peers)} peer outputs for the {len(names)} peers {names}')
    teacher = jax.lax.stop_gradient(ensemble.logits)
    on, weight = on_fn(step), weight_fn(step)
    terms = {'kd_on': on, 'kd_weight': weight,
             'ensemble/ce': losses.cross_entropy(teacher, labels)}
    loss = jnp.zeros((), jnp.float32)
    for name, output in zip(names, peers):
      ce = losses.cross_entropy(output.logits, labels)
      kl = losses.kl_divergence(teacher, output.logits, temperature)
      terms.update({f'{name}/ce': ce, f'{name}/kl': kl})
      loss = loss + ce + on * weight * kl
    return loss, terms

  return loss_fn


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.mcod's fields, each checked (one-line ValueErrors naming the fix)."""
  number = base.is_number
  names = architectures()
  checks = {
      'peers': (lambda v: isinstance(v, Sequence) and not isinstance(v, str)
                and len(v) >= 2 and all(a in names for a in v),
                f'a tuple of at least two of {", ".join(names)}',
                "\"('cifar_resnet20','vgg8')\""),
      'temperature': (number(lambda v: v > 0), 'a number > 0', '3.0'),
      'period_epochs': (number(lambda v: v > 0), 'a number > 0', '10.0'),
      'duty_cycle': (number(lambda v: 0 <= v <= 1), 'a number in [0, 1]', '0.5'),
      'on_first': (lambda v: isinstance(v, bool), 'True or False', 'False'),
      'growth': (lambda v: v in GROWTHS, f'one of {", ".join(GROWTHS)}', 'linear'),
      'weight_start': (number(lambda v: v >= 0), 'a number >= 0', '0.0'),
      'weight_end': (number(lambda v: v >= 0), 'a number >= 0', '1.0'),
      'growth_epochs': (number(lambda v: v >= 0), 'a number >= 0', '30.0'),
      'growth_levels': (base.is_whole(1), 'a whole number >= 1', '4'),
  }
  return {field: base.setting(config, f'mcod.{field}', *check)
          for field, check in checks.items()}


@base.register('mcod', shared_bn_only='trains peers with their own BatchNorm, '
                                 'not the depths of one DDNN')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  s = _settings(config)
  model = Peers(tuple(s['peers']), num_classes, config.model.width_multiplier,
                jnp.dtype(config.model.dtype), config.model.zero_init_residual,
                config.model.get('conv_impl', 'xla'))
  members = tuple((i,) for i in range(len(s['peers']) + 1))
  on_fn = None
  if steps_per_epoch is not None:
    period = base.epochs_in_steps(s['period_epochs'], steps_per_epoch)
    on_fn = functools.partial(distill_on, period=period,
                              on_steps=int(round(s['duty_cycle'] * period)),
                              on_first=s['on_first'])
  weight_fn = functools.partial(
      growing_weight, start=s['weight_start'], end=s['weight_end'],
      growth_steps=base.epochs_in_steps(s['growth_epochs'], steps_per_epoch),
      growth=s['growth'], levels=s['growth_levels'])
  names = [model.member_name(m) for m in members[:-1]]
  return base.Method(model, members, objective(names, s['temperature'], on_fn, weight_fn))
