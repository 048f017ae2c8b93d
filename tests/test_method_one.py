"""ONE: the gate, the gated ensemble, the loss (against NumPy), the deployed
branch, the config errors, and a smoke run that resumes across the end of the
KD ramp-up and evaluates every branch and the ensemble by name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax import methods, models, train
from ddnn_jax.methods import one
from tests import method_runs as runs

NUM_CLASSES = 10


def built(**fields):
  return methods.create_method(runs.load('one.py', **fields), NUM_CLASSES, 10)


@pytest.fixture(scope='module')
def net():
  """(method, variables with a non-trivial gate, images)."""
  method = built()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((6, 8, 8, 3)), jnp.float32)
  variables = jax.device_get(models.init_variables(method.model, jax.random.key(0), images,
                                                   method.depths))
  # Gate weights and statistics away from their initial values.
  gate_params, gate_stats = variables['params']['gate'], variables['batch_stats']['gate']
  for tree, names in ((gate_params['dense'], ('kernel', 'bias')),
                      (gate_params['bn'], ('scale', 'bias')), (gate_stats['bn'], ('mean',))):
    for name in names:
      tree[name] = rng.standard_normal(tree[name].shape).astype(np.float32)
  gate_stats['bn']['var'] = rng.uniform(0.5, 2.0, gate_stats['bn']['var'].shape).astype(
      np.float32)
  return method, variables, images


def numpy_gate(trunk, dense, bn, mean=None, var=None):
  """softmax(relu(BN(dense(mean_hw(trunk))))); batch statistics when mean is None."""
  x = np.asarray(trunk, np.float64).mean(axis=(1, 2)) @ dense['kernel'] + dense['bias']
  if mean is None:
    mean, var = x.mean(0), x.var(0)
  x = (x - mean) / np.sqrt(var + 1e-5) * bn['scale'] + bn['bias']
  return runs.softmax(np.maximum(x, 0.0))


@pytest.mark.parametrize('train_mode', [False, True])
def test_the_gate_and_the_gated_ensemble_against_numpy(net, train_mode):
  method, variables, images = net
  model = method.model
  outputs = model.apply(variables, images, method.depths, train_mode,
                        method=model.forward_depths, mutable=['batch_stats'])[0]
  *branches, ensemble = outputs
  params, stats = variables['params']['gate'], variables['batch_stats']['gate']['bn']
  trunk = ensemble.features[-1]  # the input of the last stage
  np.testing.assert_array_equal(trunk, branches[0].features[-2])
  expected = numpy_gate(trunk, params['dense'], params['bn'],
                        *((None, None) if train_mode else (stats['mean'], stats['var'])))
  np.testing.assert_allclose(ensemble.gate, expected, rtol=1e-4, atol=1e-6)
  assert expected.std(axis=1).max() > 0.05  # the gate is not uniform here
  ensemble_logits = np.einsum('bm,mbc->bc', expected,
                              np.stack([np.asarray(b.logits, np.float64) for b in branches]))
  np.testing.assert_allclose(ensemble.logits, ensemble_logits, rtol=1e-4, atol=1e-5)


def test_the_loss_against_numpy_and_the_teacher_gets_no_kd_gradient():
  m, temperature, kd_weight, ramp = 3, 3.0, 1.5, 8
  objective = one.objective(m, temperature, kd_weight, ramp, 1.0)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, NUM_CLASSES, 5)
  branch_logits = rng.standard_normal((m, 5, NUM_CLASSES)).astype(np.float32) * 3
  gate = runs.softmax(rng.standard_normal((5, m))).astype(np.float32)
  ensemble_logits = np.einsum('bm,mbc->bc', gate, branch_logits).astype(np.float32)

  def outputs(branch, ensemble):
    return (*(models.DepthOutput(z, ()) for z in branch),
            one.GatedOutput(ensemble, (), jnp.asarray(gate)))

  for step in (0, 3, 8, 20):
    loss, terms = objective(outputs(branch_logits, ensemble_logits), labels, step)
    w = kd_weight * runs.sigmoid_rampup(step, ramp)
    expected = runs.ce(ensemble_logits, labels) + sum(
        runs.ce(z, labels) + w * runs.kd(ensemble_logits, z, temperature)
        for z in branch_logits)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms['kd_scale']), w, rtol=1e-6)
    np.testing.assert_allclose(float(terms['branch2/kl']),
                               runs.kd(ensemble_logits, branch_logits[1], temperature),
                               rtol=1e-5)
    np.testing.assert_allclose(float(terms['gate/branch3']), gate[:, 2].mean(), rtol=1e-6)
  # The ensemble's gradient is its cross-entropy's alone: (softmax - onehot) / B.
  grad = jax.grad(lambda e: objective(outputs(branch_logits, e), labels, 20)[0])(
      jnp.asarray(ensemble_logits))
  onehot = np.eye(NUM_CLASSES)[labels]
  np.testing.assert_allclose(grad, (runs.softmax(ensemble_logits) - onehot) / 5, atol=1e-6)


def test_branch_one_with_the_trunk_is_the_standalone_resnet(net):
  method, variables, images = net
  model = method.model
  alone = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125)
  deployed = model.member_variables(variables, (0,))
  expected = alone.apply(deployed, images)  # loads in the standalone layout, or fails
  np.testing.assert_allclose(model.apply(variables, images, (0,)), expected, rtol=1e-5,
                             atol=1e-6)
  standalone = models.init_variables(alone, jax.random.key(1), images)
  assert (models.count_params(deployed['params'])
          == models.count_params(standalone['params']))
  assert [models.member_name(model, d) for d in method.depths] == [
      'branch1', 'branch2', 'branch3', 'ensemble']
  assert method.depths[-1] == model.full_depth == (3,)


@pytest.mark.parametrize('fields, message', [
    ({'one.branches': 1}, r'one\.branches=1 must be a whole number >= 2; pass e\.g\. '
                          r'--config\.one\.branches=3'),
    ({'one.temperature': 0.0}, r'one\.temperature=0\.0 must be a number > 0'),
    ({'one.rampup_epochs': -1.0}, r'one\.rampup_epochs=-1\.0 must be a number >= 0'),
    ({'model.bn_mode': 'private_stats'}, r'--config\.model\.bn_mode=shared'),
])
def test_bad_settings_are_one_line_errors_that_name_the_fix(fields, message):
  with pytest.raises(ValueError, match=message) as error:
    built(**fields)
  assert '\n' not in str(error.value)


def test_a_smoke_run_resumes_across_the_rampup_end_and_evaluates_every_member(tmp_path,
                                                                              capsys):
  # The ramp-up ends after 4 steps (0.1 epochs); the run stops at step 3 and
  # resumes, so that the resumed part crosses the end of the ramp-up.
  config = runs.load('one.py', **{'one.rampup_epochs': 0.1, 'log_every_steps': 1})
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  metrics = train.train_and_evaluate(config, whole)
  runs.interrupted_run(config, parts, stop_at=3)
  runs.assert_same_variables(whole, parts)
  scales = runs.read_scalars(parts, 'train/kd_scale')
  assert scales[3] < 1.0 and scales[5] == 1.0
  assert set(runs.read_scalars(parts, 'train/branch2/kl')) == set(range(1, 10))
  capsys.readouterr()
  assert runs.evaluate_cli('--workdir', whole) == 0
  assert '| member | top-1 |' in capsys.readouterr().out
  with open(os.path.join(whole, 'eval_test.json')) as f:
    rows = json.load(f)['depths']
  assert [r['name'] for r in rows] == ['branch1', 'branch2', 'branch3', 'ensemble']
  for row in rows:
    assert row['top1'] == pytest.approx(metrics[f'{row["name"]}/top1'], abs=1e-6)
  assert rows[0]['params'] == rows[1]['params'] < rows[3]['params']
  assert rows[0]['flops'] < rows[3]['flops']
  assert rows[3]['agreement'] == 1.0  # the ensemble is the reference
  # Each member's BatchNorm statistics re-estimated alone (the gate's by the ensemble).
  assert runs.evaluate_cli('--workdir', whole, '--recalibrate_bn', '2') == 0
  with open(os.path.join(whole, 'eval_test_bnrecal2.json')) as f:
    assert [r['name'] for r in json.load(f)['depths']] == [r['name'] for r in rows]
