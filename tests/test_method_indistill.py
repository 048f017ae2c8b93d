"""Method 'indistill': the curriculum's phase schedule, the L1 filter pruning
(against a NumPy selection and against the auxiliary with the dropped
filters zeroed), each phase's loss and the nets it trains, a smoke run that
resumes bit-identically at the pruning, and the evaluation report naming the
student."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from ddnn_jax import config_lib, experiment, methods, models, train
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.methods import indistill, nets
from tests import method_runs as runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'indistill.py') + ':smoke'
NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32
STUDENT, PRUNED, AUXILIARY = ('student',), ('pruned',), ('auxiliary',)


def smoke_config(**overrides):
  config = config_lib.load(SMOKE)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> str:
  """A finished run's workdir (an EKD DDNN, randomly initialised, at width 0.25)."""
  config = config_lib.load(os.path.join(ROOT, 'configs', 'default.py') + ':smoke')
  config.model.width_multiplier = 0.25
  return runs.save_run(str(tmp_path_factory.mktemp('teacher')), config, DATA)


# ------------------------------------------------------------------ the schedule


@pytest.mark.parametrize('aux, stages, epochs, spe', [
    (10.0, (1, 2, 3), (3.0, 4.0, 5.0), 390),
    (0.1, (1, 2, 3), (0.023, 0.023, 0.023), 44),
    (2.5, (2, 3), (0.5, 1.5), 7),
])
def test_the_phases_start_where_the_epochs_add_up(aux, stages, epochs, spe):
  config = smoke_config(**{'indistill.aux_epochs': aux, 'indistill.stages': stages,
                           'indistill.stage_epochs': epochs})
  ends = np.cumsum([aux, *epochs])
  expected = [('auxiliary', 0), *((f'stage{s}', int(np.round(e * spe)))
                                  for s, e in zip(stages, ends[:-1])),
              ('final', int(np.round(ends[-1] * spe)))]
  assert list(indistill.phases(config, spe)) == expected


def test_a_phase_shorter_than_a_step_is_refused():
  config = smoke_config(**{'indistill.stage_epochs': (0.023, 0.001, 0.023)})
  with pytest.raises(ValueError, match="phase 'stage2' is shorter than one step at 44 "
                                       'steps per epoch; lengthen indistill.stage_epochs'):
    indistill.phases(config, 44)


# ------------------------------------------------------------------ the pruning


def resnet(width: float, depth=(2, 2, 2)):
  return models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=width,
                             stage_sizes=depth)


