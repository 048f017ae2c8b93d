"""Checkpoint layout: variables and training state as two items; the legacy
one-item layout still restores."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

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


def _damage(step_dir, how: str) -> None:
  """Damages the variables item of a saved checkpoint as disks and people do."""
  item = step_dir / checkpointing.VARIABLES_ITEM
  if how == 'missing_metadata':
    (item / '_METADATA').unlink()
    return
  for path in item.glob('**/d/*'):  # the OCDBT data files
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3] if how == 'truncated' else b'\0garbage\0' * 64)


@pytest.mark.parametrize('how', ['missing_metadata', 'truncated', 'overwritten'])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, caplog):
  workdir = str(tmp_path)
  manager = checkpointing.create_manager(workdir, async_save=False)
  for step in (2, 4):
    checkpointing.save(manager, step, _state(step, float(step)))
  _damage(tmp_path / 'checkpoints' / '4', how)
  abstract = _abstract(_state(0, 0.0))
  manager = checkpointing.create_manager(workdir, async_save=False)
  state, step, unreadable = checkpointing.restore_readable(
      manager, lambda s: checkpointing.restore(manager, abstract, s))
  if how == 'missing_metadata':  # a restore into a known tree does not need it
    _assert_same(state, _state(4, 4.0))
    # Reading without a target does: the evaluation and teacher path falls back.
    variables, step = checkpointing.read_variables(workdir)
    assert step == 2
    _assert_same(variables, _state(2, 2.0).variables)
    return
  assert (step, unreadable) == (2, [4])
  _assert_same(state, _state(2, 2.0))
  assert any('checkpoint step 4' in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records)
  # Asked for by step, the damaged one is a one-line error naming the readable ones.
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r'step 4 .* unreadable .*readable steps: \[2\]'):
    checkpointing.restore_readable(
        manager, lambda s: checkpointing.restore(manager, abstract, s), 4)
  # Set aside, not deleted; the step can be saved again.
  (moved,) = checkpointing.set_aside(workdir, unreadable)
  assert os.path.isdir(moved) and not (tmp_path / 'checkpoints' / '4').exists()
  manager = checkpointing.create_manager(workdir, async_save=False)
  checkpointing.save(manager, 4, _state(4, 5.0))
  _assert_same(checkpointing.restore(manager, abstract), _state(4, 5.0))


def test_a_checkpoint_of_another_model_is_unreadable_not_a_traceback(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, 1, _state(1, 1.0))
  other = _abstract(_state(0, 0.0)).replace(
      params={'dense': {'kernel': jax.ShapeDtypeStruct((5, 2), jnp.float32)}})
  # Named from the metadata, before any array is read.
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r'hold another model \(checkpoint step 1 holds another model: '
                           r'params/dense/kernel has shape \(3, 2\) there but \(5, 2\) here'):
    checkpointing.restore_readable(manager, lambda s: checkpointing.restore(manager, other, s))


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # Orbax's own files
    ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to '
               "write 16820 bytes to file 5: No space left on device [os_error_code='28']"),
])
def test_a_failed_save_is_one_line_naming_the_directory_and_the_resume(
    tmp_path, monkeypatch, error):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, 1, _state(1, 1.0))

  def failing_with(error):
    def save(*args, **kwargs):
      raise error
    return save

  monkeypatch.setattr(manager, 'save', failing_with(error))
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r'could not write a checkpoint to .*checkpoints \(No space left on '
                           r'device\); free space .* it resumes from step 1$'):
    checkpointing.save(manager, 2, _state(2, 2.0))
  monkeypatch.setattr(manager, 'save', failing_with(ValueError('not a failed write')))
  with pytest.raises(ValueError, match='not a failed write'):  # raised as it was
    checkpointing.save(manager, 2, _state(2, 2.0))
