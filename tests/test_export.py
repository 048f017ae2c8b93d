"""Shipping a depth (ddnn_jax.export): the standalone checkpoint, SavedModel and
TFLite model of a depth give the DDNN sub-net's logits on real CIFAR-10 JPEGs
(decoded here with PIL, independently of the input pipeline), with the
depth's re-calibrated BatchNorm statistics; int8 TFLite reports its top-1
next to the float net's; bad input is one line and exit 2."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import evaluate_cli, run_cli, train_tiny_folder_run
from PIL import Image

from ddnn_jax import (
  bn_calibration,
  checkpointing,
  config_lib,
  evaluate,
  export,
  input_pipeline,
  models,
  release,
)
from ddnn_jax import mesh as mesh_lib

DEPTH = (2, 2, 2)
REPO = pathlib.Path(__file__).resolve().parents[1]


def export_cli(*args) -> int:
  return run_cli(export, *args)


@pytest.fixture(scope='module')
def trained(cifar_roots, tmp_path_factory):
  """A tiny trained run (conftest) and 20 other real JPEGs as uint8 pixels."""
  root, other = cifar_roots
  tmp = tmp_path_factory.mktemp('export')
  workdir = train_tiny_folder_run(root, str(tmp / 'run'))
  files = sorted(other.rglob('*.jpg'))[::5]
  images = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
  return workdir, images, tmp


@pytest.fixture(scope='module')
def reference(trained):
  """The DDNN's logits at DEPTH on the JPEGs, its BatchNorm statistics
  re-estimated for DEPTH on 2 training batches of 50 (XLA's convolutions)."""
  workdir, images, _ = trained
  config = config_lib.load_saved(workdir)
  config.model.conv_impl = 'xla'
  mesh = mesh_lib.create_mesh()
  method, variables, _ = evaluate.restore(workdir, config, mesh)
  batches = input_pipeline.train_batches(config.data, global_batch_size=50, seed=config.seed)
  variables = bn_calibration.recalibrate(method.model, variables, DEPTH, batches, mesh, 2)
  normalised = (images.astype(np.float32) - np.float32(config.data.mean)) / np.float32(
      config.data.std)
  logits = method.model.apply(variables, normalised, depth=DEPTH)
  return np.asarray(logits), config


def test_checkpoint_loads_into_the_standalone_net(trained, reference, capsys):
  workdir, images, tmp = trained
  logits, config = reference
  out = tmp / 'ckpt'
  assert export_cli('--workdir', workdir, '--depth', '2,2,2', '--format', 'checkpoint',
                    '--out', str(out), '--recalibrate_bn', '2') == 0
  printed = capsys.readouterr().out
  assert 'on disk, the full net 3,3,3 as checkpoint' in printed
  variables, _ = checkpointing.read_variables(str(out))
  net = models.create_model('cifar_resnet20', 10, width_multiplier=0.125, stage_sizes=DEPTH)
  assert not any(k.startswith('stage1_block2') for k in variables['params'])
  normalised = (images.astype(np.float32) - np.float32(config.data.mean)) / np.float32(
      config.data.std)
  np.testing.assert_allclose(net.apply(variables, normalised), logits, rtol=0, atol=1e-5)
  saved = config_lib.load_saved(str(out))
  assert saved.method == 'individual' and tuple(saved.individual_depth) == DEPTH
  assert saved.model.bn_mode == 'shared' and saved.data.root == ''
  record = json.loads((out / 'export.json').read_text())
  assert record['params'] == models.count_params(variables['params'])
  assert 0 < record['variable_bytes'] < record['full_variable_bytes']
  assert record['variable_bytes'] < record['size_bytes'] < record['full_size_bytes']


def test_an_ekd_run_with_per_depth_norm_layers_exports_a_depth_as_trained(
    cifar_roots, trained, tmp_path, capsys):
  """EKD's default (bn_mode 'auto' -> private_all) trains norm layers per
  depth, so a depth exports with its own, no --recalibrate_bn needed, and the
  standalone net computes what the DDNN computes at that depth."""
  _, images, _ = trained
  workdir = train_tiny_folder_run(cifar_roots[0], str(tmp_path / 'run'), bn_mode='auto')
  config = config_lib.load_saved(workdir)
  assert config.method == 'ekd' and config.model.bn_mode == 'private_all'
  out = tmp_path / 'ckpt'
  assert export_cli('--workdir', workdir, '--depth', '2,2,2', '--format', 'checkpoint',
                    '--out', str(out)) == 0
  capsys.readouterr()
  config.model.conv_impl = 'xla'
  method, variables, _ = evaluate.restore(workdir, config, mesh_lib.create_mesh())
  normalised = (images.astype(np.float32) - np.float32(config.data.mean)) / np.float32(
      config.data.std)
  expected = method.model.apply(variables, normalised, depth=DEPTH)
  exported, _ = checkpointing.read_variables(str(out))
  net = models.create_model('cifar_resnet20', 10, width_multiplier=0.125, stage_sizes=DEPTH)
  np.testing.assert_allclose(net.apply(exported, normalised), expected, rtol=0, atol=1e-5)


def test_savedmodel_serves_uint8_and_float_pixels(trained, reference, capsys):
  import tensorflow as tf

  workdir, images, tmp = trained
  logits, _ = reference
  out = tmp / 'savedmodel'
  assert export_cli('--workdir', workdir, '--depth', '2,2,2', '--format', 'savedmodel',
                    '--out', str(out), '--recalibrate_bn', '2') == 0
  capsys.readouterr()
  loaded = tf.saved_model.load(str(out))
  served = loaded.signatures['serving_default'](images=tf.constant(images))['logits']
  np.testing.assert_allclose(served.numpy(), logits, rtol=0, atol=1e-5)
  as_float = loaded.signatures['serving_float'](images=tf.constant(images, tf.float32))
  np.testing.assert_allclose(as_float['logits'].numpy(), logits, rtol=0, atol=1e-5)


def _tflite(path, images):
  import tensorflow as tf

  interpreter = tf.lite.Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  source = interpreter.get_input_details()[0]
  assert list(source['shape']) == [1, *images.shape[1:]] and source['dtype'] == np.uint8
  logits = []
  for image in images:
    interpreter.set_tensor(source['index'], image[None])
    interpreter.invoke()
    logits.append(interpreter.get_tensor(interpreter.get_output_details()[0]['index'])[0])
  dtypes = {t['dtype'] for t in interpreter.get_tensor_details()}
  return np.stack(logits), dtypes


def test_tflite_fp32_matches_and_int8_reports_its_drop(trained, reference, capsys):
  workdir, images, tmp = trained
  logits, _ = reference
  out = tmp / 'model.tflite'
  assert export_cli('--workdir', workdir, '--depth', '2,2,2', '--format', 'tflite',
                    '--out', str(out), '--recalibrate_bn', '2') == 0
  got, _ = _tflite(out, images)
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)

  # int8: the float top-1 it reports is the DDNN sub-net's after the same
  # re-calibration, as evaluate scores it on the 50 validation images.
  assert evaluate_cli('--workdir', workdir, '--recalibrate_bn', '2') == 0
  with open(f'{workdir}/eval_validation_bnrecal2.json') as f:
    top1 = {tuple(r['depth']): r['top1'] for r in json.load(f)['depths']}
  quantized = tmp / 'model_int8.tflite'
  assert export_cli('--workdir', workdir, '--depth', '2,2,2', '--format', 'tflite',
                    '--quantize', 'int8', '--out', str(quantized), '--recalibrate_bn', '2',
                    '--representative_images', '50') == 0
  assert 'int8 top-1' in capsys.readouterr().out
  record = json.loads(pathlib.Path(f'{quantized}.json').read_text())['int8']
  assert record['examples'] == 50 and record['split'] == 'validation'
  assert record['top1_float'] == pytest.approx(top1[DEPTH], abs=1e-6)
  assert record['top1_drop'] == pytest.approx(record['top1_float'] - record['top1_int8'])
  int8_logits, dtypes = _tflite(quantized, images)
  assert np.dtype(np.int8) in {np.dtype(d) for d in dtypes}  # really quantised
  assert np.abs(int8_logits - logits).max() < 0.5 * np.abs(logits).max()
  assert quantized.stat().st_size < out.stat().st_size
  record = json.loads(pathlib.Path(f'{quantized}.json').read_text())
  assert record['size_bytes'] < record['full_size_bytes']


