"""Joint training: every depth of one DDNN in each step, cross-entropy only (no KD)."""

from __future__ import annotations

import dataclasses

import ml_collections

from ddnn_jax import gradients, losses
from ddnn_jax.methods import base, warm_start


@base.register('joint_ce')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  model = base.create_model(config, num_classes)
  depths = base.train_depths(config, model)
  ekd = dataclasses.replace(losses.EKDConfig(**config.ekd.to_dict()), alpha=0.0, beta=0.0,
                            student_ce=1.0, rampup_epochs=0.0)
  start = base.subnet_start_step(ekd, steps_per_epoch)
  return base.Method(model, depths, base.ekd_objective(model, depths, ekd, 0, start), ekd, 0,
                     teacher=warm_start.teacher(config, model, num_classes, steps_per_epoch),
                     transitions=warm_start.transitions(config, steps_per_epoch),
                     any_depth=base.any_depth_rule(config, model, depths, ekd, 0),
                     solo_steps=start, grads=gradients.rule(config))
