"""EKD: every depth of one DDNN in each step; the full net teaches the others
(METHODS.md section 2; the defaults of configs/base.py are what docs/RESULTS.md
found to work)."""

from __future__ import annotations

import ml_collections

from ddnn_jax import gradients, losses
from ddnn_jax.methods import base, warm_start


@base.register('ekd', bn_mode='private_all')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  model = base.create_model(config, num_classes)
  depths = base.train_depths(config, model)
  ekd = losses.EKDConfig(**config.ekd.to_dict())
  ramp = base.rampup_steps(ekd, steps_per_epoch)
  start = base.subnet_start_step(ekd, steps_per_epoch)
  return base.Method(model, depths, base.ekd_objective(model, depths, ekd, ramp, start),
                     ekd, ramp, teacher=warm_start.teacher(config, model, num_classes,
                                                        steps_per_epoch),
                     transitions=warm_start.transitions(config, steps_per_epoch),
                     any_depth=base.any_depth_rule(config, model, depths, ekd, ramp),
                     solo_steps=start, grads=gradients.rule(config))
