"""MCOD: the on/off schedule, the growing weight, the mean-logit teacher, the
loss and its gradients (against NumPy), the peers as standalone nets, the
config errors, and a smoke run that resumes at a phase boundary and
evaluates every peer and the ensemble by name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax import methods, models, train
from ddnn_jax.methods import mcod
from tests import method_runs as runs

NUM_CLASSES = 10
STEPS_PER_EPOCH = 44  # the digits train split at the smoke batch size 32


def built(**fields):
  return methods.create_method(runs.load('mcod.py', **fields), NUM_CLASSES, STEPS_PER_EPOCH)


def numpy_on(steps: int, period: int, on_steps: int, on_first: bool) -> np.ndarray:
  """The on/off pattern of one period, repeated."""
  one_period = [1.0] * on_steps + [0.0] * (period - on_steps)
  if not on_first:
    one_period.reverse()
  return np.tile(one_period, steps // period + 1)[:steps]


@pytest.mark.parametrize('period, on_steps, on_first', [
    (4, 2, False), (4, 2, True), (5, 1, False), (7, 5, True), (3, 3, False), (3, 0, True)])
def test_the_on_off_schedule_against_numpy(period, on_steps, on_first):
  steps = np.arange(4 * period)
  on = jax.vmap(lambda s: mcod.distill_on(s, period, on_steps, on_first))(steps)
  np.testing.assert_array_equal(on, numpy_on(len(steps), period, on_steps, on_first))


def test_duty_cycle_and_period_come_from_the_config_in_epochs():
  # 0.25 epochs = 11 steps, on for round(0.4 * 11) = 4 of them, after the off part.
  method = built(**{'mcod.period_epochs': 0.25, 'mcod.duty_cycle': 0.4})
  outputs = tuple(models.DepthOutput(jnp.zeros((2, NUM_CLASSES)), ()) for _ in range(4))
  on = [float(method.objective(outputs, jnp.zeros(2, jnp.int32), s)[1]['kd_on'])
        for s in range(30)]
  np.testing.assert_array_equal(on, numpy_on(30, 11, 4, on_first=False))


def numpy_weight(step, start, end, growth_steps, growth, levels):
  if growth == 'linear':
    return start + (end - start) * min(step / growth_steps, 1.0)
  bounds = [growth_steps * k / levels for k in range(1, levels)]  # where a level starts
  level = int(np.searchsorted(bounds, step, side='right'))
  return start + (end - start) * level / (levels - 1)


@pytest.mark.parametrize('growth, levels', [('linear', 4), ('step', 4), ('step', 3),
                                            ('step', 2)])
def test_the_growing_weight_against_numpy(growth, levels):
  start, end, growth_steps = 0.2, 1.4, 30
  for step in range(45):
    np.testing.assert_allclose(
        float(mcod.growing_weight(step, start, end, growth_steps, growth, levels)),
        numpy_weight(step, start, end, growth_steps, growth, levels), rtol=1e-6,
        err_msg=f'step {step}')


@pytest.fixture(scope='module')
def peers():
  """(method, variables, images) of the smoke config's three peers."""
  method = built()
  images = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8, 8, 3)), jnp.float32)
  variables = models.init_variables(method.model, jax.random.key(0), images, method.depths)
  return method, jax.device_get(variables), images


def standalone(arch: str):
  if arch in mcod.VGG_PRESETS:
    return mcod.VGG(*mcod.VGG_PRESETS[arch], NUM_CLASSES, width_multiplier=0.125)
  return models.create_model(arch, NUM_CLASSES, width_multiplier=0.125)


def test_each_peer_is_its_standalone_net_and_the_teacher_is_their_mean(peers):
  method, variables, images = peers
  model = method.model
  assert model.archs == ('cifar_resnet20', 'cifar_resnet32', 'vgg8')
  outputs = model.apply(variables, images, method.depths, method=model.forward_depths)
  alone = []
  for i, arch in enumerate(model.archs):
    net, own = standalone(arch), model.member_variables(variables, (i,))
    alone.append(np.asarray(net.apply(own, images), np.float64))
    np.testing.assert_allclose(outputs[i].logits, alone[-1], rtol=1e-5, atol=1e-6)
    fresh = models.init_variables(net, jax.random.key(1), images)
    assert models.count_params(own['params']) == models.count_params(fresh['params'])
  np.testing.assert_allclose(outputs[-1].logits, np.mean(alone, axis=0), rtol=1e-5, atol=1e-6)
  assert [models.member_name(model, d) for d in method.depths] == [
      'peer1_cifar_resnet20', 'peer2_cifar_resnet32', 'peer3_vgg8', 'ensemble']


