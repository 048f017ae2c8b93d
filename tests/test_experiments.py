"""The CIFAR-10 experiment driver and its summarizer (experiments/)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from ddnn_jax import config_lib


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


driver = _load('cifar10_ekd')
summarize = _load('summarize')


def _args(tmp_path, *extra):
  root = tmp_path / 'root.tar'
  root.write_bytes(b'')
  return ['--root', str(root), '--out', str(tmp_path / 'out'), *extra]


def _plan(tmp_path, *extra):
  parser_args = _args(tmp_path, *extra)
  runs = []
  original = driver.execute
  driver.execute = lambda run, shared, *_: runs.append((run, shared))
  try:
    driver.main(parser_args)
  finally:
    driver.execute = original
  return runs


def test_plan_runs_seed_zero_of_every_method_then_ablations_then_other_seeds(tmp_path):
  runs = _plan(tmp_path, '--ablations', 'ekd_kl_only,ekd_at_p2')
  assert [r.name for r, _ in runs] == [
      'ekd_s0', 'joint_ce_s0', 'individual_d1_s0', 'individual_d2_s0', 'individual_d3_s0',
      'ekd_kl_only_s0', 'ekd_at_p2_s0',
      'ekd_s1', 'joint_ce_s1', 'individual_d1_s1', 'individual_d2_s1', 'individual_d3_s1']
  by_name = {r.name: r.overrides for r, _ in runs}
  assert by_name['individual_d2_s1'] == {'method': 'individual', 'individual_depth': (2, 2, 2),
                                         'seed': 1}
  assert by_name['ekd_kl_only_s0'] == {'method': 'ekd', 'seed': 0, 'ekd.beta': 0.0,
                                       'ekd.rampup_epochs': 0.0}
  assert by_name['joint_ce_s0']['method'] == 'joint_ce'


def test_ablation_seeds_follow_each_seeds_main_runs(tmp_path):
  names = [r.name for r, _ in _plan(tmp_path, '--ablations', 'ekd_kl_only', '--seeds', '2',
                                    '--ablation-seeds', '3')]
  assert names == [
      'ekd_s0', 'joint_ce_s0', 'individual_d1_s0', 'individual_d2_s0', 'individual_d3_s0',
      'ekd_kl_only_s0',
      'ekd_s1', 'joint_ce_s1', 'individual_d1_s1', 'individual_d2_s1', 'individual_d3_s1',
      'ekd_kl_only_s1', 'ekd_kl_only_s2']
  runs = {r.name: r.overrides for r, _ in _plan(
      tmp_path, '--ablations', 'ekd_kl_only', '--ablation-seeds', '2',
      '--only', 'ekd_kl_only_s1')}
  assert runs == {'ekd_kl_only_s1': {'method': 'ekd', 'seed': 1, 'ekd.beta': 0.0,
                                     'ekd.rampup_epochs': 0.0}}


def test_default_plan_is_the_reported_study(tmp_path):
  names = [r.name for r, _ in _plan(tmp_path)]
  assert names[5:7] == ['ekd_paper_s0', 'ekd_kl_only_s0']
  assert len(names) == 12
  assert [r.name for r, _ in _plan(tmp_path, '--ablations', 'none')] == names[:5] + names[7:]


def test_comparison_methods_follow_the_main_runs_and_start_from_their_seeds_full_net(
    tmp_path):
  runs = _plan(tmp_path, '--ablations', 'none', '--epochs', '30', '--comparison', '1',
               '--released', str(tmp_path / 'no_releases'))
  names = [r.name for r, _ in runs]
  assert names[10:] == ['depth_pruning_s0', 'offline_kd_d1_s0', 'offline_kd_d2_s0', 'one_s0',
                        'mcod_s0', 'indistill_d1_s0']
  by_name = {r.name: r.overrides for r, _ in runs}
  full = str(tmp_path / 'out' / 'individual_d3_s0')
  assert by_name['depth_pruning_s0']['init_from'] == full
  assert by_name['depth_pruning_s0']['num_epochs'] == 10.0
  assert by_name['offline_kd_d2_s0']['teacher_workdir'] == full
  assert by_name['offline_kd_d2_s0']['individual_depth'] == (2, 2, 2)
  assert by_name['indistill_d1_s0']['teacher_workdir'] == full
  assert by_name['one_s0']['one.rampup_epochs'] == 8.0
  # Every field a comparison run sets is a field of the driver's config.
  config = config_lib.load(os.path.join(REPO, driver.CONFIG))
  for name in names[10:]:
    for key in by_name[name]:
      *parents, leaf = key.split('.')
      node = config
      for part in parents:
        node = node[part]
      assert leaf in node, key


def test_comparison_runs_read_a_released_full_net_when_out_lost_its_checkpoints(tmp_path):
  out, released = tmp_path / 'out', tmp_path / 'released'
  (released / 'individual_d3_s0' / 'checkpoints').mkdir(parents=True)
  (out / 'individual_d3_s0').mkdir(parents=True)  # records only
  assert driver.full_net_run(0, str(out), str(released)) == str(
      released / 'individual_d3_s0')
  (out / 'individual_d3_s0' / 'checkpoints').mkdir()  # the run itself wins
  assert driver.full_net_run(0, str(out), str(released)) == str(out / 'individual_d3_s0')
  # Seed 1 was never released: the run in OUT, trained before it is needed.
  assert driver.full_net_run(1, str(out), str(released)) == str(out / 'individual_d3_s1')


def test_every_run_shares_one_recipe(tmp_path):
  runs = _plan(tmp_path, '--epochs', '2', '--width', '0.25', '--set', 'ekd.temperature=4')
  recipes = {json.dumps(shared, sort_keys=True) for _, shared in runs}
  assert len(recipes) == 1
  shared = runs[0][1]
  assert shared['num_epochs'] == 2.0 and shared['model.width_multiplier'] == 0.25
  assert shared['ekd.temperature'] == '4'
  assert shared['data.root'] == str(tmp_path / 'root.tar')


def test_command_passes_tuples_as_config_literals(tmp_path):
  run = driver.Run('individual_d1_s0', {'method': 'individual',
                                        'individual_depth': (1, 1, 1), 'seed': 0})
  cmd = driver.command(run, {'num_epochs': 3.0}, str(tmp_path))
  assert cmd[1:5] == ['-m', 'ddnn_jax.main', '--config', 'configs/cifar10_folder.py']
  assert '--config.individual_depth=(1,1,1)' in cmd
  assert '--config.num_epochs=3.0' in cmd and '--config.method=individual' in cmd


@pytest.mark.parametrize('extra, message', [
    (['--only', 'ekd_s7'], "unknown run(s) ['ekd_s7']"),
    (['--ablations', 'ekd_bogus'], "unknown ablation(s) ['ekd_bogus']"),
    (['--set', 'ekd.beta'], "--set 'ekd.beta' is not FIELD=VALUE"),
])
def test_bad_arguments_name_the_problem(tmp_path, extra, message):
  with pytest.raises(SystemExit, match=re.escape(message)):
    driver.main(_args(tmp_path, *extra))


def test_missing_root_is_one_line_and_nonzero(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/cifar10_ekd.py', '--root', str(tmp_path / 'nope.tar'),
       '--out', str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      f'error: --root {tmp_path / "nope.tar"} does not exist; pass the CIFAR-10 '
      'ImageFolder root or cifar10-jpeg-train.tar']


def test_failed_run_resumes_then_is_skipped_and_times_add_up(tmp_path, monkeypatch, capsys):
  """A failing attempt leaves no DONE.json; the next invocation retries the same
  run, sums both attempts' wall time, and a third one skips it."""
  marker = tmp_path / 'fail_once'
  marker.write_text('')
  script = ('import os,sys,time; time.sleep(0.2); p=sys.argv[1]; '
            'sys.exit(3 if os.path.exists(p) and not os.remove(p) else 0)')
  monkeypatch.setattr(driver, 'command', lambda run, shared, workdir: [
      sys.executable, '-c', script, str(marker)])
  run = driver.Run('ekd_s0', {'method': 'ekd', 'seed': 0})
  out = str(tmp_path / 'out')
  with pytest.raises(SystemExit, match='run ekd_s0 failed .exit 3.'):
    driver.execute(run, {'num_epochs': 1.0}, out, dry_run=False)
  workdir = tmp_path / 'out' / 'ekd_s0'
  assert not (workdir / 'DONE.json').exists()
  driver.execute(run, {'num_epochs': 1.0}, out, dry_run=False)
  done = json.loads((workdir / 'DONE.json').read_text())
  attempts = json.loads((workdir / 'attempts.json').read_text())
  assert [a['returncode'] for a in attempts] == [3, 0]
  assert done['attempts'] == 2
  assert done['seconds'] == pytest.approx(sum(a['seconds'] for a in attempts))
  assert done['seconds'] >= 0.4
  assert all(a['cpu_seconds'] >= 0 for a in attempts)
  # The tables so far are rewritten after every finished run.
  assert (tmp_path / 'out' / 'tables' / 'cifar10_ekd.md').exists()
  capsys.readouterr()
  driver.execute(run, {'num_epochs': 1.0}, out, dry_run=False)
  assert '[skip] ekd_s0: finished' in capsys.readouterr().out


