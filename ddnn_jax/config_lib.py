"""Configs for library callers (tests, benchmarks, experiment scripts).

Entry points take `--config FILE --config.FIELD=VALUE` through ml_collections'
config_flags; these functions read a config file and apply 'FIELD=VALUE'
overrides with that same machinery, so a value parses the same way in a script
as on a command line:

  config = config_lib.load('configs/cifar10_folder.py:smoke', ['method=joint_ce'])
  config_lib.apply_overrides(config, ['model.width_multiplier=0.5'])
  config = config_lib.load_saved(workdir)  # the run's config.json

Config files import `from configs import base`, so the repository root must be
importable: run from it (as `python -m ...` and the tests do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags


def describe_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a bad `--config` among `argv`: a flag error, a config file
  that failed to load (OSError) or raised (its last traceback line), or an
  override of an unknown field or of the wrong type."""
  lines = str(error).strip().splitlines() or [repr(error)]
  if isinstance(error, OSError):
    return (f'could not load the --config file: {lines[-1].strip()}; pass one of '
            'configs/*.py, e.g. --config configs/default.py')
  if isinstance(error, flags.Error):
    # config_flags puts the config file's whole traceback into the message.
    return lines[-1].strip() if 'Traceback' in str(error) else ' '.join(lines)
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  return (f'bad config override {error} among {overrides}: every field and its type is '
          'in configs/base.py (e.g. --config.optim.learning_rate, not '
          '--config.learning_rate)')


def _parse(argv: list[str], define) -> ml_collections.ConfigDict:
  """Parses `argv` on a fresh FlagValues with the config flag `define` makes;
  config_flags reads the overrides from `argv` then, not from sys.argv."""
  values = flags.FlagValues()
  try:
    define(values, argv)
    values(argv)
    values.config.get('method')  # a config file that failed to load raises here
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(describe_error(e, argv)) from e
  except OSError as e:
    raise FileNotFoundError(describe_error(e, argv)) from e
  return values.config


def _check_items(items: Sequence[str]) -> None:
  for item in items:
    if '=' not in item:
      raise ValueError(f'override {item!r} is not FIELD=VALUE (e.g. model.width_multiplier=0.5)')


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `path` ('file.py' or 'file.py:arg') with 'FIELD=VALUE'
  `overrides` applied, as `--config path --config.FIELD=VALUE` gives it."""
  if not os.path.exists(path.partition(':')[0]):
    raise FileNotFoundError(f'config file {path.partition(":")[0]} does not exist')
  _check_items(overrides)
  argv = ['config_lib', f'--config={path}', *(f'--config.{item}' for item in overrides)]
  return _parse(argv, lambda values, argv: config_flags.DEFINE_config_file(
      'config', flag_values=values, lock_config=False, sys_argv=argv))


def apply_overrides(config: ml_collections.ConfigDict, items: Sequence[str]) -> None:
  """Sets 'FIELD=VALUE' `items` on `config` in place (FIELD dotted, VALUE parsed
  for the field's type, as `--config.FIELD=VALUE` is)."""
  _check_items(items)
  if items:
    argv = ['config_lib', *(f'--config.{item}' for item in items)]
    _parse(argv, lambda values, argv: config_flags.DEFINE_config_dict(
        'config', config, flag_values=values, lock_config=False, sys_argv=argv))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (train.save_config)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist; pass the workdir of a training run or --config FILE')
  # JSON turned the config's tuples into lists; tuples again, so that overrides
  # of those fields parse as on the config file.
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
