"""The DDNN variants that aim to keep the full net's accuracy (docs/RESULTS.md,
"Keeping the full net"): label smoothing of the full net, the cosine floor,
delayed sub-nets (the objective and the solo phase of the step), gradient
rules (projection, equilibrium, measurement) and the warm start, each against
a NumPy reference or a second computation written here, and a smoke run with
all of them that resumes bit-identically across the sub-nets' start."""

from __future__ import annotations

import os
import re
import sys

import jax
import numpy as np
import pytest

from ddnn_jax import (
  config_checks,
  config_lib,
  experiment,
  gradients,
  losses,
  methods,
  models,
  optim,
  subnets,
  train,
)
from ddnn_jax import mesh as mesh_lib
from tests import method_runs as runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32
DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
FULL = (3, 3, 3)


def smoke_config(name: str = 'default', **overrides):
  config = config_lib.load(os.path.join(ROOT, 'configs', name + '.py') + ':smoke')
  config.update_from_flattened_dict(overrides)
  return config


def batch(seed: int, mesh) -> dict:
  rng = np.random.default_rng(seed)
  return mesh_lib.global_batch({
      'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
      'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}, mesh)


def flat(tree, prefix=()) -> dict:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, (*prefix, key)).items()}
  return {'/'.join(prefix): np.asarray(tree)}


# ------------------------------------------------------------ loss and schedule


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_label_smoothing_matches_numpy(eps):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((16, 10)) * 3
  labels = rng.integers(0, 10, 16)
  targets = (1 - eps) * np.eye(10)[labels] + eps / 10
  want = float(-(targets * runs.log_softmax(logits)).sum(-1).mean())
  got = losses.cross_entropy(logits.astype(np.float32), labels, label_smoothing=eps)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_label_smoothing_reaches_the_full_nets_loss_only():
  rng = np.random.default_rng(1)
  outputs = [models.DepthOutput(rng.standard_normal((8, 10)).astype(np.float32), ())
             for _ in DEPTHS]
  labels = rng.integers(0, 10, 8)
  config = losses.EKDConfig(alpha=0.0, beta=0.0, label_smoothing=0.2)
  total, terms = losses.ekd_loss(outputs, DEPTHS, labels, FULL, config)
  targets = 0.8 * np.eye(10)[labels] + 0.02
  full = float(-(targets * runs.log_softmax(outputs[2].logits)).sum(-1).mean())
  subs = sum(runs.ce(o.logits, labels) for o in outputs[:2])
  assert float(total) == pytest.approx(full + subs, rel=1e-5)
  assert float(terms['d3-3-3/ce']) == pytest.approx(runs.ce(outputs[2].logits, labels),
                                                    rel=1e-5)  # reported plain
  assert float(terms['d3-3-3/ce_smoothed']) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize('floor', [0.0, 0.05])
def test_cosine_schedule_keeps_its_floor(floor):
  config = smoke_config(**{'optim.min_lr_ratio': floor, 'optim.learning_rate': 0.2,
                           'num_epochs': 10.0})
  schedule = optim.learning_rate_schedule(config.optim, 10, config.num_epochs)
  for step in (0, 17, 50, 99, 100, 150):
    t = min(step, 100) / 100
    want = 0.2 * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * t)))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------ delayed sub-nets