def test_finished_ddnn_runs_are_rescored_with_recalibrated_bn_once(tmp_path, monkeypatch,
                                                                   capsys):
  calls = []

  def fake(workdir, num_batches):
    calls.append((workdir, num_batches))
    path = f'{workdir}/eval_validation_bnrecal{num_batches}.json'
    return [sys.executable, '-c', f'open({path!r}, "w").write("{{}}")']

  monkeypatch.setattr(driver, 'recalibrate_command', fake)
  monkeypatch.setattr(driver, 'command', lambda run, shared, workdir: [
      sys.executable, '-c', 'pass'])
  out = str(tmp_path / 'out')
  ekd = driver.Run('ekd_s0', {'method': 'ekd', 'seed': 0})
  single = driver.Run('individual_d1_s0', {'method': 'individual', 'seed': 0})
  for _ in range(2):  # trains and re-scores, then skips both
    driver.execute(ekd, {}, out, dry_run=False, recalibrate_batches=20)
    driver.execute(single, {}, out, dry_run=False, recalibrate_batches=20)
  assert calls == [(str(tmp_path / 'out' / 'ekd_s0'), 20)]
  assert (tmp_path / 'out' / 'ekd_s0' / 'eval_validation_bnrecal20.json').exists()
  assert capsys.readouterr().out.count('[bn re-calibration] ekd_s0') == 1


