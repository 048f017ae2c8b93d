"""Keeps a study's finished runs in the repository, so a lost OUT loses no result.

The driver (experiments/cifar10_ekd.py) keeps every run under OUT (/tmp by
default), which does not outlive the machine. This copies each finished run's
records (everything but its checkpoints: DONE.json, attempts.json, the driver
settings, config.json, the evaluations and the TensorBoard events) to RECORDS,
a folder committed with the results, and puts them back into a new OUT, where
the driver then skips those runs and experiments/summarize.py reads them:

  python experiments/study_records.py save --out /tmp/ddnn_study30 \\
      --records docs/results/study30/runs
  python experiments/study_records.py restore --out /tmp/ddnn_study30 \\
      --records docs/results/study30/runs

A run whose OUT was lost before its records were saved, but which was
released (python -m ddnn_jax.release), is rebuilt from its release: the
released variables are scored on the validation split, which for a DDNN gives
the re-calibrated numbers the release stores (its plain evaluation, curves and
CPU time are gone, and the records say so):

  python experiments/study_records.py from-release --release docs/models/study30/ekd_s0 \\
      --records docs/results/study30/runs --root ../shared/datasets/cifar10-jpeg-train.tar

An unfinished run's progress is lost with OUT too. `park` copies, for every
unfinished run in OUT, its newest finished checkpoint step (parameters, BN
statistics and optimizer state: under 1 MB at the study's sizes) and its
records so far into PARKED, a folder committed with the results, and drops
the parked copies of runs that have since finished; `unpark` puts a parked
run back into a new OUT, unless OUT already holds a newer step of it, so the
driver resumes it from that step instead of step 0:

  python experiments/study_records.py park --out /tmp/ddnn_study100 \\
      --parked docs/results/study100/parked
  python experiments/study_records.py unpark --out /tmp/ddnn_study100 \\
      --parked docs/results/study100/parked
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a run's records are: small files only, never checkpoints.
RECORD_PATTERNS = ('DONE.json', 'attempts.json', 'driver_settings.json', 'config.json',
                   'eval_*.json', 'eval_*.md', 'events.out.tfevents.*')


def record_files(workdir: str) -> list[str]:
  return sorted({p for pattern in RECORD_PATTERNS
                 for p in glob.glob(os.path.join(workdir, pattern)) if os.path.isfile(p)})


def _copy(files: list[str], dest: str) -> None:
  os.makedirs(dest, exist_ok=True)
  for path in files:
    shutil.copy2(path, os.path.join(dest, os.path.basename(path)))


def save(out: str, records: str) -> list[str]:
  """Copies the records of every finished run in OUT that RECORDS lacks (or
  holds older records of); returns the run names copied."""
  copied = []
  for done in sorted(glob.glob(os.path.join(out, '*', 'DONE.json'))):
    workdir = os.path.dirname(done)
    name = os.path.basename(workdir)
    dest = os.path.join(records, name)
    files = record_files(workdir)
    if os.path.isdir(dest) and sorted(os.listdir(dest)) == sorted(map(os.path.basename, files)):
      continue
    _copy(files, dest)
    copied.append(name)
  return copied


def restore(out: str, records: str) -> list[str]:
  """Copies into OUT the records of every run that OUT has not finished;
  returns the run names restored."""
  restored = []
  for done in sorted(glob.glob(os.path.join(records, '*', 'DONE.json'))):
    source = os.path.dirname(done)
    name = os.path.basename(source)
    workdir = os.path.join(out, name)
    if os.path.exists(os.path.join(workdir, 'DONE.json')):
      continue
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
      # A half-run attempt of a run the records hold finished: the records win,
      # the attempt's checkpoints are set aside rather than deleted.
      os.rename(workdir, workdir + '.unfinished')
    _copy(record_files(source), workdir)
    restored.append(name)
  return restored


def from_release(release: str, records: str, root: str) -> str:
  """Rebuilds a lost run's records from its release (see the module docstring)."""
  with open(os.path.join(release, 'release.json')) as f:
    info = json.load(f)
  name = info['source']
  dest = os.path.join(records, name)
  if os.path.exists(os.path.join(dest, 'DONE.json')):
    raise SystemExit(f'error: {dest} already holds records of {name}; delete it to rebuild')
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, name)
    shutil.copytree(release, workdir)
    cmd = [sys.executable, '-m', 'ddnn_jax.evaluate', f'--workdir={workdir}',
           f'--config.data.root={os.path.abspath(root)}']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise SystemExit(f'error: scoring {release} failed:\n{result.stderr[-2000:]}')
    with open(os.path.join(workdir, 'eval_validation.json')) as f:
      scored = json.load(f)
    got = {'d' + '-'.join(map(str, r['depth'])): r['top1'] for r in scored['depths']}
    if any(abs(got[k] - v) > 1e-6 for k, v in info['top1'].items()):
      raise SystemExit(f'error: {release} scores {got}, but its release.json says '
                       f'{info["top1"]}; not rebuilding from it')
    recalibrated = info.get('recalibrate_bn', 0) > 0
    os.makedirs(dest, exist_ok=True)
    target = (f'eval_validation_bnrecal{info["recalibrate_bn"]}.json' if recalibrated
              else 'eval_validation.json')
    if recalibrated:
      scored['bn_recalibration_batches'] = info['recalibrate_bn']
    with open(os.path.join(dest, target), 'w') as f:
      json.dump(scored, f, indent=2)
    shutil.copy2(os.path.join(release, 'config.json'), os.path.join(dest, 'config.json'))
  with open(os.path.join(dest, 'DONE.json'), 'w') as f:
    json.dump({'rebuilt_from_release': os.path.relpath(release, REPO), 'step': info['step'],
               'lost': 'the run folder; so its plain evaluation'
                       + (' (before BN re-calibration)' if recalibrated else '')
                       + ', curves and CPU time'}, f, indent=2)
  return name


