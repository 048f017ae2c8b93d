"""experiments/depth_diagnostics.py: residual-branch ratios per block."""

import jax
import jax.numpy as jnp
import numpy as np
from test_experiments import _load

from ddnn_jax import models

diagnostics = _load('depth_diagnostics')


def test_residual_ratios_name_the_blocks_a_depth_runs_and_see_a_silent_branch():
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.25,
                              zero_init_residual=True)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  variables = models.init_variables(model, jax.random.key(0), images)
  # Zero-initialised last BatchNorm scale (and zero bias): every branch adds 0.
  ratios = diagnostics.residual_ratios(model, variables, (2, 1, 3), images)
  assert list(ratios) == ['stage1_block0', 'stage1_block1', 'stage2_block0',
                          'stage3_block0', 'stage3_block1', 'stage3_block2']
  assert all(v == 0.0 for v in ratios.values())
  # Wake one block's branch: only its ratio moves, and it is a positive ratio of norms.
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  bn2 = params['stage3_block1']['bn2']
  params['stage3_block1']['bn2'] = {**bn2, 'scale': jnp.ones_like(bn2['scale'])}
  woken = diagnostics.residual_ratios(model, {**variables, 'params': params}, (2, 1, 3), images)
  assert woken['stage3_block1'] > 0.1
  assert all(v == 0.0 for k, v in woken.items() if k != 'stage3_block1')


def test_residual_ratios_read_each_depths_own_norm_layers_under_private_all():
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.25,
                              zero_init_residual=True, bn_mode='private_all')
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  depth = (2, 1, 3)
  variables = models.init_variables(model, jax.random.key(0), images, depths=[depth])
  assert all(v == 0.0 for v in diagnostics.residual_ratios(model, variables, depth,
                                                           images).values())
  tag = models.depth_tag(depth)
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  bn2 = params['stage3_block1'][f'bn2_{tag}']
  params['stage3_block1'][f'bn2_{tag}'] = {**bn2, 'scale': jnp.ones_like(bn2['scale'])}
  woken = diagnostics.residual_ratios(model, {**variables, 'params': params}, depth, images)
  assert woken['stage3_block1'] > 0.1
  assert all(v == 0.0 for k, v in woken.items() if k != 'stage3_block1')


def test_run_names_keep_two_runs_of_the_same_name_apart():
  names = diagnostics.run_names(['/tmp/w1/ekd_s0/', 'docs/models/study30/ekd_s0',
                                 'docs/models/study30/individual_d3_s0'])
  assert names == ['w1/ekd_s0', 'study30/ekd_s0', 'individual_d3_s0']