def test_recalibrate_command_is_what_the_evaluate_cli_parses(tmp_path):
  from absl import flags

  from ddnn_jax import config_lib, evaluate
  from ddnn_jax import workdir as workdir_lib

  workdir_lib.save_config(config_lib.load(str(REPO / 'configs' / 'default.py')), str(tmp_path))
  cmd = driver.recalibrate_command(str(tmp_path), 20)
  assert cmd[1:3] == ['-m', 'ddnn_jax.evaluate']
  values = flags.FlagValues()
  assert evaluate.parse_flags(['evaluate', *cmd[3:]], values) == ['evaluate']
  assert values.workdir == str(tmp_path) and values.recalibrate_bn == 20
  assert values.config.method == 'ekd'  # the run's saved config


def test_changed_recipe_is_refused_for_an_existing_run(tmp_path, monkeypatch):
  monkeypatch.setattr(driver, 'command', lambda run, shared, workdir: [
      sys.executable, '-c', 'raise SystemExit(1)'])
  run = driver.Run('ekd_s0', {'method': 'ekd', 'seed': 0})
  out = str(tmp_path / 'out')
  with pytest.raises(SystemExit, match='failed'):
    driver.execute(run, {'num_epochs': 1.0}, out, dry_run=False)
  with pytest.raises(SystemExit, match='was started with other settings'):
    driver.execute(run, {'num_epochs': 2.0}, out, dry_run=False)


