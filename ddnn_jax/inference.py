"""Inference of one depth: the jitted, batch-sharded forward that measures
throughput, compiles for a TPU slice ahead of time, and serves an export."""

from __future__ import annotations

import jax

from ddnn_jax import mesh as mesh_lib
from ddnn_jax import models


def make_forward(model: models.DDNNResNet, depth: models.Depth, mesh: jax.sharding.Mesh):
  """Jitted inference of one depth: (variables, images) -> logits, batch-sharded."""
  return jax.jit(lambda v, x: model.apply(v, x, depth),
                 in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.batch_sharding(mesh))