def random_variables(model, seed: int) -> dict:
  """Variables with every entry random (BN statistics and affines too)."""
  rng = np.random.default_rng(seed)
  shapes = nets.abstract_variables(model)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.standard_normal(leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def numpy_kept(params: dict, student: dict) -> dict[str, np.ndarray]:
  """The channels kept per group of a CIFAR ResNet (basic blocks), written out:
  stream S<s> is written by the stem (stage 1) or stage s's projection, and by
  every block's conv2; a block's inside by its conv1."""
  def top(score, k):
    return np.sort(np.argsort(-score, kind='stable')[:k])

  def l1(module, conv):
    return np.abs(np.asarray(params[module][conv]['kernel'], np.float64)).sum((0, 1, 2))

  def width(module, conv):
    return student[module][conv]['kernel'].shape[-1]

  blocks = [k for k in params if re.fullmatch(r'stage\d+_block\d+', k)]
  keep = {}
  for s in (1, 2, 3):
    first = ('stem', 'conv') if s == 1 else (f'stage{s}_block0', 'proj_conv')
    writers = [first] + [(b, 'conv2') for b in blocks if b.startswith(f'stage{s}_')]
    # float32 sums in the code, float64 here: the order matches unless two
    # channels tie to within round-off, which random weights do not.
    keep[f'S{s}'] = top(sum(l1(*w) for w in writers), width(*first))
  for b in blocks:
    keep[b] = top(l1(b, 'conv1'), width(b, 'conv1'))
  return keep


def numpy_prune(variables: dict, student: dict) -> dict:
  params, stats = variables['params'], variables['batch_stats']
  keep = numpy_kept(params, student)
  out = {'params': {}, 'batch_stats': {}}

  def put(module, conv, norm, inputs, outputs):
    kernel = np.asarray(params[module][conv]['kernel'])
    if inputs is not None:
      kernel = kernel[:, :, inputs]
    out['params'].setdefault(module, {})[conv] = {'kernel': kernel[..., outputs]}
    for collection, source in (('params', params), ('batch_stats', stats)):
      out[collection].setdefault(module, {})[norm] = {
          k: np.asarray(v)[outputs] for k, v in source[module][norm].items()}

  put('stem', 'conv', 'bn', None, keep['S1'])
  for b in sorted(k for k in params if k.startswith('stage')):
    s, index = map(int, re.fullmatch(r'stage(\d+)_block(\d+)', b).groups())
    inputs = keep[f'S{s - 1}'] if index == 0 and s > 1 else keep[f'S{s}']
    put(b, 'conv1', 'bn1', inputs, keep[b])
    put(b, 'conv2', 'bn2', keep[b], keep[f'S{s}'])
    if 'proj_conv' in params[b]:
      put(b, 'proj_conv', 'proj_bn', inputs, keep[f'S{s}'])
  out['params']['head'] = {'kernel': np.asarray(params['head']['kernel'])[keep['S3']],
                           'bias': np.asarray(params['head']['bias'])}
  return out


def test_l1_pruning_keeps_the_largest_filters_of_each_layer_and_stream():
  auxiliary, student = resnet(0.25), resnet(0.125)
  variables = random_variables(auxiliary, 0)
  target = nets.abstract_variables(student)['params']
  pruned = jax.jit(lambda v: indistill.l1_prune(v, target))(variables)  # as in the step
  runs.assert_trees_equal(jax.device_get(pruned), numpy_prune(variables, target))


def test_the_pruned_net_computes_the_auxiliary_with_the_dropped_filters_zeroed():
  auxiliary, student = resnet(0.25), resnet(0.125)
  variables = random_variables(auxiliary, 1)
  target = nets.abstract_variables(student)['params']
  keep = numpy_kept(variables['params'], target)
  # Zero each dropped filter and its BN scale and bias: in inference mode the
  # channel is then 0 everywhere and adds nothing to the layers after it.
  masked = jax.tree.map(np.array, variables)
  for module, tree in masked['params'].items():
    if module == 'head':
      continue
    s = 1 if module == 'stem' else int(module[5])
    for conv, norm in (('conv', 'bn'), ('conv1', 'bn1'), ('conv2', 'bn2'),
                       ('proj_conv', 'proj_bn')):
      if conv not in tree:
        continue
      kept = keep[module] if conv == 'conv1' else keep[f'S{s}']
      dropped = np.setdiff1d(np.arange(tree[conv]['kernel'].shape[-1]), kept)
      tree[conv]['kernel'][..., dropped] = 0
      tree[norm]['scale'][dropped] = 0
      tree[norm]['bias'][dropped] = 0
  images = np.random.default_rng(2).standard_normal((4, 8, 8, 3)).astype(np.float32)
  full = auxiliary.apply(masked, images, (auxiliary.full_depth,), False,
                         method=auxiliary.forward_depths)[0]
  pruned = student.apply(indistill.l1_prune(variables, target), images,
                         (student.full_depth,), False, method=student.forward_depths)[0]
  for s, (a, b) in enumerate(zip(full.features, pruned.features), start=1):
    np.testing.assert_allclose(np.asarray(a)[..., keep[f'S{s}']], b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(full.logits, pruned.logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- the train step


def batch(seed: int, mesh) -> dict:
  rng = np.random.default_rng(seed)
  return mesh_lib.global_batch({
      'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
      'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}, mesh)


def net(tree: dict, member) -> dict:
  return tree[nets.net_name(member)]


def momentum(state) -> dict:
  return jax.device_get(state.opt_state[1][0].trace)


def expected_loss(exp, variables, b, phase: str) -> float:
  """The phase's loss in float64 from the nets' outputs (train mode; the
  pruned auxiliary in inference mode) and the teacher's."""
  model, teacher, config = exp.model, exp.method.teacher, exp.config
  outputs = model.apply(variables, b['image'], (STUDENT, PRUNED, AUXILIARY), True,
                        method=model.forward_depths, mutable=['batch_stats'])[0]
  student, pruned, auxiliary = outputs
  teacher_logits = teacher.model.apply(teacher.variables, b['image'], teacher.depths, False,
                                       method=teacher.model.forward_depths)[0].logits
  labels = np.asarray(b['label'])
  alpha, t = config.ekd.alpha, config.ekd.temperature
  if phase in ('auxiliary', 'final'):
    logits = auxiliary.logits if phase == 'auxiliary' else student.logits
    return runs.ce(logits, labels) + alpha * runs.kd(teacher_logits, logits, t)
  s = int(phase.removeprefix('stage'))
  diff = (np.asarray(student.features[s - 1], np.float64)
          - np.asarray(pruned.features[s - 1], np.float64))
  return float(np.mean(diff**2))


def test_each_phase_has_its_loss_and_trains_only_its_net(teacher):
  mesh = mesh_lib.create_mesh()
  config = smoke_config(teacher_workdir=teacher, num_epochs=0.7, **{
      'indistill.aux_epochs': 0.2, 'indistill.stage_epochs': (0.1, 0.1, 0.1)})
  exp = experiment.build(config, mesh, DATA)
  schedule = indistill.phases(config, exp.steps_per_epoch)
  assert schedule == (('auxiliary', 0), ('stage1', 2), ('stage2', 3), ('stage3', 4),
                      ('final', 5))
  target = nets.abstract_variables(exp.model.nets[0])['params']
  step = train.make_train_step(exp)
  state = exp.init_state()
  for i in range(7):
    phase_number = max(p for p, (_, start) in enumerate(schedule) if start <= i)
    phase = schedule[phase_number][0]
    b = batch(i, mesh)
    seen = jax.device_get(state.variables)
    if i == 2:  # the step first prunes the auxiliary (trained for two steps)
      expected_pruned = numpy_prune({c: net(t, AUXILIARY) for c, t in seen.items()},
                                    target)
      seen = {c: {**t, nets.net_name(PRUNED): expected_pruned[c]} for c, t in seen.items()}
    expected = expected_loss(exp, seen, b, phase)
    old_momentum = momentum(state)
    state, metrics = step(state, b, *exp.step_args)
    np.testing.assert_allclose(float(metrics['train/loss']), expected, rtol=1e-4)
    assert int(metrics['train/phase']) == phase_number
    new = jax.device_get(state)
    if i == 2:
      runs.assert_trees_equal({c: net(t, PRUNED) for c, t in new.variables.items()},
                            expected_pruned)
    trained = AUXILIARY if phase == 'auxiliary' else STUDENT
    for member in (STUDENT, PRUNED, AUXILIARY):
      for what, a, b_ in (('params', new.params, seen['params']),
                          ('batch_stats', new.batch_stats, seen['batch_stats']),
                          ('momentum', momentum(new), old_momentum)):
        if what == 'momentum' and member == PRUNED and i == 2:
          continue  # restarted at the pruning: zero before and after
        moved = any(not np.array_equal(x, y) for x, y in
                    zip(jax.tree.leaves(net(a, member)), jax.tree.leaves(net(b_, member))))
        assert moved == (member == trained), (i, member, what)


# ------------------------------------------------------------------ a whole run


@pytest.fixture(scope='module')
def smoke_run(teacher, tmp_path_factory):
  """The smoke config: 9 steps; phases start at steps 0, 4, 5, 6 and 7."""
  workdir = str(tmp_path_factory.mktemp('indistill'))
  metrics = train.train_and_evaluate(smoke_config(teacher_workdir=teacher, log_every_steps=1),
                                     workdir)
  return workdir, metrics


def test_the_smoke_run_goes_through_the_curriculum(smoke_run):
  workdir, _ = smoke_run
  phase = runs.read_scalars(workdir, 'train/phase')
  assert phase == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 3, 8: 4, 9: 4}
  for tag, steps in (('train/auxiliary/kd', {1, 2, 3, 4}),
                     ('train/student/mse_stage2', {6}), ('train/student/kd', {8, 9})):
    logged = runs.read_scalars(workdir, tag)
    assert {s for s, v in logged.items() if v != 0} == steps, tag
  at_pruning, _ = runs.variables_at(workdir, 4)
  end, _ = runs.variables_at(workdir)
  target = nets.abstract_variables(resnet(0.125, (1, 1, 1)))['params']
  for collection in ('params', 'batch_stats'):
    runs.assert_trees_equal(net(end[collection], AUXILIARY), net(at_pruning[collection],
                                                               AUXILIARY))
  expected = numpy_prune({c: net(t, AUXILIARY) for c, t in at_pruning.items()}, target)
  runs.assert_trees_equal({c: net(t, PRUNED) for c, t in end.items()}, expected)


def test_a_run_preempted_at_the_pruning_resumes_bit_identically(smoke_run, teacher,
                                                                tmp_path):
  workdir = str(tmp_path)
  # Step 4 is the auxiliary's last: the resumed run's first step prunes it.
  runs.interrupted_run(smoke_config(teacher_workdir=teacher, log_every_steps=1), workdir, 4)
  runs.assert_same_variables(workdir, smoke_run[0])


def test_evaluate_reports_the_student_by_name(smoke_run, capsys):
  workdir, metrics = smoke_run
  assert runs.evaluate_cli('--workdir', workdir) == 0
  printed = capsys.readouterr().out
  assert '(indistill)' in printed and '| student |' in printed
  with open(os.path.join(workdir, 'eval_test.json')) as f:
    result = json.load(f)
  assert [r['depth'] for r in result['depths']] == [['student'], ['pruned'], ['auxiliary']]
  sizes = {}
  for row in result['depths']:
    assert row['top1'] == pytest.approx(metrics[f'{row["depth"][0]}/top1'], abs=1e-6)
    sizes[row['depth'][0]] = row['params']
  shapes = nets.abstract_variables(resnet(0.125, (1, 1, 1)))['params']
  assert sizes['student'] == sizes['pruned'] == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert sizes['auxiliary'] > sizes['student']
  assert result['depths'][2]['agreement'] == 1.0  # the reference


@pytest.mark.parametrize('overrides, message', [
    ({}, r'pass --config.teacher_workdir=DIR, the workdir of a finished run'),
    ({'teacher_workdir': 'TEACHER', 'indistill.stages': (2, 1, 3)},
     r'stages=\(2, 1, 3\) must be increasing stage numbers in 1..3; pass e.g. '
     r'--config.indistill.stages=\(1,2,3\)'),
    ({'teacher_workdir': 'TEACHER', 'indistill.stage_epochs': (1.0, 1.0)},
     r'must be one number > 0 per stage .* --config.indistill.stage_epochs=\(3.0,3.0,3.0\)'),
    ({'teacher_workdir': 'TEACHER', 'indistill.aux_width': 0.5},
     r'indistill.aux_width=0.5 must be a number >= 1 \(the auxiliary is the wider net\)'),
    ({'teacher_workdir': 'TEACHER', 'indistill.student_depth': (1, 1)},
     r'indistill.student_depth: .* --config.indistill.student_depth=\(3,3,3\)'),
    ({'teacher_workdir': 'TEACHER', 'model.bn_mode': 'private_all'},
     r'pass --config.model.bn_mode=shared'),
    ({'teacher_workdir': 'TEACHER', 'num_classes': 7},  # a teacher of other classes
     r'teacher_workdir=.* does not fit .* \(10 classes, this data has 7\)'),
])
def test_bad_fields_are_one_line_errors(teacher, overrides, message):
  if overrides.get('teacher_workdir') == 'TEACHER':
    overrides['teacher_workdir'] = teacher
  num_classes = overrides.pop('num_classes', NUM_CLASSES)
  with pytest.raises(ValueError, match=message) as error:
    methods.create_method(smoke_config(**overrides), num_classes, 44)
  assert '\n' not in str(error.value)