def _finished_steps(workdir: str) -> list[int]:
  """The checkpoint steps of `workdir` whose write finished (Orbax writes a step
  under a temporary name and marks it with commit_success.txt when done)."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit()
                and os.path.exists(os.path.join(path, name, 'commit_success.txt')))


def park(out: str, parked: str) -> list[str]:
  """Copies each unfinished run of OUT (its newest finished checkpoint step
  and its records) into PARKED, replacing an older parked copy, and removes
  the parked copies of runs OUT has finished; returns the run names parked."""
  names = []
  for workdir in sorted(glob.glob(os.path.join(out, '*', ''))):
    workdir = os.path.dirname(workdir)
    name = os.path.basename(workdir)
    dest = os.path.join(parked, name)
    if '.' in name:
      continue  # an attempt set aside (NAME.unfinished), not a run
    if os.path.exists(os.path.join(workdir, 'DONE.json')):
      if os.path.isdir(dest):
        shutil.rmtree(dest)
      continue
    steps = _finished_steps(workdir)
    if not steps:
      continue
    if _finished_steps(dest) == steps[-1:]:
      continue  # this step is parked already
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    _copy(record_files(workdir), tmp)
    shutil.copytree(os.path.join(workdir, 'checkpoints', str(steps[-1])),
                    os.path.join(tmp, 'checkpoints', str(steps[-1])))
    if os.path.isdir(dest):
      shutil.rmtree(dest)
    os.rename(tmp, dest)  # a parked copy is whole or absent
    names.append(name)
  return names


def unpark(out: str, parked: str) -> list[str]:
  """Copies each parked run into OUT unless OUT has finished it or holds a
  step at least as new; returns the run names put back."""
  names = []
  for source in sorted(glob.glob(os.path.join(parked, '*', 'checkpoints'))):
    source = os.path.dirname(source)
    name = os.path.basename(source)
    workdir = os.path.join(out, name)
    steps = _finished_steps(source)
    if '.' in name or not steps:
      print(f'skipping {source}: not a parked run (no finished checkpoint step)')
      continue
    step = steps[-1]
    if (os.path.exists(os.path.join(workdir, 'DONE.json'))
        or _finished_steps(workdir)[-1:] >= [step]):
      continue
    _copy(record_files(source), workdir)
    shutil.copytree(os.path.join(source, 'checkpoints', str(step)),
                    os.path.join(workdir, 'checkpoints', str(step)))
    names.append(name)
  return names


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  for command in ('save', 'restore'):
    p = sub.add_parser(command)
    p.add_argument('--out', required=True, help='the --out of experiments/cifar10_ekd.py')
    p.add_argument('--records', required=True, help='the committed records folder')
  for command in ('park', 'unpark'):
    p = sub.add_parser(command)
    p.add_argument('--out', required=True, help='the --out of experiments/cifar10_ekd.py')
    p.add_argument('--parked', required=True, help='the committed folder of parked runs')
  p = sub.add_parser('from-release')
  p.add_argument('--release', required=True, help='a folder written by ddnn_jax.release')
  p.add_argument('--records', required=True)
  p.add_argument('--root', required=True, help='the training ImageFolder root or .tar')
  args = parser.parse_args(argv)
  if args.command == 'from-release':
    print(f'rebuilt {from_release(args.release, args.records, args.root)}')
    return
  if args.command in ('save', 'park') and not os.path.isdir(args.out):
    raise SystemExit(f'error: --out {args.out} does not exist')
  command = {'save': save, 'restore': restore, 'park': park, 'unpark': unpark}[args.command]
  names = command(args.out, args.parked if 'park' in args.command else args.records)
  done = args.command + ('ed' if 'park' in args.command else 'd')
  print(f'{done} {len(names)} run(s): {", ".join(names) or "none"}')


if __name__ == '__main__':
  main()
