"""Post-training BatchNorm re-calibration per depth (ddnn_jax.bn_calibration)."""

import jax
import numpy as np
import pytest

from ddnn_jax import bn_calibration, evaluate, models
from ddnn_jax import mesh as mesh_lib

DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))


def _setup(bn_mode):
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.25, bn_mode=bn_mode)
  rng = np.random.default_rng(0)
  batches = [{'image': (rng.standard_normal((16, 32, 32, 3)) * 2 + 1).astype(np.float32),
              'label': rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
  variables = models.init_variables(model, jax.random.key(0), batches[0]['image'], DEPTHS)
  return model, variables, batches


def _logits(model, variables, images, depth, train):
  out = model.apply(variables, images, (depth,), train, method=model.forward_depths,
                    mutable=['batch_stats'] if train else False)
  return np.asarray((out[0] if train else out)[0].logits)


@pytest.mark.parametrize('bn_mode', models.BN_MODES)
@pytest.mark.parametrize('depth', [(1, 1, 1), (3, 3, 3)])
def test_one_batch_gives_that_batchs_statistics(bn_mode, depth):
  """Re-calibrated on one batch, eval mode normalises that batch exactly as
  train mode (batch statistics) does."""
  model, variables, batches = _setup(bn_mode)
  mesh = mesh_lib.create_mesh()
  recal = bn_calibration.recalibrate(model, variables, depth, batches[:1], mesh, 1)
  images = batches[0]['image']
  train_logits = _logits(model, variables, images, depth, train=True)
  np.testing.assert_allclose(_logits(model, recal, images, depth, train=False),
                             train_logits, atol=2e-4, rtol=1e-4)
  # Before re-calibration (initial statistics 0 / 1) they differ clearly.
  assert np.abs(_logits(model, variables, images, depth, False) - train_logits).max() > 1e-2


def test_statistics_are_the_average_over_batches():
  model, variables, batches = _setup('shared')
  mesh = mesh_lib.create_mesh()
  single = [bn_calibration.recalibrate(model, variables, (2, 2, 2), [b], mesh, 1)
            for b in batches[:2]]
  both = bn_calibration.recalibrate(model, variables, (2, 2, 2), batches, mesh, 2)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, single[0]['batch_stats'],
                          single[1]['batch_stats'])
  for got, want in zip(jax.tree.leaves(both['batch_stats']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_layers_the_depth_does_not_use_keep_their_statistics():
  model, variables, batches = _setup('shared')
  recal = bn_calibration.recalibrate(model, variables, (1, 1, 1), batches[:1],
                                     mesh_lib.create_mesh(), 1)
  before, after = variables['batch_stats'], recal['batch_stats']
  for unused in ('stage1_block1', 'stage2_block2', 'stage3_block1'):
    for a, b in zip(jax.tree.leaves(before[unused]), jax.tree.leaves(after[unused])):
      np.testing.assert_allclose(a, b, atol=1e-6)
  moved = np.abs(np.asarray(after['stage2_block0']['bn1']['mean'])
                 - np.asarray(before['stage2_block0']['bn1']['mean'])).max()
  assert moved > 1e-3


def test_too_few_batches_is_an_error():
  model, variables, batches = _setup('shared')
  with pytest.raises(ValueError, match='only 3 batches .* asked for 5'):
    bn_calibration.recalibrate(model, variables, (1, 1, 1), batches, mesh_lib.create_mesh(), 5)
  with pytest.raises(ValueError, match='num_batches must be >= 1'):
    bn_calibration.recalibrate(model, variables, (1, 1, 1), batches, mesh_lib.create_mesh(), 0)


def test_per_depth_eval_step_matches_the_shared_one():
  model, variables, batches = _setup('shared')
  mesh = mesh_lib.create_mesh()
  batch = {**batches[0], 'mask': np.ones(16, bool)}
  shared = evaluate.evaluate_depths(model, variables, [batch], DEPTHS, mesh)
  step = evaluate.make_eval_step(model, DEPTHS, mesh, per_depth_variables=True)
  separate = evaluate.evaluate_depths(model, (variables,) * 3, [batch], DEPTHS, mesh, step)
  assert separate.keys() == shared.keys()
  for key in shared:
    assert separate[key] == pytest.approx(shared[key], abs=1e-5), key