def test_delayed_subnets_objective_matches_numpy():
  # start at epoch 0.2 (step 2), the sub-nets' losses ramp in over 0.3 (3 steps)
  config = smoke_config(**{'ekd.subnet_start_epochs': 0.2, 'ekd.rampup_epochs': 0.3,
                           'ekd.temperature': 2.0})
  method = methods.create_method(config, NUM_CLASSES, 10)
  assert method.solo_steps == 2
  rng = np.random.default_rng(2)
  outputs = tuple(models.DepthOutput(rng.standard_normal((8, 10)).astype(np.float32),
                                     (rng.standard_normal((8, 4, 4, 2), np.float32),) * 3)
                  for _ in DEPTHS)
  labels = rng.integers(0, 10, 8)
  for step in (0, 1, 2, 3, 4, 5, 9):
    scale = 0.0 if step < 2 else runs.sigmoid_rampup(step - 2, 3)
    subs = sum(runs.ce(o.logits, labels) + runs.kd(outputs[2].logits, o.logits, 2.0)
               for o in outputs[:2])
    want = runs.ce(outputs[2].logits, labels) + scale * subs
    loss, terms = method.objective(outputs, labels, np.int32(step))
    assert float(loss) == pytest.approx(want, rel=1e-5), step
    assert float(terms['subnet_scale']) == pytest.approx(scale, abs=1e-7)


def test_a_solo_step_trains_the_full_net_as_if_alone():
  mesh = mesh_lib.create_mesh()
  fields = {'num_epochs': 1.0, 'ekd.rampup_epochs': 0.0}  # a learning rate > 0 at step 3
  delayed = experiment.build(smoke_config(**fields, **{'ekd.subnet_start_epochs': 0.2}),
                             mesh, DATA)
  alone = experiment.build(smoke_config(**fields, depths=(FULL,)), mesh, DATA)
  state, alone_state = delayed.init_state(), alone.init_state()
  before = flat(jax.device_get(state.variables))
  shared = flat(jax.device_get(alone_state.variables))
  assert set(shared) < set(before)  # the full net's arrays, named alike
  for name, value in shared.items():
    np.testing.assert_array_equal(before[name], value, err_msg=name)
  state, metrics = train.make_train_step(delayed)(state, batch(0, mesh))
  alone_state, _ = train.make_train_step(alone)(alone_state, batch(0, mesh))
  after, alone_after = flat(jax.device_get(state.variables)), flat(
      jax.device_get(alone_state.variables))
  for name, value in before.items():
    if name in alone_after:  # the full net's: as if trained alone
      np.testing.assert_allclose(after[name], alone_after[name], rtol=1e-5, atol=1e-6,
                                 err_msg=name)
      changed = name.startswith('params') and not np.array_equal(after[name], value)
      assert changed or not name.startswith('params/stage3_block2/conv'), name
    else:  # a sub-net's own norm layers: untouched
      np.testing.assert_array_equal(after[name], value, err_msg=name)
  assert float(metrics['train/subnets_on']) == 0.0
  state, metrics = train.make_train_step(delayed)(state, batch(1, mesh))
  state, metrics = train.make_train_step(delayed)(state, batch(2, mesh))  # step 3: all
  assert float(metrics['train/subnets_on']) == 1.0
  moved = flat(jax.device_get(state.variables))
  assert not np.array_equal(moved['params/stem/bn_d1-1-1/scale'],
                            before['params/stem/bn_d1-1-1/scale'])


# ------------------------------------------------------------ gradient rules


def test_users_count_the_depths_that_run_each_weight():
  model = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125,
                              bn_mode='private_all')
  params = models.init_variables(model, jax.random.key(0), np.zeros((1, 8, 8, 3)),
                                 DEPTHS)['params']
  counts = flat(gradients.users(params, DEPTHS))
  want = {'stem/conv/kernel': 3, 'stage1_block0/conv1/kernel': 3,
          'stage2_block1/conv2/kernel': 2, 'stage3_block2/conv1/kernel': 1,
          'stage1_block0/bn1_d1-1-1/scale': 1, 'stage2_block1/bn1_d2-2-2/bias': 1,
          'stem/bn_d3-3-3/scale': 1, 'head/kernel': 3, 'head/bias': 3}
  for name, n in want.items():
    assert int(counts[name]) == n, name