def _fake_run(out, name, depths_top1, *, seconds=60.0, step=30, epochs=3.0):
  workdir = out / name
  workdir.mkdir(parents=True)
  rows = [{'depth': list(d), 'params': 1000 * sum(d), 'flops': 1e7 * sum(d), 'top1': t,
           'top5': 0.99, 'loss': 1.0, 'kl_to_full': 0.1, 'agreement': 0.8,
           'images_per_second': 10.0} for d, t in depths_top1]
  (workdir / 'eval_validation.json').write_text(json.dumps({'step': step, 'depths': rows}))
  (workdir / 'attempts.json').write_text(json.dumps(
      [{'seconds': seconds, 'cpu_seconds': 2 * seconds, 'returncode': 0}]))
  (workdir / 'DONE.json').write_text(json.dumps({'seconds': seconds}))
  (workdir / 'driver_settings.json').write_text(json.dumps({'num_epochs': epochs}))
  return workdir


def _fake_recalibration(workdir, depths_top1):
  """The run's evaluation after per-depth BN re-calibration on 20 batches."""
  rows = [{'depth': list(d), 'top1': t} for d, t in depths_top1]
  (workdir / 'eval_validation_bnrecal20.json').write_text(
      json.dumps({'bn_recalibration_batches': 20, 'depths': rows}))


def test_summary_averages_seeds_and_compares_with_individual(tmp_path):
  out = tmp_path / 'out'
  d1, d2, d3 = (1, 1, 1), (2, 2, 2), (3, 3, 3)
  _fake_run(out, 'ekd_s0', [(d1, 0.60), (d2, 0.70), (d3, 0.80)])
  _fake_run(out, 'ekd_s1', [(d1, 0.62), (d2, 0.72), (d3, 0.78)])
  _fake_run(out, 'joint_ce_s0', [(d1, 0.55), (d2, 0.65), (d3, 0.79)])
  for seed, shift in ((0, 0.0), (1, 0.02)):
    for d, t in ((d1, 0.50), (d2, 0.60), (d3, 0.81)):
      _fake_run(out, f'individual_d{d[0]}_s{seed}', [(d, t + shift)])
  _fake_run(out, 'ekd_kl_only_s0', [(d1, 0.66), (d2, 0.74), (d3, 0.80)])
  _fake_run(out, 'ekd_kl_only_s1', [(d1, 0.68), (d2, 0.74), (d3, 0.80)])
  _fake_recalibration(out / 'ekd_s0', ((d1, 0.64), (d2, 0.73), (d3, 0.82)))
  unfinished = out / 'ekd_at_p2_s0'
  unfinished.mkdir()
  (unfinished / 'attempts.json').write_text(json.dumps([{'seconds': 30.0}]))
  results = tmp_path / 'results'
  summarize.main(['--out', str(out), '--results', str(results), '--no-curves'])
  text = (results / 'cifar10_ekd.md').read_text()
  # ResNet-8 row: EKD 61 ± 1.41, joint 55, individual 51 ± 1.41, EKD - individual +10.
  assert ('| ResNet-8 (1,1,1) | 3,000 | 0.0300 | 61.00 ± 1.41 (n=2) | 55.00 (n=1) | '
          '51.00 ± 1.41 (n=2) | +10.00 |') in text
  assert '| ResNet-20 (3,3,3) | 9,000 | 0.0900 | 79.00 ± 1.41 (n=2) |' in text
  # Ablations average their seeds, like the main methods (ekd for reference).
  assert '| ekd_kl_only | 67.00 ± 1.41 (n=2) | 74.00 ± 0.00 (n=2) | 80.00 ± 0.00 (n=2) |' in text
  assert '| ekd | 61.00 ± 1.41 (n=2) | 71.00 ± 1.41 (n=2) | 79.00 ± 1.41 (n=2) |' in text
  assert '| ekd_at_p2_s0 | no | 0.5 | ' in text
  assert 're-estimated per depth on 20 training batches' in text
  assert '| ekd_s0 | 60.00 → 64.00 | 70.00 → 73.00 | 80.00 → 82.00 |' in text
  # The re-calibrated main table: ekd from its one re-scored seed, individual as is.
  assert ('| ResNet-8 (1,1,1) | 3,000 | 0.0300 | 64.00 (n=1) | 51.00 ± 1.41 (n=2) | '
          '+13.00 |') in text
  # 11 finished runs of 1 min (2 CPU minutes) each, plus the unfinished half
  # minute (no CPU time recorded: wall time x cores).
  cpu_hours = (11 * 120 + 30 * (os.cpu_count() or 1)) / 3600
  assert f'| **total** | | **11.5** | **{cpu_hours:.2f}** |' in text
  assert '| ekd_s0 | yes | 1.0 | 0.03 |' in text
  dump = json.loads((results / 'cifar10_ekd.json').read_text())
  assert dump['summary']['individual']['1,1,1']['top1']['values'] == [0.5, 0.52]


