"""experiments/study_records.py: a study's finished runs kept in the repository."""

import json

import pytest
from conftest import REPO, cifar10_tar
from test_checkpointing import _abstract, _state
from test_experiments import _fake_run, _load

from ddnn_jax import checkpointing

records = _load('study_records')
summarize = _load('summarize')

D1, D2, D3 = (1, 1, 1), (2, 2, 2), (3, 3, 3)


def _add_checkpoint(workdir):
  (workdir / 'checkpoints' / '30').mkdir(parents=True)
  (workdir / 'checkpoints' / '30' / 'state').write_bytes(b'\0' * 64)
  (workdir / 'events.out.tfevents.1.host').write_bytes(b'events')


def test_save_keeps_records_not_checkpoints_and_restore_lets_summarize_read_them(tmp_path):
  out, kept = tmp_path / 'out', tmp_path / 'records'
  _add_checkpoint(_fake_run(out, 'ekd_s0', [(D1, 0.60), (D3, 0.80)]))
  unfinished = out / 'joint_ce_s0'
  unfinished.mkdir(parents=True)
  (unfinished / 'attempts.json').write_text('[]')

  assert records.save(str(out), str(kept)) == ['ekd_s0']
  assert sorted(p.name for p in (kept / 'ekd_s0').iterdir()) == [
      'DONE.json', 'attempts.json', 'driver_settings.json', 'eval_validation.json',
      'events.out.tfevents.1.host']
  assert not (kept / 'joint_ce_s0').exists()
  assert records.save(str(out), str(kept)) == []  # nothing new

  lost = tmp_path / 'new_out'
  assert records.restore(str(lost), str(kept)) == ['ekd_s0']
  assert records.restore(str(lost), str(kept)) == []  # already there
  summarize.main(['--out', str(lost), '--results', str(tmp_path / 'r'), '--no-curves'])
  assert '| ResNet-8 (1,1,1) | 3,000 | 0.0300 | 60.00 (n=1) |' in (
      tmp_path / 'r' / 'cifar10_ekd.md').read_text()


def test_restore_sets_an_unfinished_attempt_aside(tmp_path):
  out, kept = tmp_path / 'out', tmp_path / 'records'
  _fake_run(out, 'ekd_s0', [(D1, 0.6)])
  records.save(str(out), str(kept))
  new = tmp_path / 'new_out'
  _add_checkpoint(new / 'ekd_s0')
  assert records.restore(str(new), str(kept)) == ['ekd_s0']
  assert (new / 'ekd_s0' / 'DONE.json').exists()
  assert (new / 'ekd_s0.unfinished' / 'checkpoints' / '30' / 'state').exists()


def test_summary_of_a_run_rebuilt_from_its_release(tmp_path):
  """Only the re-calibrated evaluation survives: it counts in the re-calibrated
  table, the plain one has no such row, and time is said to be lost."""
  out = tmp_path / 'out'
  workdir = out / 'ekd_s0'
  workdir.mkdir(parents=True)
  (workdir / 'DONE.json').write_text(json.dumps({'rebuilt_from_release': 'docs/x'}))
  rows = [{'depth': list(d), 'params': 1000 * sum(d), 'flops': 1e7 * sum(d), 'top1': t,
           'top5': 0.99, 'kl_to_full': 0.1, 'agreement': 0.8}
          for d, t in ((D1, 0.64), (D3, 0.82))]
  (workdir / 'eval_validation_bnrecal20.json').write_text(
      json.dumps({'bn_recalibration_batches': 20, 'depths': rows}))
  _fake_run(out, 'ekd_s1', [(D1, 0.60), (D3, 0.80)])
  (out / 'ekd_s1' / 'eval_validation_bnrecal20.json').write_text(json.dumps(
      {'bn_recalibration_batches': 20,
       'depths': [{**r, 'top1': r['top1'] - 0.02} for r in rows]}))
  summarize.main(['--out', str(out), '--results', str(tmp_path / 'r'), '--no-curves'])
  text = (tmp_path / 'r' / 'cifar10_ekd.md').read_text()
  assert 'Rebuilt from their releases' in text and ': ekd_s0.' in text
  assert '| ResNet-8 (1,1,1) | 3,000 | 0.0300 | 60.00 (n=1) |' in text  # plain: ekd_s1 only
  assert '| ResNet-8 (1,1,1) | 3,000 | 0.0300 | 63.00 ± 1.41 (n=2) |' in text  # re-calibrated
  assert '| ekd_s0 | lost → 64.00 | lost → 82.00 |' in text
  assert '| ekd_s0 | yes (rebuilt from its release) | lost | lost |' in text