def numpy_combine(g_full: dict, g_sub: dict, counts: dict, project: bool, groups: str,
                  equilibrium: bool) -> dict:
  """The rule on flat {name: array} dicts, written again with NumPy."""
  def group(name):
    return 'all' if groups == 'global' else re.match(r'[a-z]+\d*', name).group(0)

  out = {k: g_full[k] + g_sub[k] for k in g_full}
  if project:
    names = {group(k) for k in g_full if counts[k] > 1}
    for grp in names:
      keys = [k for k in g_full if counts[k] > 1 and group(k) == grp]
      dot = sum(float((g_sub[k].astype(np.float64) * g_full[k]).sum()) for k in keys)
      ff = sum(float((g_full[k].astype(np.float64) ** 2).sum()) for k in keys)
      if dot < 0:
        for k in keys:
          out[k] = g_full[k] + g_sub[k] - dot / ff * g_full[k]
  if equilibrium:
    out = {k: v / counts[k] for k, v in out.items()}
  return out


@pytest.mark.parametrize('project, groups, equilibrium', [
    (True, 'stage', False), (True, 'global', False), (False, 'stage', True),
    (True, 'stage', True), (False, 'stage', False)])
def test_gradient_rules_match_numpy(project, groups, equilibrium):
  model = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125,
                              bn_mode='private_all')
  params = models.init_variables(model, jax.random.key(0), np.zeros((1, 8, 8, 3)),
                                 DEPTHS)['params']
  rng = np.random.default_rng(3)
  g_full = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  # The sub-nets' gradient: opposed to the full net's on stage 2, random elsewhere.
  g_sub = jax.tree_util.tree_map_with_path(
      lambda path, g: (-0.5 * g if 'stage2' in str(path[0])
                       else rng.standard_normal(g.shape).astype(np.float32)), g_full)
  rule = gradients.GradientRule(project=project, groups=groups, equilibrium=equilibrium)
  got, metrics = gradients.combine(rule, g_full, g_sub, params, DEPTHS)
  counts = {k: int(v) for k, v in flat(gradients.users(params, DEPTHS)).items()}
  want = numpy_combine(flat(g_full), flat(g_sub), counts, project, groups, equilibrium)
  got = flat(jax.device_get(got))
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  if groups == 'stage':
    assert float(metrics['grads/cos_stage2']) == pytest.approx(-1.0, abs=1e-5)
    if project:
      assert float(metrics['grads/projected_stage2']) == 1.0


def test_measuring_the_cosines_changes_no_update():
  mesh = mesh_lib.create_mesh()
  plain = experiment.build(smoke_config(), mesh, DATA)
  measured = experiment.build(smoke_config(**{'grads.surgery': 'measure'}), mesh, DATA)
  a, _ = train.make_train_step(plain)(plain.init_state(), batch(0, mesh))
  b, metrics = train.make_train_step(measured)(measured.init_state(), batch(0, mesh))
  for name, value in flat(jax.device_get(a.params)).items():
    np.testing.assert_allclose(flat(jax.device_get(b.params))[name], value, rtol=1e-5,
                               atol=1e-7, err_msg=name)
  for group in ('stem', 'stage1', 'stage2', 'stage3', 'head'):
    assert -1.0 <= float(metrics[f'train/grads/cos_{group}']) <= 1.0


# ------------------------------------------------------------ warm start


def test_fill_from_standalone_inverts_extract_subnet():
  model = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125,
                              bn_mode='private_all')
  images = np.zeros((1, 8, 8, 3), np.float32)
  target = models.init_variables(model, jax.random.key(0), images, DEPTHS)
  standalone = models.init_variables(model.clone(bn_mode='shared'), jax.random.key(1),
                                     images, (FULL,))
  filled = subnets.fill_from_standalone(target, standalone)
  runs.assert_trees_equal(jax.device_get(subnets.extract_subnet(filled, FULL)),
                          jax.device_get(standalone))
  for depth in DEPTHS[:2]:  # each depth's norms: copies of the full net's
    runs.assert_trees_equal(jax.device_get(subnets.extract_subnet(filled, depth)),
                            jax.device_get(subnets.extract_subnet(standalone, depth)))
  with pytest.raises(ValueError, match=r'params/stem/conv/kernel is \(3, 3, 3, 2\) here'):
    wider = models.init_variables(model.clone(width_multiplier=0.25, bn_mode='shared'),
                                  jax.random.key(1), images, (FULL,))
    subnets.fill_from_standalone(target, wider)


