"""ONE, on-the-fly native ensemble (METHODS.md section 4).

One trunk (the stem and every stage but the last) is shared by m branches,
each a copy of the last stage with its own classifier. A gate weighs the
branches' logits into an ensemble, which teaches every branch:

  g   = softmax(relu(BN(dense(mean_hw(trunk)))))      one weight per branch
  z_e = sum_i g_i z_i
  L   = sum_i CE(z_i, y) + CE(z_e, y)
        + w(t) sum_i T^2 KL(softmax(stop_gradient(z_e) / T) || softmax(z_i / T))

with w(t) = `one.kd_weight` times the sigmoid ramp-up over `one.rampup_epochs`.
The members are (i,) for branch i + 1 ('branch1', ...) and (m,) for the
ensemble ('ensemble', the reference evaluation compares the branches with).
Branch 1 with the trunk is the deployed net: `OneNet.member_variables` gives
its variables in the layout of the standalone ResNet of `config.model.name`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax import losses, models
from ddnn_jax.methods import base

Member = tuple[int]


class GatedOutput(NamedTuple):
  logits: jax.Array  # the ensemble's logits, sum_i g_i z_i (float32)
  features: tuple[jax.Array, ...]  # the trunk's stage outputs
  gate: jax.Array  # (batch, m) branch weights; each row sums to 1


class Gate(nn.Module):
  """Pooled trunk output -> dense to m -> BatchNorm -> ReLU -> softmax."""
  num_branches: int

  @nn.compact
  def __call__(self, trunk: jax.Array, *, train: bool) -> jax.Array:
    x = jnp.mean(trunk.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_branches, name='dense')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=models.BN_MOMENTUM,
                     epsilon=1e-5, name='bn')(x)
    return jax.nn.softmax(nn.relu(x), axis=-1)


class Branch(nn.Module):
  """A copy of the last stage (`stage{S}_block{b}`) and its classifier (`head`)."""
  block: str
  stage: int  # the last stage's number, from 1
  num_blocks: int
  width: int
  num_classes: int
  dtype: Any
  zero_init_residual: bool
  conv_impl: str

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    for b in range(self.num_blocks):
      x = models.ResidualBlock(self.block, self.width, 2 if b == 0 else 1, 'shared',
                               self.dtype, self.zero_init_residual, self.conv_impl,
                               name=f'stage{self.stage}_block{b}')(x, train=train, tag=None)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(jnp.mean(x, (1, 2)))
    return logits.astype(jnp.float32), x


class OneNet(nn.Module):
  """The ResNet `preset` with `num_branches` copies of its last stage and a gate.

  `forward_depths(images, members, train)` runs the trunk once and each branch
  that a requested member needs once; `apply(variables, images, member)` gives
  one member's logits (what FLOPs, throughput and export measure).
  """
  preset: models.Preset
  num_classes: int
  num_branches: int = 3
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  conv_impl: str = 'xla'

  @property
  def full_depth(self) -> Member:
    """The ensemble: the member the branches are compared with."""
    return (self.num_branches,)

  def check_depth(self, member: Any) -> Member:
    if member is None:
      return self.full_depth
    m = self.num_branches
    if not (isinstance(member, Sequence) and len(member) == 1
            and isinstance(member[0], int) and 0 <= member[0] <= m):
      raise ValueError(f'member {member!r} of ONE is (i,): branch i + 1 for i < {m}, '
                       f'the ensemble for i = {m}')
    return (int(member[0]),)

  def member_name(self, member: Any) -> str:
    (i,) = self.check_depth(member)
    return 'ensemble' if i == self.num_branches else f'branch{i + 1}'

  def member_variables(self, variables: Mapping[str, Any], member: Any) -> dict:
    """A branch's variables as the standalone ResNet holds them (the trunk's and
    its own, without the gate); the ensemble's are all of them."""
    (i,) = self.check_depth(member)
    if i == self.num_branches:
      return {name: dict(collection) for name, collection in variables.items()}

    def standalone(collection: Mapping[str, Any]) -> dict:
      trunk = {k: v for k, v in collection.items()
               if not k.startswith('branch') and k != 'gate'}
      return {**trunk, **collection[f'branch{i + 1}']}

    return {name: standalone(collection) for name, collection in variables.items()}

  def __call__(self, images, depth: Any = None, train: bool = False) -> jax.Array:
    """Logits of one member (the ensemble when `depth` is None)."""
    return self.forward_depths(images, (self.check_depth(depth),), train)[0].logits

  def forward_depths(self, images, depths: Sequence[Any], train: bool = False):
    """One output per member: a DepthOutput per branch, a GatedOutput for the ensemble."""
    return self._forward(images, tuple(self.check_depth(d) for d in depths), train)

  def _width(self, channels: int) -> int:
    return max(1, int(round(channels * self.width_multiplier)))

  @nn.compact
  def _forward(self, images, members: tuple[Member, ...], train: bool):
    p, m = self.preset, self.num_branches
    last = len(p.stage_sizes) - 1
    x = models.Stem(p.stem, self._width(p.stem_width), 'shared', self.dtype, self.conv_impl,
                    name='stem')(images, train=train, tag=None)
    features = []
    for s in range(last):
      for b in range(p.stage_sizes[s]):
        x = models.ResidualBlock(p.block, self._width(p.widths[s]), 2 if (b == 0 and s > 0)
                                 else 1, 'shared', self.dtype, self.zero_init_residual,
                                 self.conv_impl, name=f'stage{s + 1}_block{b}')(
                                     x, train=train, tag=None)
      features.append(x)
    needed = sorted({i for (i,) in members if i < m} | (set(range(m)) if (m,) in members
                                                         else set()))
    branches = {}
    for i in needed:
      logits, y = Branch(p.block, last + 1, p.stage_sizes[last], self._width(p.widths[last]),
                         self.num_classes, self.dtype, self.zero_init_residual,
                         self.conv_impl, name=f'branch{i + 1}')(x, train=train)
      branches[i] = models.DepthOutput(logits, (*features, y))
    outputs = dict(branches)
    if (m,) in members:
      gate = Gate(m, name='gate')(x, train=train)
      stacked = jnp.stack([branches[i].logits for i in range(m)], axis=1)  # (batch, m, C)
      outputs[m] = GatedOutput(jnp.einsum('bm,bmc->bc', gate, stacked), tuple(features), gate)
    return tuple(outputs[i] for (i,) in members)


