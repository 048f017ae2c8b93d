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

import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags


def config_argument(argv: Sequence[str]) -> str | None:
  """The --config argument as given (`file.py:ARG`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _hint_config(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """The --config file's config (without overrides) for a hint, or None."""
  file_arg = config_argument(argv)
  if not file_arg:
    return None
  path, _, arg = file_arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_ddnn_config', path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001 -- only a hint: without it the message stands
    return None


def override_error(error: Exception, argv: Sequence[str],
                   config: ml_collections.ConfigDict | None = None) -> str:
  """One line for an override of an unknown or misplaced field among `argv`,
  suggesting the fields of `config` (default: the --config file's) whose last
  part is the name that failed."""
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  quoted = re.search(r"""["']([^"']+)["']""", str(error))
  name = quoted.group(1) if quoted else ''
  culprits = [o for o in overrides if name in o.split('.')] or overrides
  config = config if config is not None else _hint_config(argv)
  known = []
  if name and config is not None:
    from flax import traverse_util  # noqa: PLC0415 -- main sets XLA_FLAGS before jax loads
    flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
    known = [f'--config.{f}' for f in sorted(flat) if f.split('.')[-1] == name]
  fix = f'did you mean {" or ".join(known)}? ' if known else ''
  return (f'unknown config field {", ".join(culprits) or error}: {fix}every field '
          'and its type is in configs/base.py')


def describe_error(error: Exception, argv: Sequence[str],
                   config: ml_collections.ConfigDict | None = None) -> str:
  """One line for a bad `--config` among `argv`: a flag error, a config file
  that failed to load (OSError) or raised (its last traceback line), or an
  override of an unknown field or of the wrong type (`config`: the config the
  overrides apply to, for a hint)."""
  lines = str(error).strip().splitlines() or [repr(error)]
  if isinstance(error, OSError):
    return (f'could not load the --config file: {lines[-1].strip()}; pass one of '
            'configs/*.py, e.g. --config configs/default.py')
  if isinstance(error, flags.Error):
    # config_flags puts the config file's whole traceback into the message.
    return lines[-1].strip() if 'Traceback' in str(error) else ' '.join(lines)
  return override_error(error, argv, config)


def _parse(argv: list[str], define,
           hints: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Parses `argv` on a fresh FlagValues with the config flag `define` makes;
  config_flags reads the overrides from `argv` then, not from sys.argv."""
  values = flags.FlagValues()
  try:
    define(values, argv)
    values(argv)
    values.config.get('method')  # a config file that failed to load raises here
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(describe_error(e, argv, hints)) from e
  except OSError as e:
    raise FileNotFoundError(describe_error(e, argv, hints)) from e
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
        'config', config, flag_values=values, lock_config=False, sys_argv=argv), config)


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (workdir_lib.save_config)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist; pass the workdir of a training run or --config FILE')
  # JSON turned the config's tuples into lists; tuples again, so that overrides
  # of those fields parse as on the config file.
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
