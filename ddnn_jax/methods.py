"""What each training method computes per step, selected by `config.method`.

A method fixes the model (the DDNN, or a standalone net for 'individual'), the
depths that run in every step, and the objective over their outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections

from ddnn_jax import losses, models

METHODS = ('ekd', 'joint_ce', 'individual')

# (outputs of forward_depths, labels, step) -> (loss, terms)
Objective = Callable[[Sequence[models.DepthOutput], jax.Array, jax.Array],
                     tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Method:
  model: models.DDNNResNet
  depths: tuple[models.Depth, ...]  # every depth a train step runs, full last
  objective: Objective
  ekd: losses.EKDConfig  # the loss settings the objective uses ('joint_ce': no KD)
  rampup_steps: int  # steps of the KD ramp-up (0: none, or no steps_per_epoch given)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.DDNNResNet:
  """The network `config` trains: the DDNN, or the standalone net of 'individual'."""
  m = config.model
  stage_sizes = None
  if config.method == 'individual':
    base = models.create_model(m.name, num_classes)
    stage_sizes = base.check_depth(config.individual_depth)
  return models.create_model(
      m.name, num_classes, width_multiplier=m.width_multiplier, bn_mode=m.bn_mode,
      dtype=m.dtype, zero_init_residual=m.zero_init_residual,
      conv_impl=m.get('conv_impl', 'xla'), stage_sizes=stage_sizes)


def train_depths(config: ml_collections.ConfigDict,
                 model: models.DDNNResNet) -> tuple[models.Depth, ...]:
  """The configured depths, validated, without repeats, the full depth last."""
  if config.method == 'individual':
    return (model.full_depth,)
  depths = []
  for depth in config.depths:
    depth = model.check_depth(depth)
    if depth not in depths and depth != model.full_depth:
      depths.append(depth)
  return (*depths, model.full_depth)


def create_method(config: ml_collections.ConfigDict, num_classes: int,
                  steps_per_epoch: int | None = None) -> Method:
  """The method of `config`; `steps_per_epoch` is needed by a KD ramp-up only."""
  if config.method not in METHODS:
    raise ValueError(
        f'unknown method {config.method!r}; set --config.method to one of {METHODS}')
  model = create_model(config, num_classes)
  depths = train_depths(config, model)
  ekd = losses.EKDConfig(**config.ekd.to_dict())
  if config.method == 'joint_ce':
    ekd = dataclasses.replace(ekd, alpha=0.0, beta=0.0, student_ce=1.0, rampup_epochs=0.0)
  rampup_steps = 0
  if ekd.rampup_epochs and steps_per_epoch is not None:
    rampup_steps = max(1, round(ekd.rampup_epochs * steps_per_epoch))

  def objective(outputs, labels, step):
    if ekd.rampup_epochs and not rampup_steps:  # evaluation needs no objective
      raise ValueError('ekd.rampup_epochs needs steps_per_epoch in create_method')
    kd_scale = losses.sigmoid_rampup(step, rampup_steps)
    loss, terms = losses.ekd_loss(outputs, depths, labels, model.full_depth, ekd,
                                  kd_scale=kd_scale)
    if rampup_steps:
      terms['kd_scale'] = kd_scale
    return loss, terms

  return Method(model, depths, objective, ekd, rampup_steps)
