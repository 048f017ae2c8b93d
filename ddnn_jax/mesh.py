"""The device mesh of data-parallel training and how batches are placed on it.

One `data` axis over every device of every process. Parameters are replicated;
a batch is split along its first dimension. Each process passes only its own
rows; `global_batch` assembles the global array without moving data between
hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(devices: Any = None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, name: str) -> None:
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
        f'{name}={global_batch_size} is not divisible by the {devices} devices of the '
        f'mesh; set --config.{name} to a multiple of {devices}')


def sharded_batch_spec(spec: dict[str, jax.ShapeDtypeStruct],
                       mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch's global shapes (`input_pipeline.batch_spec`) placed as
  `global_batch` places the real batch: what a program is compiled for."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
          for k, v in spec.items()}


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
