"""Offline KD: the frozen teacher from another workdir, the loss of a train
step (against NumPy), the user errors, and a smoke run that resumes across
the end of the KD ramp-up and evaluates the student."""

import json
import os

import jax
import numpy as np
import pytest

from ddnn_jax import checkpointing, experiment, methods, models, train
from ddnn_jax import mesh as mesh_lib
from ddnn_jax import workdir as workdir_lib
from tests import method_runs as runs

NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32


def save_teacher(workdir: str, config) -> str:
  """A run's workdir holding `config`'s randomly initialised net at step 0."""
  exp = experiment.build(config, mesh_lib.create_mesh(), DATA)
  manager = checkpointing.create_manager(workdir, async_save=False)
  checkpointing.save(manager, 0, exp.init_state(jax.random.key(7)))
  manager.close()
  workdir_lib.save_config(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A cifar_resnet20 DDNN (method ekd, the smoke config of configs/default.py)."""
  return save_teacher(str(tmp_path_factory.mktemp('teacher')), runs.load('default.py'))


def config_with(teacher: str, **fields):
  return runs.load('offline_kd.py', teacher_workdir=teacher, **fields)


def numpy_attention(features, kind: str) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if kind == 'at_p2':
    a = (x**2).mean(-1).reshape(len(x), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  a = x.sum(-1).reshape(len(x), -1)
  return (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)


@pytest.mark.parametrize('attention, stages', [('at_p2', 'all'), ('zscore_sum', 'last')])
def test_a_train_step_loss_against_numpy(teacher_dir, attention, stages):
  alpha, beta, temperature, student_ce, ramp = 1.5, 0.7, 4.0, 0.5, 5
  config = config_with(teacher_dir, **{
      'ekd.alpha': alpha, 'ekd.beta': beta, 'ekd.temperature': temperature,
      'ekd.attention': attention, 'ekd.stages': stages, 'ekd.student_ce': student_ce,
      'ekd.rampup_epochs': 0.5})  # 5 steps of DATA
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(config, mesh, DATA)
  assert exp.method.rampup_steps == ramp and exp.depths == ((1, 1, 1),)
  assert exp.model.stage_sizes == (1, 1, 1)  # the standalone student
  saved, _ = checkpointing.read_variables(teacher_dir)
  teacher = exp.method.teacher
  assert teacher.depths == ((3, 3, 3),)
  step_fn, state = train.make_train_step(exp), exp.init_state()
  rng = np.random.default_rng(0)
  for step in range(3):
    batch = {'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
             'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}
    (student,), _ = exp.model.apply(state.variables, batch['image'], exp.depths, True,
                                    method=exp.model.forward_depths, mutable=['batch_stats'])
    (taught,) = teacher.model.apply(saved, batch['image'], teacher.depths, False,
                                    method=teacher.model.forward_depths)
    state, metrics = step_fn(state, mesh_lib.global_batch(batch, mesh), *exp.step_args)
    kept = range(3) if stages == 'all' else [2]
    at = sum(np.mean((numpy_attention(student.features[s], attention)
                      - numpy_attention(taught.features[s], attention))**2) for s in kept)
    kl = runs.kd(taught.logits, student.logits, temperature)
    scale = runs.sigmoid_rampup(step, ramp)
    expected = (student_ce * runs.ce(student.logits, batch['label'])
                + scale * (alpha * kl + beta * at))
    np.testing.assert_allclose(float(metrics['train/loss']), expected, rtol=2e-4)
    np.testing.assert_allclose(float(metrics['train/d1-1-1/kl']), kl, rtol=2e-4)
    np.testing.assert_allclose(float(metrics['train/d1-1-1/at']), at, rtol=2e-3, atol=1e-6)
  # The teacher was neither trained nor donated.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.step_args[0]), saved)


def test_user_errors_are_one_line_and_name_the_fix(teacher_dir, tmp_path):
  def refused(config, message, num_classes=NUM_CLASSES):
    with pytest.raises(ValueError, match=message) as error:
      methods.create_method(config, num_classes, 10)
    assert '\n' not in str(error.value)

  refused(config_with(''), r'needs a teacher: pass --config\.teacher_workdir=DIR')
  refused(config_with(str(tmp_path)), r'holds no checkpoint; train the teacher there first')
  refused(config_with(teacher_dir), r'does not fit the net of its config\.json for this '
          r'data \(10 classes, this data has 5\)', num_classes=5)
  refused(config_with(teacher_dir, individual_depth=(1, 4, 1)),
          r'individual_depth=\(1,4,1\) \(the student\): .*allowed 1\.\.3; pass e\.g\. '
          r'--config\.individual_depth=\(1,1,1\)')
  no_config = str(tmp_path / 'no_config')
  save_teacher(no_config, runs.load('default.py'))
  os.remove(os.path.join(no_config, 'config.json'))
  refused(config_with(no_config), r'has no config\.json')
  # A teacher of four stages cannot give the attention maps of a three-stage student.
  deeper = save_teacher(str(tmp_path / 'r18'), runs.load('default.py', **{
      'model.name': 'cifar_resnet18', 'depths': ((1, 1, 1, 1), (2, 2, 2, 2))}))
  methods.create_method(config_with(deeper), NUM_CLASSES, 10)  # KL only: fine
  refused(config_with(deeper, **{'ekd.beta': 1.0}), r'pass --config\.ekd\.beta=0')


def test_a_smoke_run_resumes_across_the_rampup_end_and_evaluates_the_student(
    teacher_dir, tmp_path, capsys):
  # The ramp-up ends after 4 steps (0.1 epochs); the run stops at step 3.
  config = config_with(teacher_dir, log_every_steps=1)
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  metrics = train.train_and_evaluate(config, whole)
  runs.interrupted_run(config, parts, stop_at=3)
  runs.assert_same_variables(whole, parts)
  scales = runs.read_scalars(parts, 'train/kd_scale')
  assert scales[3] < 1.0 and scales[5] == 1.0
  assert all(v > 0 for v in runs.read_scalars(parts, 'train/d1-1-1/kl').values())
  capsys.readouterr()
  assert runs.evaluate_cli('--workdir', whole) == 0
  assert '| depth | top-1 |' in capsys.readouterr().out
  with open(os.path.join(whole, 'eval_test.json')) as f:
    (row,) = json.load(f)['depths']
  assert row['depth'] == [1, 1, 1] and row['name'] == 'd1-1-1'
  assert row['top1'] == pytest.approx(metrics['d1-1-1/top1'], abs=1e-6)
  assert row['params'] == models.count_params(checkpointing.read_variables(whole)[0]['params'])
