"""One depth (`config.individual_depth`) trained alone as a standalone net:
the baseline each DDNN depth is compared with."""

from __future__ import annotations

import dataclasses

import ml_collections

from ddnn_jax import losses, models
from ddnn_jax.methods import base


@base.register('individual')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  del steps_per_epoch  # no ramp-up
  stage_sizes = models.create_model(config.model.name, num_classes).check_depth(
      config.individual_depth)
  model = base.create_model(config, num_classes, stage_sizes)
  depths = (model.full_depth,)
  ekd = dataclasses.replace(losses.EKDConfig(**config.ekd.to_dict()), alpha=0.0, beta=0.0,
                            student_ce=1.0, full_ce=1.0, rampup_epochs=0.0,
                            subnet_start_epochs=0.0)
  return base.Method(model, depths, base.ekd_objective(model, depths, ekd, 0), ekd, 0)
