"""SGD with momentum, weight decay and the learning-rate schedules, via optax.

Configs give durations in epochs; `create_optimizer` turns them into steps.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ('cosine', 'step', 'constant')


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(epochs * steps_per_epoch))


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                           num_epochs: float) -> optax.Schedule:
  if optim.schedule not in SCHEDULES:
    raise ValueError(
        f'unknown schedule {optim.schedule!r}; set --config.optim.schedule to one of '
        f'{SCHEDULES}')
  lr = optim.learning_rate
  total = max(1, epochs_to_steps(num_epochs, steps_per_epoch))
  warmup = min(epochs_to_steps(optim.warmup_epochs, steps_per_epoch), total)
  if optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup),
                                       alpha=optim.get('min_lr_ratio', 0.0))
  elif optim.schedule == 'step':
    boundaries = {epochs_to_steps(e, steps_per_epoch) - warmup: optim.decay_factor
                  for e in optim.milestones}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params):
  """True for conv and dense kernels: BN scales/offsets and biases are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """(optax transformation, learning-rate schedule) for `config.optim`."""
  optim = config.optim
  schedule = learning_rate_schedule(optim, steps_per_epoch, config.num_epochs)
  mask = None if optim.decay_bn_and_bias else _decay_mask
  tx = optax.chain(
      optax.add_decayed_weights(optim.weight_decay, mask=mask),
      optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov))
  return tx, schedule
