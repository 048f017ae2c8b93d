"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous (training continues while the arrays are written) and
keep the newest `keep` steps. Restores take an abstract state whose leaves carry
their shardings, so every array lands directly where the train step wants it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

T = TypeVar('T')
UNREADABLE_DIR = 'checkpoints_unreadable'  # where training sets damaged checkpoints aside


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read (damaged files, another model)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def create_manager(workdir: str, *, keep: int = 3,
                   async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


# A checkpoint holds two Orbax items: the model's variables (params and BN
# statistics: all that evaluation, export and BN re-calibration need) and the
# training state (step and optimizer state). Checkpoints written before this
# layout hold the whole TrainState as one item, LEGACY_ITEM; they still restore.
VARIABLES_ITEM, TRAIN_ITEM, LEGACY_ITEM = 'variables', 'train', 'default'


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.Composite(**{
      VARIABLES_ITEM: ocp.args.StandardSave(state.variables),
      TRAIN_ITEM: ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state}),
  }))


def _legacy_path(manager: ocp.CheckpointManager, step: int) -> epath.Path | None:
  path = epath.Path(manager.directory) / str(step) / LEGACY_ITEM
  return path if path.exists() else None


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> Any:
  """The state saved at `step` (default: the latest), laid out as `abstract_state`.

  `abstract_state` is a TrainState of jax.ShapeDtypeStruct with shardings, such
  as `jax.eval_shape` of the initialiser with the sharding attached.
  """
  step = resolve_step(manager, step)
  legacy = _legacy_path(manager, step)
  if legacy is not None:
    return ocp.StandardCheckpointer().restore(legacy, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      VARIABLES_ITEM: ocp.args.StandardRestore(abstract_state.variables),
      TRAIN_ITEM: ocp.args.StandardRestore(
          {'step': abstract_state.step, 'opt_state': abstract_state.opt_state}),
  }))
  variables, train = restored[VARIABLES_ITEM], restored[TRAIN_ITEM]
  return abstract_state.replace(step=train['step'], opt_state=train['opt_state'],
                                params=variables['params'],
                                batch_stats=variables['batch_stats'])


def restore_variables(manager: ocp.CheckpointManager, abstract_variables: Any,
                      step: int | None = None) -> Any | None:
  """Only the model variables of `step` (no optimizer needed), or None for a
  checkpoint of the legacy one-item layout (restore the whole state instead)."""
  step = resolve_step(manager, step)
  if _legacy_path(manager, step) is not None:
    return None
  return manager.restore(step, args=ocp.args.Composite(**{
      VARIABLES_ITEM: ocp.args.StandardRestore(abstract_variables)}))[VARIABLES_ITEM]


def read_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'} as saved, on the default device; the step) of
  `step` (default: the newest readable one) in `workdir`, either layout;
  nothing else built."""
  manager = create_manager(workdir, async_save=False)

  def read(step: int) -> dict:
    legacy = _legacy_path(manager, step)
    if legacy is not None:
      state = ocp.StandardCheckpointer().restore(legacy)
      return {'params': state['params'], 'batch_stats': state['batch_stats']}
    return dict(manager.restore(step, args=ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardRestore()}))[VARIABLES_ITEM])

  if step is None:
    resolve_step(manager, None)  # a clear error when there is no checkpoint at all
  variables, step, _ = restore_readable(manager, read, step)
  return variables, step


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds any checkpoint step (without creating anything)."""
  path = epath.Path(checkpoint_dir(workdir))
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step`, or the latest step when None; a clear error when there is none."""
  if step is None:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'no checkpoint in {manager.directory}; train first or pass the workdir '
        'of a finished run')
  if step not in manager.all_steps():
    raise FileNotFoundError(
        f'no checkpoint for step {step} in {manager.directory}; available steps: '
        f'{sorted(manager.all_steps())}')
  return step


def _reason(error: Exception) -> str:
  lines = str(error).strip().splitlines() or ['']
  return f'{type(error).__name__}: {lines[0][:200]}'


def restore_readable(manager: ocp.CheckpointManager, read: Callable[[int], T],
                     step: int | None = None) -> tuple[T, int, list[int]]:
  """(read(step), step, unreadable steps) for the newest checkpoint that reads.

  Any error while reading (a truncated or overwritten file, missing metadata,
  a tree of another model) makes a step unreadable: it is named in a one-line
  warning and the previous step is tried. With an explicit `step`, nothing
  else is tried: an unreadable one raises UnreadableCheckpointError naming the
  steps that do read.
  """
  if step is not None:
    step = resolve_step(manager, step)
    try:
      return read(step), step, []
    except Exception as e:  # Orbax and TensorStore raise many types
      readable = [s for s in sorted(manager.all_steps(), reverse=True)
                  if s != step and _reads(read, s)]
      raise UnreadableCheckpointError(
          f'checkpoint step {step} in {manager.directory} is unreadable ({_reason(e)}); '
          f'readable steps: {readable or "none"}') from e
  unreadable = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      return read(candidate), candidate, unreadable
    except Exception as e:  # Orbax and TensorStore raise many types
      logging.warning('checkpoint step %d in %s is unreadable (%s); trying the one before',
                      candidate, manager.directory, _reason(e))
      unreadable.append(candidate)
  raise UnreadableCheckpointError(
      f'no checkpoint in {manager.directory} is readable (steps {unreadable}); move them '
      'aside or pass another --workdir to start again')


def _reads(read: Callable[[int], Any], step: int) -> bool:
  try:
    read(step)
  except Exception:
    return False
  return True


def set_aside(workdir: str, steps: list[int]) -> list[str]:
  """Moves unreadable checkpoints to <workdir>/checkpoints_unreadable/<step>
  (kept, never deleted), so training can save those steps again; returns the
  new paths. Process 0 moves; every process waits for it."""
  moved = []
  for step in steps:
    target = os.path.join(workdir, UNREADABLE_DIR, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):  # set aside before: keep both
        target = f'{target}.{len(os.listdir(os.path.dirname(target)))}'
      shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), target)
    moved.append(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('ddnn_jax: unreadable checkpoints set aside')
  return moved


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
