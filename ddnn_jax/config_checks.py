"""Up-front checks of a training config: names and ranges no run can use.

`validate(config)` runs before the trainer reads data or writes anything, so a
bad field is a one-line ValueError that names the field and the flag that
fixes it, instead of a crash (or a run that trains until NaN) minutes later.
It reads no data: what depends on the data (split names, sizes, classes) is
checked where the data is listed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import ml_collections

from ddnn_jax import gradients, losses, methods, models, onednn_conv, optim
from ddnn_jax.datasets import sources
from ddnn_jax.preprocessing import AUGMENTATIONS

# Field -> (the test its value must pass, that test in words, an example value).
_RANGES: dict[str, tuple[Any, str, str]] = {
    'optim.learning_rate': (lambda v: v > 0, '> 0', '0.1'),
    'optim.momentum': (lambda v: 0 <= v < 1, 'in [0, 1)', '0.9'),
    'optim.weight_decay': (lambda v: v >= 0, '>= 0', '5e-4'),
    'optim.warmup_epochs': (lambda v: v >= 0, '>= 0', '1.0'),
    'optim.decay_factor': (lambda v: v > 0, '> 0', '0.1'),
    'num_epochs': (lambda v: v > 0, '> 0', '30'),
    'eval_every_epochs': (lambda v: v > 0, '> 0', '1.0'),
    'checkpoint_every_epochs': (lambda v: v > 0, '> 0', '1.0'),
    'model.width_multiplier': (lambda v: v > 0, '> 0', '0.5'),
    'ekd.temperature': (lambda v: v > 0, '> 0', '3.0'),
    'ekd.alpha': (lambda v: v >= 0, '>= 0', '1.0'),
    'ekd.beta': (lambda v: v >= 0, '>= 0', '0.0'),
    'ekd.student_ce': (lambda v: v >= 0, '>= 0', '1.0'),
    'ekd.full_ce': (lambda v: v >= 0, '>= 0', '1.0'),
    'ekd.rampup_epochs': (lambda v: v >= 0, '>= 0', '1.0'),
    'ekd.label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)', '0.1'),
    'ekd.subnet_start_epochs': (lambda v: v >= 0, '>= 0', '15'),
    'optim.min_lr_ratio': (lambda v: 0 <= v <= 1, 'in [0, 1]', '0.05'),
}
# Fields that count something: whole numbers >= 1.
_COUNTS = {'batch_size': '128', 'eval_batch_size': '256', 'log_every_steps': '50',
           'keep_checkpoints': '3', 'data.image_size': '32'}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of a dotted field, or None when an older config lacks it."""
  value = config
  for name in field.split('.'):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or name not in value:
      return None
    value = value[name]
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_choice(config: ml_collections.ConfigDict, field: str,
                  choices: Sequence[str]) -> None:
  value = _get(config, field)
  if value is not None and value not in choices:
    raise ValueError(f'unknown {field} {value!r}; set --config.{field} to one of '
                     f'{", ".join(choices)}')


def _check_range(config: ml_collections.ConfigDict, field: str) -> None:
  test, words, example = _RANGES[field]
  value = _get(config, field)
  if value is None:
    return
  if not (_is_number(value) and math.isfinite(value) and test(value)):
    raise ValueError(f'{field}={value!r} must be a number {words}; pass e.g. '
                     f'--config.{field}={example}')


def _check_count(config: ml_collections.ConfigDict, field: str) -> None:
  value = _get(config, field)
  if value is not None and not (isinstance(value, numbers.Integral)
                                and not isinstance(value, bool) and value >= 1):
    raise ValueError(f'{field}={value!r} must be a whole number >= 1; pass e.g. '
                     f'--config.{field}={_COUNTS[field]}')


def _flag_text(value: Any) -> str:
  return str(value).replace(' ', '')


def _check_depths(config: ml_collections.ConfigDict) -> None:
  """config.depths: a non-empty sequence of depths the preset can hold (or,
  for method 'individual', config.individual_depth: one such depth)."""
  stage_sizes = models.PRESETS[config.model.name].stage_sizes
  full = tuple(stage_sizes)
  if config.method == 'individual':
    value = _get(config, 'individual_depth')
    try:
      models.validate_depth(value, stage_sizes)
    except ValueError as e:
      raise ValueError(f'individual_depth={_flag_text(value)}: {e}; pass e.g. '
                       f'--config.individual_depth={_flag_text(full)}') from None
    return
  value = _get(config, 'depths')
  example = _flag_text(((1,) * len(full), full))
  fix = f'pass e.g. --config.depths={example} (blocks per stage, up to {full})'
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise ValueError(f'depths={value!r} must be a tuple of depths, each a tuple of '
                     f'{len(full)} block counts; {fix}')
  if not value:
    raise ValueError(f'depths={_flag_text(value)} is empty; a run trains at least one '
                     f'depth; {fix}')
  for depth in value:
    try:
      models.validate_depth(depth, stage_sizes)
    except ValueError as e:
      raise ValueError(f'depths={_flag_text(value)}: {e}; {fix}') from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field of `config` that no training run
  can use, and the flag that fixes it. Reads no data and writes nothing."""
  _check_choice(config, 'method', methods.names())
  _check_choice(config, 'model.name', tuple(models.PRESETS))
  _check_choice(config, 'model.bn_mode', (methods.BN_AUTO, *models.BN_MODES))
  _check_choice(config, 'model.head_grad', models.HEAD_GRADS)
  _check_choice(config, 'model.conv_impl', onednn_conv.IMPLS)
  _check_choice(config, 'optim.schedule', optim.SCHEDULES)
  _check_choice(config, 'data.name', sources.DATASETS)
  _check_choice(config, 'data.augment', AUGMENTATIONS)
  _check_choice(config, 'ekd.attention', losses.ATTENTION_KINDS)
  _check_choice(config, 'ekd.stages', losses.STAGE_SETS)
  _check_choice(config, 'grads.surgery', gradients.SURGERIES)
  _check_choice(config, 'grads.groups', gradients.GROUPS)
  for field in _RANGES:
    _check_range(config, field)
  for field in _COUNTS:
    _check_count(config, field)
  _check_depths(config)