def test_the_loss_and_its_gradients_against_numpy():
  names, temperature = ('a', 'b', 'c'), 2.0
  objective = mcod.objective(names, temperature, lambda s: jnp.float32(s % 2),
                             lambda s: jnp.float32(0.5 + s / 10))
  rng = np.random.default_rng(2)
  labels = rng.integers(0, NUM_CLASSES, 5)
  peers = rng.standard_normal((3, 5, NUM_CLASSES)).astype(np.float32) * 3
  mean = peers.mean(axis=0)

  def loss_of(peer_logits, ensemble_logits, step):
    outputs = (*(models.DepthOutput(z, ()) for z in peer_logits),
               models.DepthOutput(ensemble_logits, ()))
    return objective(outputs, labels, step)

  for step in (0, 1, 6, 7):
    loss, terms = loss_of(peers, mean, step)
    scale = (step % 2) * (0.5 + step / 10)
    expected = sum(runs.ce(z, labels) + scale * runs.kd(mean, z, temperature) for z in peers)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms['b/kl']), runs.kd(mean, peers[1], temperature),
                               rtol=1e-5)
    assert float(terms['kd_on']) == step % 2
  # d/dz_i: (softmax(z_i) - onehot) / B + scale * T (softmax(z_i / T) - softmax(z_e / T)) / B;
  # the teacher gets none.
  grad_peers, grad_teacher = jax.grad(lambda p, e: loss_of(p, e, 7)[0], argnums=(0, 1))(
      jnp.asarray(peers), jnp.asarray(mean))
  scale, onehot = 1.2, np.eye(NUM_CLASSES)[labels]
  for z, grad in zip(peers, grad_peers):
    expected = (runs.softmax(z) - onehot + scale * temperature
                * (runs.softmax(z, temperature) - runs.softmax(mean, temperature))) / 5
    np.testing.assert_allclose(grad, expected, atol=1e-6)
  np.testing.assert_array_equal(grad_teacher, 0.0)


@pytest.mark.parametrize('fields, message', [
    ({'mcod.peers': ('cifar_resnet20',)}, r'mcod\.peers=\(.cifar_resnet20.,\) must be a '
                                          r'tuple of at least two of .*vgg8'),
    ({'mcod.peers': ('cifar_resnet20', 'vgg9')}, r'at least two of'),
    ({'mcod.duty_cycle': 1.5}, r'mcod\.duty_cycle=1\.5 must be a number in \[0, 1\]; '
                               r'pass e\.g\. --config\.mcod\.duty_cycle=0\.5'),
    ({'mcod.growth': 'exp'}, r"mcod\.growth='exp' must be one of linear, step"),
    ({'mcod.growth_levels': 0}, r'mcod\.growth_levels=0 must be a whole number >= 1'),
    ({'model.bn_mode': 'private_all'}, r'--config\.model\.bn_mode=shared'),
])
def test_bad_settings_are_one_line_errors_that_name_the_fix(fields, message):
  with pytest.raises(ValueError, match=message) as error:
    built(**fields)
  assert '\n' not in str(error.value)


def test_a_smoke_run_resumes_at_a_phase_boundary_and_evaluates_every_member(tmp_path,
                                                                           capsys):
  # Periods of 4 steps, off for 2 then on for 2: the run stops after step 2,
  # the last off step, and resumes with the first on step.
  config = runs.load('mcod.py', log_every_steps=1)
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  metrics = train.train_and_evaluate(config, whole)
  runs.interrupted_run(config, parts, stop_at=2)
  runs.assert_same_variables(whole, parts)
  on = runs.read_scalars(parts, 'train/kd_on')
  assert [on[s] for s in range(1, 10)] == [0, 0, 1, 1, 0, 0, 1, 1, 0]
  weights = runs.read_scalars(parts, 'train/kd_weight')
  assert weights[1] == 0.0 and all(weights[s] < weights[s + 1] for s in range(1, 9))
  capsys.readouterr()
  assert runs.evaluate_cli('--workdir', whole) == 0
  assert '| member | top-1 |' in capsys.readouterr().out
  with open(os.path.join(whole, 'eval_test.json')) as f:
    rows = json.load(f)['depths']
  assert [r['name'] for r in rows] == [
      'peer1_cifar_resnet20', 'peer2_cifar_resnet32', 'peer3_vgg8', 'ensemble']
  for row in rows:
    assert row['top1'] == pytest.approx(metrics[f'{row["name"]}/top1'], abs=1e-6)
  assert rows[-1]['params'] == sum(r['params'] for r in rows[:-1])
  assert rows[-1]['agreement'] == 1.0  # the ensemble is the reference
