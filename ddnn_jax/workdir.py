"""A run's workdir: whether it can hold a run, and whether it belongs to the config.

A workdir holds one run: config.json (written by `save_config`), checkpoints and
logs. `check_workdir` refuses a path that cannot be written before anything is
trained; `check_config` refuses to resume a workdir's checkpoints under a
config that would change the state, naming the fields.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util

from ddnn_jax import checkpointing


class WorkdirError(OSError):
  """The workdir cannot hold a run: a file in the way, or no permission to write."""


# Fields a run may change when it resumes: durations, cadences, where the data
# lives and how it is read. Every other field shapes the state or its updates.
SAFE_TO_CHANGE = ('num_epochs', 'log_every_steps', 'eval_every_epochs',
                  'checkpoint_every_epochs', 'keep_checkpoints', 'eval_batch_size',
                  'skip_nonfinite_steps', 'model.conv_impl', 'data.root', 'data.data_dir',
                  'data.prefetch', 'data.decode_once', 'data.cache', 'data.eval_split')


def _flat(config_json: str) -> dict:
  return traverse_util.flatten_dict(json.loads(config_json), sep='.')


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir belongs to its config: raises ValueError listing the fields that
  differ from the saved config.json in a way that changes the state (only when
  the workdir holds checkpoints); logs the safe changes. Fields on one side
  only (a config written by another version of the code) are not compared."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists() or not checkpointing.has_checkpoints(workdir):
    return
  old, new = _flat(path.read_text()), _flat(config.to_json_best_effort())
  changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
  unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
  if unsafe:
    fields = ', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in unsafe)
    raise ValueError(
        f'{workdir} holds checkpoints of another config ({fields}); use a new --workdir, '
        f'or resume with the config saved in {path}')
  if changed:
    logging.info('resuming with changed settings: %s',
                 ', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed))


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError naming the path in the way when `workdir` cannot be
  created or written: part of it is a file, or this process may not write
  there (a read-only file system, permissions). Remote paths (gs://...) are
  left to their first write."""
  if '://' in workdir:
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):  # the deepest part that exists
    existing = os.path.dirname(existing)
  where = f'--workdir {workdir}' + ('' if existing == path else f': {existing}')
  if not os.path.isdir(existing):
    raise WorkdirError(f'{where} is a file ({os.strerror(errno.ENOTDIR)}); pass a '
                       'directory, or a path that does not exist yet')
  if not os.access(existing, os.W_OK | os.X_OK):
    code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    raise WorkdirError(f'{where} is not writable ({os.strerror(code)}); make it '
                       'writable or pass another --workdir')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json (after check_config has accepted `config`)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
