"""Released models (ddnn_jax.release): variables only, per-depth BatchNorm
statistics baked in, scored by a plain `evaluate` on the validation split and
on another root without the training root; the committed releases of
docs/models reproduce the validation top-1 that docs/RESULTS.md quotes."""

import json
import os
import pathlib
import shutil

import pytest
from conftest import cifar10_tar, evaluate_cli, train_tiny_folder_run

from ddnn_jax import checkpointing, config_lib, release

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / 'docs' / 'models'


def test_per_depth_statistics_name_each_norm_after_its_depth():
  target = {'stem': {'bn_d1-1': {'mean': 0, 'var': 0}, 'bn_d2-1': {'mean': 0, 'var': 0}},
            'stage1_block1': {'bn1_d2-1': {'mean': 0, 'var': 0}}}
  recalibrated = [
      {'batch_stats': {'stem': {'bn': {'mean': 1, 'var': 2}},
                       'stage1_block1': {'bn1': {'mean': 9, 'var': 9}}}},
      {'batch_stats': {'stem': {'bn': {'mean': 3, 'var': 4}},
                       'stage1_block1': {'bn1': {'mean': 5, 'var': 6}}}}]
  filled = release.per_depth_statistics(target, recalibrated, [(1, 1), (2, 1)])
  assert filled == {'stem': {'bn_d1-1': {'mean': 1, 'var': 2},
                             'bn_d2-1': {'mean': 3, 'var': 4}},
                    'stage1_block1': {'bn1_d2-1': {'mean': 5, 'var': 6}}}
  with pytest.raises(ValueError, match='belongs to no released depth'):
    release.per_depth_statistics({'stem': {'bn_d9-9': {'mean': 0}}}, recalibrated,
                                 [(1, 1), (2, 1)])


def test_per_depth_statistics_of_a_per_depth_run_take_each_depths_own_norms():
  # A 'private_all' run: every copy has every depth's norms; depth i's copy
  # holds the re-estimated statistics of its own norms only.
  stats = {'stem': {'bn_d1-1': {'mean': 0}, 'bn_d2-1': {'mean': 0}}}
  recalibrated = [{'batch_stats': {'stem': {'bn_d1-1': {'mean': 1}, 'bn_d2-1': {'mean': 0}}}},
                  {'batch_stats': {'stem': {'bn_d1-1': {'mean': 0}, 'bn_d2-1': {'mean': 2}}}}]
  assert release.per_depth_statistics(stats, recalibrated, [(1, 1), (2, 1)]) == {
      'stem': {'bn_d1-1': {'mean': 1}, 'bn_d2-1': {'mean': 2}}}


@pytest.fixture(scope='module')
def folder_run(cifar_roots, tmp_path_factory):
  """The tiny trained run of conftest (shared norm layers: the per-depth
  re-calibration a release stores), and its evaluation with per-depth BN
  re-calibration on 2 batches."""
  root, other = cifar_roots
  tmp = tmp_path_factory.mktemp('release')
  workdir = train_tiny_folder_run(root, str(tmp / 'run'))
  assert evaluate_cli('--workdir', workdir, '--recalibrate_bn', '2') == 0
  return workdir, other, tmp


def test_a_release_holds_variables_only_and_scores_as_its_source(folder_run, capsys):
  workdir, other, tmp = folder_run
  out = str(tmp / 'released')
  record = release.release(workdir, out, recalibrate_bn=2)
  # The released model's validation top-1 is the source run's after re-calibration.
  with open(os.path.join(workdir, 'eval_validation_bnrecal2.json')) as f:
    source = {tuple(r['depth']): r['top1'] for r in json.load(f)['depths']}
  assert record['top1'] == record['source_top1'] == {
      'd' + '-'.join(map(str, d)): top1 for d, top1 in source.items()}
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'release.json']
  step_dir = pathlib.Path(out) / 'checkpoints' / str(record['step'])
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ['variables']
  size = sum(p.stat().st_size for p in pathlib.Path(out).rglob('*') if p.is_file())
  assert size < 1_000_000
  saved = config_lib.load_saved(out)
  assert saved.data.root == saved.data.data_dir == ''
  assert saved.model.bn_mode == 'private_stats' and len(saved.data.class_names) == 10
  # A plain evaluation (no re-calibration) given the training root reproduces it.
  root = config_lib.load_saved(workdir).data.root
  assert evaluate_cli('--workdir', out, f'--config.data.root={root}',
                      f'--config.data.data_dir={workdir}_tfds') == 0
  with open(os.path.join(out, 'eval_validation.json')) as f:
    plain = {tuple(r['depth']): r['top1'] for r in json.load(f)['depths']}
  assert plain == source
  # Another root with the same class folders, without the training root.
  assert evaluate_cli('--workdir', out, '--root', str(other), '--split', 'test') == 0
  with open(os.path.join(out, 'eval_OTHER_test.json')) as f:
    scored = json.load(f)
  assert scored['examples'] == 100 and all(0 <= r['top1'] <= 1 for r in scored['depths'])
  capsys.readouterr()


def test_release_refuses_a_used_out_folder_and_a_missing_run(folder_run, tmp_path):
  workdir, _, _ = folder_run
  (tmp_path / 'note.txt').write_text('mine\n')
  with pytest.raises(ValueError, match='is not empty; pass a new folder'):
    release.release(workdir, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    release.release(str(tmp_path / 'nothing'), str(tmp_path / 'out'))
  assert (tmp_path / 'note.txt').read_text() == 'mine\n'


# One of the 30-epoch study's (shared norm layers, re-calibrated into
# 'private_stats') and the 100-epoch default EKD (per-depth norm layers, each
# depth's own statistics re-calibrated).
RELEASED = [name for name in ('study30/ekd_s0', 'study100/ekd_bn_private_all_s0')
            if (MODELS / name).is_dir()]


@pytest.mark.parametrize('name', RELEASED)
def test_a_committed_release_reproduces_its_validation_top1(name, tmp_path):
  tar = cifar10_tar()
  if tar is None:
    pytest.skip('no CIFAR-10 tar; set DDNN_CIFAR10_TAR')
  workdir = tmp_path / name
  shutil.copytree(MODELS / name, workdir)
  with open(workdir / 'release.json') as f:
    record = json.load(f)
  assert checkpointing.read_variables(str(workdir))[1] == record['step']
  assert evaluate_cli('--workdir', str(workdir), f'--config.data.root={tar}') == 0
  with open(workdir / 'eval_validation.json') as f:
    result = json.load(f)
  assert result['examples'] == 5000
  top1 = {r['name']: r['top1'] for r in result['depths']}
  assert top1 == record['top1'] == record['source_top1'] and len(top1) >= 1