def test_summary_reads_the_claim_against_the_seed_spread(tmp_path):
  out = tmp_path / 'out'
  d1, d3 = (1, 1, 1), (3, 3, 3)

  def ddnn(name, plain, recalibrated):
    workdir = _fake_run(out, name, list(zip((d1, d3), plain)))
    _fake_recalibration(workdir, zip((d1, d3), recalibrated))

  ddnn('ekd_s0', (0.1, 0.1), (0.64, 0.80))
  ddnn('ekd_s1', (0.1, 0.1), (0.66, 0.82))
  ddnn('ekd_bn_private_all_s0', (0.60, 0.818), (0.60, 0.818))
  ddnn('ekd_bn_private_all_s1', (0.63, 0.818), (0.63, 0.818))
  ddnn('joint_ce_s0', (0.1, 0.1), (0.64, 0.805))
  for seed, (t1, t3) in enumerate(((0.60, 0.815), (0.61, 0.825))):
    _fake_run(out, f'individual_d1_s{seed}', [(d1, t1)])
    _fake_run(out, f'individual_d3_s{seed}', [(d3, t3)])
  results = tmp_path / 'results'
  summarize.main(['--out', str(out), '--results', str(results), '--no-curves'])
  text = (results / 'cifar10_ekd.md').read_text()
  # ekd leads at ResNet-8 by 4.5 points (4 and 5 within each seed), more than
  # either SD (1.41, 0.71); joint CE has one seed, so no spread to compare with.
  assert ('| ekd | ResNet-8 (1,1,1) | 65.00 ± 1.41 (n=2) | +4.50 | 0: +4.00, 1: +5.00 | '
          'ahead by more than the spread (1.41) | +1.00 | one seed: no spread |') in text
  # Its full net is 1 point below the individual one: outside the 0.3 bar.
  assert ('| ekd | ResNet-20 (3,3,3) | 81.00 ± 1.41 (n=2) | -1.00 | 0: -1.50, 1: -0.50 | '
          'full net outside the 0.3-point bar | +0.50 |') in text
  # A 1-point lead with an SD of 2.12 is within the spread; a full net 0.2
  # points below the individual one is within the bar.
  assert ('| ekd_bn_private_all | ResNet-8 (1,1,1) | 61.50 ± 2.12 (n=2) | +1.00 | '
          '0: +0.00, 1: +2.00 | ahead, within the spread (2.12) |') in text
  assert '| -0.20 | 0: +0.30, 1: -0.70 | full net within the 0.3-point bar |' in text
  # joint CE is compared with the individual nets only; ekd is listed first.
  assert '| joint_ce | ResNet-8 (1,1,1) | 64.00 (n=1) | +3.50 | 0: +4.00 |' in text
  assert text.index('| ekd | ResNet-8') < text.index('| ekd_bn_private_all | ResNet-8')


