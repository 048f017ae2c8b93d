"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous (training continues while the arrays are written) and
keep the newest `keep` steps. Restores take an abstract state whose leaves carry
their shardings, so every array lands directly where the train step wants it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
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


class ModelMismatchError(ValueError):
  """A checkpoint holds variables of another model (other shapes or layers)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount); one line
  naming the directory, the system's reason and what to do."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a local workdir made absolute (Orbax needs that)."""
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)
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


def saved_steps(directory: Any) -> list[int]:
  """The finished steps in a checkpoint directory, listed without asking a
  manager (which may be the thing that failed)."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def write_failure(what: str, reason: str, code: int | None, directory: Any) -> str:
  """One line for a failed write of `what` during training: the system's
  `reason` (errno `code`, if known), what to do, and where a rerun resumes
  from the checkpoints in `directory`."""
  if code in (errno.ENOSPC, errno.EDQUOT) or 'No space left' in reason:
    fix = 'free space on that disk or pass a --workdir on another one'
  elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
    fix = 'make it writable or pass another --workdir'
  else:
    fix = 'check that disk or pass another --workdir'
  steps = saved_steps(directory)
  resume = (f'it resumes from step {steps[-1]}' if steps
            else 'no checkpoint was saved, so it starts from step 0')
  return f'could not write {what} ({reason}); {fix}, then rerun the same command: {resume}'


def _system_error(error: Exception) -> tuple[int | None, str] | None:
  """(errno, reason) of a failed write: an OSError, or TensorStore's ValueError
  'RESOURCE_EXHAUSTED: Error writing local file ... [os_error_code='28']'.
  None for any other error."""
  if isinstance(error, OSError):
    return error.errno, error.strerror or str(error).strip().splitlines()[-1]
  code = re.search(r"os_error_code='(\d+)'", str(error))
  if isinstance(error, ValueError) and code:
    return int(code.group(1)), os.strerror(int(code.group(1)))
  return None


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager):
  """Turns a failed write of a (background) save into a CheckpointWriteError."""
  try:
    yield
  except (OSError, ValueError) as e:
    failure = None if isinstance(e, CheckpointWriteError) else _system_error(e)
    if failure is None:
      raise
    raise CheckpointWriteError(write_failure(
        f'a checkpoint to {manager.directory}', failure[1], failure[0],
        manager.directory)) from e


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts saving `state` as `step` (in the background); an earlier save
  that failed raises CheckpointWriteError here."""
  with _writing(manager):
    manager.save(step, args=ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardSave(state.variables),
        TRAIN_ITEM: ocp.args.StandardSave({'step': state.step,
                                           'opt_state': state.opt_state}),
    }))


def save_variables(manager: ocp.CheckpointManager, step: int, variables: Any) -> None:
  """Saves only the model variables as `step` (a released model: no
  optimizer state); waits for the save."""
  with _writing(manager):
    manager.save(step, args=ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardSave(variables)}))
    manager.wait_until_finished()


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the background saves; one that failed raises CheckpointWriteError."""
  with _writing(manager):
    manager.wait_until_finished()


def finish(manager: ocp.CheckpointManager, *, quiet: bool = False) -> None:
  """Waits for the background saves and closes `manager`; a save that failed
  raises CheckpointWriteError (`quiet`: another error is already on its way,
  so the save's failure only goes to the log)."""
  try:
    wait(manager)
  except CheckpointWriteError as e:
    with contextlib.suppress(Exception):  # closing waits again, and fails again
      manager.close()
    if not quiet:
      raise
    logging.error('%s', e)
    return
  manager.close()


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
  check_same_model(manager, step, abstract_state.variables)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      VARIABLES_ITEM: ocp.args.StandardRestore(abstract_state.variables),
      TRAIN_ITEM: ocp.args.StandardRestore(
          {'step': abstract_state.step, 'opt_state': abstract_state.opt_state}),
  }))
  variables, train = restored[VARIABLES_ITEM], restored[TRAIN_ITEM]
  return abstract_state.replace(step=train['step'], opt_state=train['opt_state'],
                                params=variables['params'],
                                batch_stats=variables['batch_stats'])


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'params/stage1_block0/conv1/kernel' -> shape, of every array of `tree`."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_model(manager: ocp.CheckpointManager, step: int,
                     abstract_variables: Any) -> None:
  """Raises ModelMismatchError naming the first array whose name or shape
  differs between checkpoint `step` and `abstract_variables`. Reads the
  metadata only: a restore of another model's arrays fails midway, with
  TensorStore's reads still in flight (and printing) after the error.
  Metadata that does not read leaves the verdict to the restore."""
  path = epath.Path(manager.directory) / str(step) / VARIABLES_ITEM
  try:
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(path))
  except Exception:  # noqa: BLE001 -- damaged metadata: the restore says what it can
    return
  wanted = _shapes(abstract_variables)
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in wanted:
      difference = f'{name} is only in the checkpoint'
    elif name not in saved:
      difference = f'{name} is missing from it'
    elif saved[name] != wanted[name]:
      difference = f'{name} has shape {saved[name]} there but {wanted[name]} here'
    else:
      continue
    raise ModelMismatchError(f'checkpoint step {step} holds another model: {difference}')


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
    # A target on this process's default device: the saving run's topology
    # (several processes or devices) may not exist here.
    # The item's handler, not a StandardCheckpointer: that one looks for a
    # step-level metadata file inside the item and warns that it is missing.
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(manager.directory) / str(step) / VARIABLES_ITEM)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
    return dict(manager.restore(step, args=ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardRestore(target)}))[VARIABLES_ITEM])

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


def _reason(error: Exception, directory: Any) -> str:
  """The first line of `error`, at most 200 characters, with the checkpoint
  directory (already named by the message) written as '...'."""
  lines = str(error).strip().splitlines() or ['']
  first = lines[0].split(' See full TensorStore details')[0]  # a dump of its spec follows
  for form in dict.fromkeys((str(directory), os.path.realpath(str(directory)))):
    first = first.replace(form, '...')
  return f'{type(error).__name__}: {first[:200]}'


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
          f'checkpoint step {step} in {manager.directory} is unreadable '
          f'({_reason(e, manager.directory)}); '
          f'readable steps: {readable or "none"}') from e
  unreadable, errors = [], []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      return read(candidate), candidate, unreadable
    except Exception as e:  # Orbax and TensorStore raise many types
      logging.warning('checkpoint step %d in %s is unreadable (%s); trying the one before',
                      candidate, manager.directory, _reason(e, manager.directory))
      unreadable.append(candidate)
      errors.append(e)
  if errors and all(isinstance(e, ModelMismatchError) for e in errors):
    raise UnreadableCheckpointError(
        f'the checkpoints in {manager.directory} hold another model ({errors[0]}); train '
        'this config in a new --workdir, or resume with the config that trained them')
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


def quiet_failed_restores(previous):
  """A sys.unraisablehook that drops the leftovers of a failed restore. When a
  damaged checkpoint does not read (training falls back to an older one, or
  stops with one line), Orbax abandons its pending reads, and Python would
  print each of their coroutines, and each TensorStore callback into Orbax's
  closed event loop, as an 'Exception ignored' traceback, some after the
  error line. Anything else goes to `previous`."""

  def hook(unraisable) -> None:
    code = getattr(unraisable.object, 'cr_code', None)  # a coroutine's
    error = unraisable.exc_value
    if ((code is not None and '/orbax/' in code.co_filename)
        or (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed')):
      return
    previous(unraisable)

  return hook
