"""Warm start of a DDNN (methods ekd and joint_ce): `config.init_from` names
the workdir of a finished run (for example an individually trained full net,
or its release); its reference net is loaded into every depth at step 0, the
per-depth norm layers each from the plain one, and training goes on from
there (with the config's own schedule: a short one at a low learning rate
fine-tunes it, as Once-for-All starts its elastic depths from the trained
full net).

The loaded variables reach the train step as a teacher that runs nothing
(base.Teacher with no depths), and a transition at step 0 writes them into the
state inside the jitted step, so a run resumed from any checkpoint goes on
exactly as one that was never stopped.
"""

from __future__ import annotations

import ml_collections

from ddnn_jax import models, subnets
from ddnn_jax.methods import base, nets


def teacher(config: ml_collections.ConfigDict, model: models.DDNNResNet, num_classes: int,
            steps_per_epoch: int | None) -> base.Teacher | None:
  """The full net of `config.init_from`, as a teacher that runs nothing (None
  without init_from). Evaluation (no steps_per_epoch) reads no other run."""
  if not config.get('init_from') or steps_per_epoch is None:
    return None
  standalone = model.clone(bn_mode='shared', head_grad='all')
  variables = nets.restore_full_net(config, standalone, num_classes, steps_per_epoch)
  return base.Teacher(standalone, variables, depths=())


def transitions(config: ml_collections.ConfigDict,
                steps_per_epoch: int | None) -> tuple[base.Transition, ...]:
  """The step-0 load of `config.init_from` into every depth (none without it)."""
  if not config.get('init_from') or steps_per_epoch is None:
    return ()
  return (base.Transition(0, lambda variables, loaded: subnets.fill_from_standalone(
      {c: variables[c] for c in ('params', 'batch_stats')}, loaded)),)
