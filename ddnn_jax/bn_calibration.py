"""Post-training BatchNorm re-calibration, one depth at a time.

With `bn_mode='shared'` every depth's training batches move the same running
statistics, so after training they describe no single depth exactly. Re-
calibration re-estimates, for one depth, the statistics of every BatchNorm
layer that depth uses as the plain average of the per-batch mean and variance
over `num_batches` training batches (the "precise BN" estimate), leaving the
learned weights alone. It works with every BN mode (METHODS.md, section 1);
`python -m ddnn_jax.evaluate --recalibrate_bn N` applies it before scoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from ddnn_jax import mesh as mesh_lib
from ddnn_jax import models


def make_batch_stats_step(model: models.DDNNResNet, depth: models.Depth,
                          mesh: jax.sharding.Mesh):
  """Jitted (variables, images) -> this batch's BatchNorm statistics.

  A train-mode forward of `depth` alone moves each running average once,
  new = m * old + (1 - m) * batch, so batch = (new - m * old) / (1 - m); the
  layers `depth` does not use come back unchanged (batch = old).
  """
  depth = tuple(depth)
  m = models.BN_MOMENTUM

  def step(variables, images):
    _, updates = model.apply(variables, images, (depth,), True,
                             method=model.forward_depths, mutable=['batch_stats'])
    return jax.tree.map(lambda new, old: (new - m * old) / (1 - m),
                        updates['batch_stats'], variables['batch_stats'])

  return jax.jit(step, in_shardings=(mesh_lib.replicated(mesh),
                                     mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def recalibrate(model: models.DDNNResNet, variables: dict, depth: models.Depth,
                batches: Iterable[dict], mesh: jax.sharding.Mesh,
                num_batches: int) -> dict:
  """`variables` with `depth`'s BatchNorm statistics re-estimated on the first
  `num_batches` of `batches` (dicts with 'image', this process's rows)."""
  if num_batches < 1:
    raise ValueError(f'num_batches must be >= 1, got {num_batches}')
  step = make_batch_stats_step(model, depth, mesh)
  total, seen = None, 0
  for local in batches:
    images = mesh_lib.global_batch({'image': local['image']}, mesh)['image']
    stats = step(variables, images)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    seen += 1
    if seen == num_batches:
      break
  if seen < num_batches:
    raise ValueError(f'only {seen} batches to re-calibrate BatchNorm on, asked for '
                     f'{num_batches}; lower --recalibrate_bn')
  averaged = jax.tree.map(lambda x: x / seen, total)
  return {**variables, 'batch_stats': averaged}


def recalibrate_depths(model: models.DDNNResNet, variables: dict,
                       depths: Sequence[models.Depth], make_batches, mesh: jax.sharding.Mesh,
                       num_batches: int) -> tuple[dict, ...]:
  """One re-calibrated copy of `variables` per depth; `make_batches()` gives a
  fresh iterator of training batches for each."""
  return tuple(recalibrate(model, variables, d, make_batches(), mesh, num_batches)
               for d in depths)