def test_a_release_ships_its_per_depth_statistics(trained, tmp_path, capsys):
  workdir, images, tmp = trained
  released = str(tmp_path / 'released')
  release.release(workdir, released, recalibrate_bn=2)
  from_release, from_run = tmp_path / 'a', tmp_path / 'b'
  assert export_cli('--workdir', released, '--depth', '1,1,1', '--format', 'checkpoint',
                    '--out', str(from_release)) == 0
  assert export_cli('--workdir', workdir, '--depth', '1,1,1', '--format', 'checkpoint',
                    '--out', str(from_run), '--recalibrate_bn', '2') == 0
  a, _ = checkpointing.read_variables(str(from_release))
  b, _ = checkpointing.read_variables(str(from_run))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
  # A depth the release holds no statistics for needs --recalibrate_bn.
  assert export_cli('--workdir', released, '--depth', '1,2,3', '--format', 'checkpoint',
                    '--out', str(tmp_path / 'c')) == 2
  assert 'pass --recalibrate_bn N' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (('--depth', '4,4,4'), r'stage 1 has 4 blocks; allowed 1..3'),
    (('--depth', '2,2'), r'has 2 entries but the model has 3 stages'),
    (('--format', 'onnx'), r"unknown format 'onnx'; choose one of checkpoint"),
    (('--format', 'checkpoint', '--quantize', 'int8'), r'applies to --format tflite only'),
    (('--workdir', '/nonexistent/run'), r'config.json does not exist'),
])
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, args, message):
  workdir, _, _ = trained
  given = dict(zip(args[::2], args[1::2]))
  argv = {'--workdir': workdir, '--depth': '2,2,2', '--format': 'tflite',
          '--out': str(tmp_path / 'out'), **given}
  assert export_cli(*[x for kv in argv.items() for x in kv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and message in err[-1], err[-1]
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name', ['one', 'mcod'])
def test_a_run_of_several_nets_is_refused_by_export_and_search(name, tmp_path, capsys):
  from ddnn_jax import experiment, search  # noqa: PLC0415
  from ddnn_jax import workdir as workdir_lib  # noqa: PLC0415

  config = config_lib.load(str(REPO / 'configs' / f'{name}.py') + ':smoke')
  workdir = str(tmp_path / name)
  exp = experiment.build(config, mesh_lib.create_mesh(), experiment.DataSpec(10, 8, 64))
  workdir_lib.save_config(config, workdir)
  manager = checkpointing.create_manager(workdir)
  checkpointing.save_variables(manager, 1, exp.init_state().variables)
  manager.close()
  out = str(tmp_path / 'out')
  for module, args in ((export, ('--depth', '1,1,1', '--format', 'checkpoint', '--out', out)),
                       (search, ('--budget_gflops', '1', '--out', out))):
    assert run_cli(module, '--workdir', workdir, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: the checkpoint holds no depth-dynamic ResNet'), err[-1]
    assert 'export and search ship depths of the ekd, joint_ce and individual' in err[-1]
  assert not os.path.exists(out)