def test_summary_compares_every_deployable_net_of_every_method(tmp_path):
  out = tmp_path / 'out'
  d1, d3 = (1, 1, 1), (3, 3, 3)
  _fake_run(out, 'ekd_s0', [(d1, 0.60), (d3, 0.80)])
  for seed in (0, 1):
    _fake_run(out, f'individual_d1_s{seed}', [(d1, 0.50)])
    _fake_run(out, f'individual_d3_s{seed}', [(d3, 0.81)], seconds=90.0)
    one = _fake_run(out, f'one_s{seed}', [((0,), 0.70 + seed / 100), ((1,), 0.69),
                                         ((3,), 0.72)], seconds=180.0)
    evaluation = json.loads((one / 'eval_validation.json').read_text())
    for row, name in zip(evaluation['depths'], ('branch1', 'branch2', 'ensemble')):
      row['name'] = name
    (one / 'eval_validation.json').write_text(json.dumps(evaluation))
  _fake_run(out, 'offline_kd_d1_s0', [(d1, 0.55)], seconds=36.0)
  results = tmp_path / 'results'
  summarize.main(['--out', str(out), '--results', str(results), '--no-curves'])
  text = (results / 'cifar10_ekd.md').read_text()
  # Member rows keep their names; seeds average; each run's CPU time (2x wall).
  assert ('| ONE (3 branches, gated ensemble) | branch1 | 0 | 0.0000 | 70.50 ± 0.71 (n=2) '
          '| 0.10 |') in text
  assert ('| ONE (3 branches, gated ensemble) | ensemble | 3,000 | 0.0300 | 72.00 ± 0.00 (n=2) '
          '| 0.10 |') in text
  assert ('| offline KD, student (1,1,1) | ResNet-8 (1,1,1) | 3,000 | 0.0300 | 55.00 (n=1) '
          '| 0.02 + teacher |') in text
  assert '| individual | ResNet-20 (3,3,3) | 9,000 | 0.0900 | 81.00 ± 0.00 (n=2) | 0.05 |' in text
  assert '| ekd | ResNet-8 (1,1,1) | 3,000 | 0.0300 | 60.00 (n=1) | 0.03 |' in text
  # Members are not depths: the per-depth tables hold only the DDNN depths.
  assert '(0,)' not in text and 'Ablations' not in text


def _event_file(workdir, name, wall_times, train_steps):
  """A TensorBoard event file: its creation event at wall_times[0], then a
  `train/loss` scalar at each of train_steps, at the following wall times."""
  import tensorflow as tf
  from tensorflow.core.framework import summary_pb2
  from tensorflow.core.util import event_pb2

  with tf.io.TFRecordWriter(str(workdir / f'events.out.tfevents.{name}')) as writer:
    writer.write(event_pb2.Event(wall_time=wall_times[0]).SerializeToString())
    for wall_time, step in zip(wall_times[1:], train_steps):
      value = summary_pb2.Summary.Value(tag='train/loss', simple_value=1.0)
      writer.write(event_pb2.Event(wall_time=wall_time, step=step,
                                   summary=summary_pb2.Summary(value=[value]))
                   .SerializeToString())


