"""The functional train state and its sharded initialisation."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddnn_jax import mesh as mesh_lib
from ddnn_jax import models


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def _init(model: models.DDNNResNet, depths, tx: optax.GradientTransformation,
          rng: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
  images = jnp.zeros((1, *image_shape), jnp.float32)
  variables = models.init_variables(model, rng, images, depths)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(variables['params']))


def state_shardings(model, depths, tx, image_shape, mesh) -> tuple[Any, Any]:
  """(abstract state, its shardings): data parallel, so everything is replicated."""
  abstract = jax.eval_shape(
      functools.partial(_init, model, depths, tx, image_shape=image_shape),
      jax.random.key(0))
  shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract)
  return abstract, shardings


def create_train_state(model: models.DDNNResNet, depths, tx, rng: jax.Array,
                       image_shape: tuple[int, ...], mesh) -> TrainState:
  """Initialised under jit straight into its shardings (nothing built on one device)."""
  _, shardings = state_shardings(model, depths, tx, image_shape, mesh)
  init = jax.jit(functools.partial(_init, model, depths, tx, image_shape=image_shape),
                 out_shardings=shardings)
  return init(rng)
