"""Checkpoint layout: variables and training state as two items; the legacy
one-item layout still restores."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ddnn_jax import checkpointing
from ddnn_jax.train_state import TrainState


def _state(step: int, scale: float) -> TrainState:
  return TrainState(step=jnp.int32(step),
                    params={'dense': {'kernel': scale * jnp.ones((3, 2))}},
                    batch_stats={'bn': {'mean': scale * jnp.arange(2.0)}},
                    opt_state={'trace': {'dense': {'kernel': -scale * jnp.ones((3, 2))}}})


def _abstract(state: TrainState) -> TrainState:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_items_round_trip_and_variables_alone(tmp_path):
  workdir = str(tmp_path)
  manager = checkpointing.create_manager(workdir, async_save=False)
  state = _state(7, 2.0)
  checkpointing.save(manager, 7, state)
  manager.wait_until_finished()
  names = sorted(p.name for p in (tmp_path / 'checkpoints' / '7').iterdir())
  assert checkpointing.VARIABLES_ITEM in names and checkpointing.TRAIN_ITEM in names
  restored = checkpointing.restore(
      checkpointing.create_manager(workdir, async_save=False), _abstract(state))
  _assert_same(restored, state)
  variables = checkpointing.restore_variables(
      checkpointing.create_manager(workdir, async_save=False), _abstract(state).variables)
  _assert_same(variables, state.variables)
  read, step = checkpointing.read_variables(workdir)
  assert step == 7
  _assert_same(read, state.variables)


def test_legacy_one_item_checkpoints_restore_and_new_saves_follow(tmp_path):
  workdir = str(tmp_path)
  old = _state(3, 1.0)
  legacy = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir),
                                 options=ocp.CheckpointManagerOptions(create=True))
  legacy.save(3, args=ocp.args.StandardSave(old))
  legacy.wait_until_finished()
  legacy.close()

  manager = checkpointing.create_manager(workdir, async_save=False)
  _assert_same(checkpointing.restore(manager, _abstract(old)), old)
  assert checkpointing.restore_variables(manager, _abstract(old).variables) is None
  _assert_same(checkpointing.read_variables(workdir)[0], old.variables)
  # A resumed legacy run saves its next checkpoints in the new layout.
  new = _state(4, 3.0)
  checkpointing.save(manager, 4, new)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [3, 4]
  _assert_same(checkpointing.restore(manager, _abstract(new)), new)
  _assert_same(checkpointing.restore(manager, _abstract(old), step=3), old)