@pytest.mark.skipif(cifar10_tar() is None, reason='needs the CIFAR-10 tar')
def test_from_release_scores_a_committed_release_and_matches_its_numbers(tmp_path):
  release = REPO / 'docs' / 'models' / 'study30' / 'individual_d1_s0'
  name = records.from_release(str(release), str(tmp_path), str(cifar10_tar()))
  assert name == 'individual_d1_s0'
  scored = json.loads((tmp_path / name / 'eval_validation.json').read_text())
  expected = json.loads((release / 'release.json').read_text())['top1']['d1-1-1']
  assert [r['top1'] for r in scored['depths']] == [expected]
  done = json.loads((tmp_path / name / 'DONE.json').read_text())
  assert done['rebuilt_from_release'] == 'docs/models/study30/individual_d1_s0'
  with pytest.raises(SystemExit, match='already holds records'):
    records.from_release(str(release), str(tmp_path), str(cifar10_tar()))


def _save_steps(workdir, steps):
  """Real Orbax checkpoints of a small train state at `steps` (state scaled by step)."""
  manager = checkpointing.create_manager(str(workdir), async_save=False)
  for step in steps:
    checkpointing.save(manager, step, _state(step, float(step)))
  manager.wait_until_finished()


def _restored(workdir, step):
  state = _state(step, 0.0)
  restored = checkpointing.restore(
      checkpointing.create_manager(str(workdir), async_save=False), _abstract(state))
  return int(restored.step), float(restored.params['dense']['kernel'][0, 0])


def test_park_keeps_the_newest_step_of_unfinished_runs_and_unpark_resumes_it(tmp_path):
  out, parked, new = tmp_path / 'out', tmp_path / 'parked', tmp_path / 'new_out'
  run = out / 'ekd_bn_private_all_s0'
  _save_steps(run, [10, 20])
  (run / 'config.json').write_text('{}')
  (run / 'checkpoints' / '30.orbax-checkpoint-tmp-1').mkdir()  # a write cut off
  _save_steps(out / 'ekd_bn_private_all_s0.unfinished', [5])  # an attempt set aside
  _fake_run(out, 'ekd_s0', [(D1, 0.6)])
  _save_steps(out / 'ekd_s0', [5])

  assert records.park(str(out), str(parked)) == ['ekd_bn_private_all_s0']
  assert sorted(p.name for p in parked.iterdir()) == ['ekd_bn_private_all_s0']  # not finished ones
  assert sorted(p.name for p in (parked / run.name).iterdir()) == ['checkpoints', 'config.json']
  assert [p.name for p in (parked / run.name / 'checkpoints').iterdir()] == ['20']
  assert records.park(str(out), str(parked)) == []  # step 20 is parked already

  assert records.unpark(str(new), str(parked)) == ['ekd_bn_private_all_s0']
  assert _restored(new / run.name, 20) == (20, 20.0)
  assert (new / run.name / 'config.json').exists()
  assert records.unpark(str(new), str(parked)) == []  # holds step 20 already

  _save_steps(run, [40])  # the run went on and then finished: its parked copy goes
  assert records.park(str(out), str(parked)) == ['ekd_bn_private_all_s0']
  assert [p.name for p in (parked / run.name / 'checkpoints').iterdir()] == ['40']
  (run / 'DONE.json').write_text('{}')
  assert records.park(str(out), str(parked)) == [] and not (parked / run.name).exists()


def test_unpark_leaves_a_newer_or_finished_run_alone(tmp_path):
  out, parked = tmp_path / 'out', tmp_path / 'parked'
  _save_steps(out / 'a_s0', [10])
  _save_steps(out / 'b_s0', [10])
  records.park(str(out), str(parked))
  new = tmp_path / 'new_out'
  _save_steps(new / 'a_s0', [30])  # further on here than the parked step
  (new / 'b_s0').mkdir(parents=True)
  (new / 'b_s0' / 'DONE.json').write_text('{}')
  (parked / 'c_s0' / 'checkpoints' / '10').mkdir(parents=True)  # no commit_success.txt
  assert records.unpark(str(new), str(parked)) == []
  assert _restored(new / 'a_s0', 30) == (30, 30.0)
  assert not (new / 'c_s0').exists()
  assert not (new / 'b_s0' / 'checkpoints').exists()
