"""Optimiser and schedules: epochs in the config become the right steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddnn_jax import optim


def config(**optim_fields):
  c = ml_collections.ConfigDict()
  c.num_epochs = 10.0
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
      decay_bn_and_bias=False, schedule='step', warmup_epochs=0.0,
      milestones=(4.0, 8.0), decay_factor=0.1))
  c.optim.update(optim_fields)
  return c


def test_step_schedule_decays_at_milestone_epochs():
  _, schedule = optim.create_optimizer(config(), steps_per_epoch=50)
  lrs = {s: float(schedule(s)) for s in (0, 199, 200, 399, 400, 499)}
  assert lrs == pytest.approx({0: 0.1, 199: 0.1, 200: 0.01, 399: 0.01, 400: 0.001,
                               499: 0.001})


def test_warmup_then_cosine():
  _, schedule = optim.create_optimizer(
      config(schedule='cosine', warmup_epochs=2.0), steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.05)
  assert float(schedule(20)) == pytest.approx(0.1)
  # Cosine over the remaining 80 steps: half-way is half the peak.
  assert float(schedule(60)) == pytest.approx(0.05, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_step_schedule_with_warmup_keeps_milestones_in_epochs():
  _, schedule = optim.create_optimizer(config(warmup_epochs=1.0), steps_per_epoch=10)
  assert float(schedule(5)) == pytest.approx(0.05)
  assert float(schedule(39)) == pytest.approx(0.1)
  assert float(schedule(40)) == pytest.approx(0.01)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match='--config.optim.schedule'):
    optim.create_optimizer(config(schedule='linear'), steps_per_epoch=10)


@pytest.mark.parametrize('decay_bn_and_bias', [False, True])
def test_weight_decay_skips_bn_and_bias_unless_asked(decay_bn_and_bias):
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))},
            'bn': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))},
            'head': {'kernel': jnp.ones((2, 4)), 'bias': jnp.ones((4,))}}
  c = config(schedule='constant', momentum=0.0, weight_decay=0.5,
             decay_bn_and_bias=decay_bn_and_bias)
  tx, _ = optim.create_optimizer(c, steps_per_epoch=10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Plain SGD on a zero gradient: only the decayed leaves move, by lr * wd * p.
  np.testing.assert_allclose(new['conv']['kernel'], 1 - 0.1 * 0.5)
  np.testing.assert_allclose(new['head']['kernel'], 1 - 0.1 * 0.5)
  expected_1d = 1 - 0.1 * 0.5 if decay_bn_and_bias else 1.0
  for leaf in (new['bn']['scale'], new['bn']['bias'], new['head']['bias']):
    np.testing.assert_allclose(leaf, expected_1d)


def test_nesterov_differs_from_heavy_ball():
  params = {'w': jnp.ones((2, 2))}
  grads = {'w': jnp.full((2, 2), 0.5)}
  results = []
  for nesterov in (False, True):
    tx, _ = optim.create_optimizer(
        config(schedule='constant', weight_decay=0.0, nesterov=nesterov), 10)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    updates, state = tx.update(grads, state, params)
    results.append(float(updates['w'][0, 0]))
  # Heavy ball: -lr * (g + 0.9 g); Nesterov: -lr * (g + 0.9 (g + 0.9 g)).
  assert results[0] == pytest.approx(-0.1 * 0.5 * 1.9)
  assert results[1] == pytest.approx(-0.1 * 0.5 * (1 + 0.9 * 1.9))