@pytest.mark.parametrize('started', [True, False])
def test_a_run_resumed_after_unrecorded_attempts_is_timed_for_all_its_steps(tmp_path,
                                                                           started):
  """A run resumed after its session was cut: the killed attempt left an event
  file but no attempts.json entry, so the recorded time covers only the steps
  after the resume, and is scaled to the whole run and marked."""
  out = tmp_path / 'out'
  # 30 steps in 3 epochs: checkpoints every 10 steps.
  resumed = _fake_run(out, 'ekd_s0', [((1, 1, 1), 0.6), ((3, 3, 3), 0.8)])
  recorded = {'seconds': 600.0, 'cpu_seconds': 1200.0, 'returncode': 0}
  if started:
    recorded['started'] = 1000.0
  (resumed / 'attempts.json').write_text(json.dumps([recorded]))
  _event_file(resumed, 'a', [100.0, 200.0, 400.0], [5, 18])    # killed after step 18
  _event_file(resumed, 'b', [1010.0, 1100.0, 1590.0], [15, 30])  # resumed from step 10
  restarted = _fake_run(out, 'joint_ce_s0', [((1, 1, 1), 0.5), ((3, 3, 3), 0.7)])
  recorded = {'seconds': 60.0, 'cpu_seconds': 120.0, 'returncode': 0}
  if started:
    recorded['started'] = 1000.0
  (restarted / 'attempts.json').write_text(json.dumps([recorded]))
  _event_file(restarted, 'a', [100.0, 150.0], [5])             # killed before a checkpoint
  _event_file(restarted, 'b', [1005.0, 1010.0, 1050.0], [5, 30])
  _fake_run(out, 'offline_kd_d1_s0', [((1, 1, 1), 0.55)])   # so the comparison table shows

  files = summarize.event_files(str(resumed))
  assert [(f['first_wall'], f['first_train_step'], f['last_train_step'])
          for f in files] == [(100.0, 5, 18), (1010.0, 15, 30)]
  run = summarize.load_run(str(resumed))
  assert run['seconds'] == pytest.approx(900.0)        # 20 of 30 steps took 600 s
  assert run['cpu_seconds'] == pytest.approx(1800.0)
  assert run['estimated_attempts'] == 1
  assert summarize.load_run(str(restarted))['seconds'] == pytest.approx(60.0)
  results = tmp_path / 'results'
  summarize.main(['--out', str(out), '--results', str(results), '--no-curves'])
  text = (results / 'cifar10_ekd.md').read_text()
  assert ('| ekd_s0 | yes (1 unrecorded attempt; recorded 67% of the steps) | ~15.0 | ~0.50 |'
          in text)
  assert '| joint_ce_s0 | yes | 1.0 | 0.03 |' in text
  assert '| **total** | | **~17.0** | **~0.57** |' in text
  assert '| ekd | ResNet-8 (1,1,1) | 3,000 | 0.0300 | 60.00 (n=1) | ~0.50 |' in text
  assert '| joint_ce | ResNet-8 (1,1,1) | 3,000 | 0.0300 | 50.00 (n=1) | 0.03 |' in text


def test_summary_plots_curves_from_tensorboard_events(tmp_path):
  from clu import metric_writers

  out = tmp_path / 'out'
  workdir = _fake_run(out, 'ekd_s0', [((1, 1, 1), 0.6), ((3, 3, 3), 0.8)], step=30)
  writer = metric_writers.SummaryWriter(str(workdir))
  for step in (10, 20, 30):
    writer.write_scalars(step, {'eval/d1-1-1/top1': step / 100, 'train/d1-1-1/ce': 3 / step})
  writer.close()
  curves = summarize.read_curves(str(workdir))
  assert curves['eval/d1-1-1/top1'] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.2)),
                                        (30, pytest.approx(0.3))]
  results = tmp_path / 'results'
  summarize.main(['--out', str(out), '--results', str(results)])
  assert (results / 'curves_ekd.png').stat().st_size > 1000


def test_summary_without_runs_is_an_error(tmp_path):
  with pytest.raises(SystemExit, match='no runs in'):
    summarize.main(['--out', str(tmp_path), '--results', str(tmp_path / 'r')])


def test_feature_stats_on_a_tiny_ddnn():
  import jax
  import numpy as np

  from ddnn_jax import models

  feature_stats = _load('feature_stats')
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.25)
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  depths = ((1, 1, 1), (3, 3, 3))
  variables = models.init_variables(model, jax.random.key(0), images, depths)
  stats = feature_stats.stage_statistics(model, variables, depths, images)
  assert set(stats) == {'d1-1-1', 'd3-3-3'}
  assert [r['stage'] for r in stats['d1-1-1']] == [1, 2, 3]
  for r in stats['d3-3-3']:  # the full net against itself
    assert r['zscore_distance'] == pytest.approx(0.0, abs=1e-6)
  for r in stats['d1-1-1'] + stats['d3-3-3']:
    assert r['spatial_cv'] > 0 and 0 <= r['zero_fraction'] <= 1