def individual_run(tmp_path) -> str:
  return runs.save_run(str(tmp_path / 'individual'), smoke_config(method='individual'), DATA)


def test_a_warm_start_loads_the_individual_net_into_every_depth(tmp_path):
  source = individual_run(tmp_path)
  exp = experiment.build(smoke_config(init_from=source), mesh_lib.create_mesh(), DATA)
  state = methods.apply_transitions(exp.method, exp.tx, exp.init_state(), exp.step_args)
  loaded, _ = runs.variables_at(source)
  for depth in DEPTHS:
    runs.assert_trees_equal(jax.device_get(subnets.extract_subnet(state.variables, depth)),
                            subnets.extract_subnet(loaded, depth))
  # Evaluation builds the method without the schedule and reads no other run.
  assert methods.create_method(smoke_config(init_from='/gone'), NUM_CLASSES).teacher is None


def test_a_run_with_every_fix_resumes_bit_identically_across_the_subnets_start(tmp_path):
  source = individual_run(tmp_path)
  fields = {'init_from': source, 'ekd.subnet_start_epochs': 0.1,  # step 4 of 9
            'ekd.label_smoothing': 0.1, 'optim.min_lr_ratio': 0.05,
            'grads.surgery': 'project', 'log_every_steps': 1}
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  train.train_and_evaluate(smoke_config(**fields), whole)
  runs.interrupted_run(smoke_config(**fields), parts, 4)  # the resumed run starts them
  runs.assert_same_variables(whole, parts)
  on = runs.read_scalars(whole, 'train/subnets_on')
  assert on == {s: float(s > 4) for s in range(1, 10)}


@pytest.mark.parametrize('overrides, message', [
    ({'grads.surgery': 'pcgrad'}, r"unknown grads.surgery 'pcgrad'; set "
                                  r'--config.grads.surgery to one of none, measure, project'),
    ({'grads.groups': 'block'}, r'--config.grads.groups to one of stage, global'),
    ({'ekd.label_smoothing': 1.0}, r'ekd.label_smoothing=1.0 must be a number in \[0, 1\)'),
    ({'ekd.subnet_start_epochs': -1.0}, r'ekd.subnet_start_epochs=-1.0 must be a number'),
    ({'optim.min_lr_ratio': 2.0}, r'optim.min_lr_ratio=2.0 must be a number in \[0, 1\]'),
])
def test_bad_fields_are_one_line_errors(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    config_checks.validate(smoke_config(**overrides))
  assert '\n' not in str(error.value)


def test_any_depth_training_refuses_the_delayed_start():
  config = smoke_config(**{'any_depth.k': 2, 'model.bn_mode': 'shared',
                           'ekd.subnet_start_epochs': 1.0})
  with pytest.raises(ValueError, match=r'--config.ekd.subnet_start_epochs=0'):
    methods.create_method(config, NUM_CLASSES, 10)


def test_the_objective_checks_find_summed_losses_and_one_weight_decay():
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import objective_checks

  mesh = mesh_lib.create_mesh()
  exp = experiment.build(smoke_config(), mesh, DATA)
  result = objective_checks.check(exp, batch(0, mesh))
  assert result['loss_over_sum_of_depth_losses'] == pytest.approx(1.0, abs=1e-6)
  assert result['grad_over_sum_of_depth_grads'] == pytest.approx(1.0, abs=1e-5)
  assert result['weight_decay_multiplier'] == pytest.approx(1.0, abs=1e-3)