def objective(num_branches: int, temperature: float, kd_weight: float,
              ramp: int, ramp_epochs: float) -> base.Objective:
  """The ONE loss over the outputs of members ((0,), ..., (m,)): every
  branch's and the ensemble's cross-entropy, plus w(t) times each branch's
  T^2 KL from the detached ensemble. Terms: 'branch<i>/ce', 'branch<i>/kl',
  'ensemble/ce', 'gate/branch<i>' (the batch's mean gate weight), 'kd_scale'."""

  def loss_fn(outputs, labels, step, *, teacher_outputs=None):
    del teacher_outputs  # the teacher is the ensemble of this step
    if ramp_epochs and not ramp:
      raise ValueError('one.rampup_epochs needs steps_per_epoch in create_method')
    *branches, ensemble = outputs
    if len(branches) != num_branches:
      raise ValueError(f'got {len(branches)} branch outputs for {num_branches} branches')
    teacher = jax.lax.stop_gradient(ensemble.logits)
    kd_scale = kd_weight * losses.sigmoid_rampup(step, ramp)
    loss = losses.cross_entropy(ensemble.logits, labels)
    terms = {'ensemble/ce': loss, 'kd_scale': kd_scale}
    gate = ensemble.gate.mean(axis=0)
    for i, output in enumerate(branches, start=1):
      ce = losses.cross_entropy(output.logits, labels)
      kl = losses.kl_divergence(teacher, output.logits, temperature)
      terms.update({f'branch{i}/ce': ce, f'branch{i}/kl': kl, f'gate/branch{i}': gate[i - 1]})
      loss = loss + ce
      if kd_weight:  # a zero weight drops the term, non-finite or not
        loss = loss + kd_scale * kl
    return loss, terms

  return loss_fn


@base.register('one', shared_bn_only='trains branches with their own BatchNorm, '
                                'not the depths of one DDNN')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  positive, at_least_0 = base.is_number(lambda v: v > 0), base.is_number(lambda v: v >= 0)
  m = base.setting(config, 'one.branches', base.is_whole(2), 'a whole number >= 2', '3')
  temperature = base.setting(config, 'one.temperature', positive, 'a number > 0', '3.0')
  kd_weight = base.setting(config, 'one.kd_weight', at_least_0, 'a number >= 0', '1.0')
  ramp_epochs = base.setting(config, 'one.rampup_epochs', at_least_0, 'a number >= 0', '80')
  model = OneNet(models.get_preset(config.model.name), num_classes, m,
                 config.model.width_multiplier, jnp.dtype(config.model.dtype),
                 config.model.zero_init_residual, config.model.get('conv_impl', 'xla'))
  ramp = base.epochs_in_steps(ramp_epochs, steps_per_epoch)
  members = tuple((i,) for i in range(m + 1))
  return base.Method(model, members, objective(m, temperature, kd_weight, ramp, ramp_epochs),
                     rampup_steps=ramp)
