"""EKD vs joint CE vs individual training on real CIFAR-10, in one sitting.

  python experiments/cifar10_ekd.py --root ../shared/datasets/cifar10-jpeg-train.tar \\
      --out /tmp/cifar10_ekd
  python experiments/summarize.py --out /tmp/cifar10_ekd --results docs/results

Every run trains configs/cifar10_folder.py (CIFAR-10 JPEGs through the
image_folder dataset, a fixed 5,000-image hold-out of train as 'validation')
with one recipe and the same number of epochs; only the method, the seed and,
for ablations, one EKD or BN field differ. Runs go one after another (each
uses both cores), each in OUT/<run name>:

  ekd_s{0,1}                   DDNN + EKD, the three depths in one step
  joint_ce_s{0,1}              DDNN, cross-entropy only (alpha = beta = 0)
  individual_d{1,2,3}_s{0,1}   each depth as a standalone ResNet-8/14/20
  ekd_paper_s0, ekd_kl_only_s0 EKD variants (--ablations, see ABLATIONS), seed 0
                               (--ablation-seeds N: seeds 0..N-1)
  depth_pruning_s*, offline_kd_d{1,2}_s*, one_s*, mcod_s*, indistill_d1_s*
                               the comparison methods (--comparison SEEDS; see
                               comparison_runs), after the runs above

Resumable: a run with OUT/<run>/DONE.json is skipped; an interrupted one
resumes from its latest Orbax checkpoint (ddnn_jax.main does that by itself).
Wall and CPU time per run, summed over attempts, are kept in
OUT/<run>/attempts.json; after every finished run the tables so far are
rewritten to OUT/tables/cifar10_ekd.md (experiments/summarize.py).
Each finished DDNN run is also scored with BatchNorm statistics re-estimated
per depth (`ddnn_jax.evaluate --recalibrate_bn 20`, eval_validation_bnrecal20.*).
Changing the recipe (epochs, width, ...) for an OUT that already holds runs is
refused: start a new OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summarize  # noqa: E402  -- experiments/summarize.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/cifar10_folder.py'
DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))

# One-seed EKD variants: what changes if the headline result needs explaining.
# Each sets the EKD fields it depends on, so it means the same whatever the
# defaults in configs/base.py (before the collapse issue: beta = 1, no ramp-up).
_PAPER = {'ekd.beta': 1.0, 'ekd.rampup_epochs': 0.0}
ABLATIONS = {
    # METHODS.md's EKD: z-score attention on every stage, no ramp-up.
    'ekd_paper': _PAPER,
    'ekd_at_p2': {**_PAPER, 'ekd.attention': 'at_p2'},
    'ekd_last_stage': {**_PAPER, 'ekd.stages': 'last'},
    'ekd_rampup1': {**_PAPER, 'ekd.rampup_epochs': 1.0},
    'ekd_kl_only': {'ekd.beta': 0.0, 'ekd.rampup_epochs': 0.0},
    'ekd_kl_only_rampup1': {'ekd.beta': 0.0, 'ekd.rampup_epochs': 1.0},
    # In-place distillation of weight-shared sub-nets (US-Nets, BigNAS): the
    # full net's T = 1 predictions are the sub-nets' targets, teacher detached.
    'inplace_kd': {'ekd.beta': 0.0, 'ekd.rampup_epochs': 0.0, 'ekd.temperature': 1.0,
                   'ekd.student_ce': 0.0},
    'inplace_kd_ce': {'ekd.beta': 0.0, 'ekd.rampup_epochs': 0.0, 'ekd.temperature': 1.0},
    'ekd_no_stop_grad': {'ekd.stop_gradient': False},
    # Any-depth training (ddnn_jax/any_depth.py): besides the full net and
    # (1,1,1), 2 of the other 25 depths per step; `python -m ddnn_jax.search`
    # over all 27 depths compares it with ekd_s0.
    'ekd_any_depth': {'any_depth.k': 2},
    'ekd_bn_private_stats': {'model.bn_mode': 'private_stats'},
    # Against the full net's drag (docs/RESULTS.md, depth_diagnostics.py): the
    # full net's CE counted twice, or each depth with its own BN scale and bias
    # (and statistics), so the shared head need not see one feature scale.
    'ekd_full_ce2': {'ekd.full_ce': 2.0},
    'ekd_bn_private_all': {'model.bn_mode': 'private_all'},
    # EKD's default before the 30-epoch study made 'private_all' it (the
    # study's ekd runs, pinned at an earlier commit, trained with this).
    'ekd_bn_shared': {'model.bn_mode': 'shared'},
    # The shared head trained by the full net alone: the sub-nets must feed it
    # features the full net's head reads, instead of bending it to theirs.
    'ekd_head_full': {'model.head_grad': 'full'},
    'joint_ce_bn_private_stats': {'method': 'joint_ce', 'model.bn_mode': 'private_stats'},
    # Published ways to keep the full net (docs/RESULTS.md, "Keeping the full
    # net"). Delayed sub-nets (progressive shrinking, DpS): the full net alone
    # for half the epochs, then every sub-net's loss ramped in over 2 epochs.
    'ekd_delayed15': {'ekd.subnet_start_epochs': 15.0, 'ekd.rampup_epochs': 2.0},
    # The sandwich rule as BigNAS trains it: labels for the full net only
    # (smoothed by 0.1), the sub-nets on its detached T = 1 predictions, the
    # last norm of each block zeroed at the start, the cosine floored at 5%.
    'ekd_sandwich': {'ekd.temperature': 1.0, 'ekd.student_ce': 0.0,
                     'ekd.label_smoothing': 0.1, 'ekd.rampup_epochs': 0.0,
                     'model.zero_init_residual': True, 'optim.min_lr_ratio': 0.05},
    # Gradient conflict: the sub-nets' gradient loses its part against the full
    # net's, per stage (PCGrad-style); or each shared weight's gradient is
    # the mean over the depths using it (gradient equilibrium).
    'ekd_project': {'grads.surgery': 'project'},
    'ekd_grad_eq': {'grads.equilibrium': True},
    # Warm start (Once-for-All): every depth from the seed's individually
    # trained ResNet-20, all depths fine-tuned for 10 epochs from lr 0.02.
    'ekd_warm10': {'init_from': 'INDIVIDUAL_FULL_NET', 'num_epochs': 10.0,
                   'optim.learning_rate': 0.02},
}
# An ablation's init_from of this value is the seed's individual ResNet-20
# (full_net_run: its run in OUT, else its release).
INDIVIDUAL_FULL_NET = 'INDIVIDUAL_FULL_NET'


# The ones docs/RESULTS.md reports next to the headline: the method as the
# paper defines it, and today's default without its KD ramp-up.
DEFAULT_ABLATIONS = ('ekd_paper', 'ekd_kl_only')


def full_net_run(seed: int, out: str, released: str | None) -> str:
  """Where seed's individually trained ResNet-20 is read from: its run in OUT,
  or its release in `released` when OUT holds only its records (restored by
  experiments/study_records.py after the run folder was lost)."""
  name = f'individual_d3_s{seed}'
  run = os.path.join(os.path.abspath(out), name)
  release = os.path.join(os.path.abspath(released), name) if released else None
  if (release and not os.path.isdir(os.path.join(run, 'checkpoints'))
      and os.path.isdir(os.path.join(release, 'checkpoints'))):
    return release
  return run


def comparison_runs(seed: int, out: str, epochs: float,
                    released: str | None = None) -> list[Run]:
  """The comparison methods (METHODS.md sections 3-4) at the study's recipe
  and epochs, for `seed` (--comparison). A frozen teacher, or the full net to
  prune, is that seed's individually trained ResNet-20 (individual_d3_s<seed>,
  planned before these; see full_net_run), so every method starts from the
  same full net."""
  full = full_net_run(seed, out, released)
  runs = [
      # Cut the trained full net to each depth; fine-tune the cuts for a third
      # of the epochs at a tenth of the learning rate (cost: the full net's
      # run plus this one).
      Run(f'depth_pruning_s{seed}', {
          'method': 'depth_pruning', 'seed': seed, 'init_from': full,
          'pruning.full_epochs': 0.0, 'num_epochs': max(1.0, epochs / 3),
          'optim.learning_rate': 0.01}),
      *(Run(f'offline_kd_d{d[0]}_s{seed}', {
          'method': 'offline_kd', 'seed': seed, 'teacher_workdir': full,
          'individual_depth': d}) for d in DEPTHS[:-1]),
      # ONE's ramp-up over the same share of training as its paper's 80 of 300 epochs.
      Run(f'one_s{seed}', {'method': 'one', 'seed': seed,
                           'one.rampup_epochs': round(epochs * 80 / 300, 2)}),
      Run(f'mcod_s{seed}', {'method': 'mcod', 'seed': seed, 'mcod.growth_epochs': epochs}),
      Run(f'indistill_d1_s{seed}', {
          'method': 'indistill', 'seed': seed, 'teacher_workdir': full,
          'indistill.student_depth': (1, 1, 1)}),
  ]
  return runs


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict


def recipe(args: argparse.Namespace) -> dict:
  """Fields every run shares."""
  return {
      'data.root': os.path.abspath(args.root),
      'num_epochs': args.epochs,
      'model.width_multiplier': args.width,
      'batch_size': args.batch_size,
      'optim.learning_rate': args.learning_rate,
      'eval_every_epochs': 1.0,
      'checkpoint_every_epochs': 1.0,
      'log_every_steps': 50,
      **dict(_parse_set(item) for item in args.set),
  }


def _parse_set(item: str) -> tuple[str, str]:
  key, sep, value = item.partition('=')
  if not sep or not key:
    raise SystemExit(f'error: --set {item!r} is not FIELD=VALUE (e.g. --set ekd.beta=0.5)')
  return key, value


def plan(args: argparse.Namespace) -> list[Run]:
  """Seed 0 of every method first, then the ablations, then the other seeds:
  a cut-short driver still leaves one complete comparison."""
  def main_runs(seed):
    return [Run(f'ekd_s{seed}', {'method': 'ekd', 'seed': seed}),
            Run(f'joint_ce_s{seed}', {'method': 'joint_ce', 'seed': seed}),
            *(Run(f'individual_d{d[0]}_s{seed}',
                  {'method': 'individual', 'individual_depth': d, 'seed': seed})
              for d in DEPTHS)]

  def ablation_runs(seed):
    if seed >= args.ablation_seeds:
      return []
    runs = []
    for name in _ablations(args.ablations):
      fields = {'method': 'ekd', 'seed': seed, **ABLATIONS[name]}
      if fields.get('init_from') == INDIVIDUAL_FULL_NET:
        fields['init_from'] = full_net_run(seed, args.out, args.released)
      runs.append(Run(f'{name}_s{seed}', fields))
    return runs

  runs = main_runs(0) + ablation_runs(0)
  for seed in range(1, max(args.seeds, args.ablation_seeds)):
    runs += (main_runs(seed) if seed < args.seeds else []) + ablation_runs(seed)
  for seed in range(min(args.comparison, args.seeds)):
    runs += comparison_runs(seed, args.out, args.epochs, args.released)
  if args.only:
    wanted = set(args.only.split(','))
    unknown = wanted - {r.name for r in runs}
    if unknown:
      raise SystemExit(f'error: unknown run(s) {sorted(unknown)}; known: '
                       f'{[r.name for r in runs]}')
    runs = [r for r in runs if r.name in wanted]
  return runs


def _ablations(arg: str) -> list[str]:
  if not arg or arg == 'none':
    return []
  names = list(ABLATIONS) if arg == 'all' else arg.split(',')
  unknown = [n for n in names if n not in ABLATIONS]
  if unknown:
    raise SystemExit(f'error: unknown ablation(s) {unknown}; choose from {list(ABLATIONS)} '
                     "or 'all'")
  return names


def _flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = '(' + ','.join(map(str, value)) + ')'
  return f'--config.{key}={value}'


def command(run: Run, shared: dict, workdir: str) -> list[str]:
  fields = {**shared, **run.overrides}
  return [sys.executable, '-m', 'ddnn_jax.main', '--config', CONFIG,
          f'--workdir={workdir}', *(_flag(k, v) for k, v in fields.items())]


def _check_same_settings(workdir: str, settings: dict) -> None:
  path = os.path.join(workdir, 'driver_settings.json')
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != settings:
      raise SystemExit(
          f'error: {workdir} was started with other settings ({before}); '
          'use a new --out, or delete that run to redo it with these')
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(settings, f, indent=2)


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of every finished child process so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def write_partial_tables(out: str) -> None:
  """OUT/tables/cifar10_ekd.{md,json}: experiments/summarize.py over the runs so
  far (unfinished runs listed, not averaged), rewritten after every run."""
  try:
    summarize.main(['--out', out, '--results', os.path.join(out, 'tables'), '--no-curves'])
  except SystemExit as e:  # no finished run yet
    print(f'[tables] not written: {e}', flush=True)


def _run_logged(cmd: list[str], log_path: str) -> int:
  """Runs `cmd` from the repository root, appending its output to `log_path`."""
  with open(log_path, 'a') as log:
    return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode


def recalibrate_command(workdir: str, num_batches: int) -> list[str]:
  return [sys.executable, '-m', 'ddnn_jax.evaluate', f'--workdir={workdir}',
          f'--recalibrate_bn={num_batches}']


def recalibrate(run: Run, workdir: str, num_batches: int, dry_run: bool) -> None:
  """Scores a finished DDNN run again with per-depth re-calibrated BN statistics
  (eval_validation_bnrecal<N>.json), once; standalone nets, and the comparison
  methods' nets (one depth each), need no such thing."""
  if run.overrides.get('method') not in ('ekd', 'joint_ce') or num_batches <= 0:
    return
  if os.path.exists(os.path.join(workdir, f'eval_validation_bnrecal{num_batches}.json')):
    return
  cmd = recalibrate_command(workdir, num_batches)
  print(f'[bn re-calibration] {run.name}: {" ".join(cmd[1:])}', flush=True)
  if dry_run:
    return
  if _run_logged(cmd, os.path.join(workdir, 'recalibrate.log')) != 0:
    raise SystemExit(f'error: BN re-calibration of {run.name} failed; see '
                     f'{workdir}/recalibrate.log')


def execute(run: Run, shared: dict, out: str, dry_run: bool,
            recalibrate_batches: int = 0) -> None:
  workdir = os.path.join(out, run.name)
  cmd = command(run, shared, workdir)
  done = os.path.join(workdir, 'DONE.json')
  if os.path.exists(done):
    print(f'[skip] {run.name}: finished', flush=True)
    recalibrate(run, workdir, recalibrate_batches, dry_run)
    return
  print(f'[run] {run.name}: {" ".join(cmd[1:])}', flush=True)
  if dry_run:
    return
  settings = json.loads(json.dumps({**shared, **run.overrides}))  # tuples -> lists
  _check_same_settings(workdir, settings)
  attempts_path = os.path.join(workdir, 'attempts.json')
  attempts = []
  if os.path.exists(attempts_path):
    with open(attempts_path) as f:
      attempts = json.load(f)
  start, cpu_before = time.time(), _children_cpu_seconds()
  returncode = _run_logged(cmd, os.path.join(workdir, 'train.log'))
  attempts.append({'started': start, 'seconds': time.time() - start,
                   'cpu_seconds': _children_cpu_seconds() - cpu_before,
                   'returncode': returncode})
  with open(attempts_path, 'w') as f:
    json.dump(attempts, f, indent=2)
  if returncode != 0:
    raise SystemExit(f'error: run {run.name} failed (exit {returncode}); see '
                     f'{workdir}/train.log, fix the cause and rerun this command to resume')
  total = sum(a['seconds'] for a in attempts)
  with open(done, 'w') as f:
    json.dump({'seconds': total, 'attempts': len(attempts), 'command': cmd[1:]}, f, indent=2)
  print(f'[done] {run.name}: {total / 60:.1f} min', flush=True)
  recalibrate(run, workdir, recalibrate_batches, dry_run)
  write_partial_tables(out)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', required=True,
                      help='CIFAR-10 ImageFolder root or .tar (ROOT/train/<class>/*.jpg)')
  parser.add_argument('--out', required=True, help='one folder per run goes here')
  parser.add_argument('--epochs', type=float, default=3.0)
  parser.add_argument('--width', type=float, default=0.5, help='width multiplier')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--learning-rate', type=float, default=0.1)
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='any other config field for every run (e.g. ekd.temperature=4)')
  parser.add_argument('--ablations', default=','.join(DEFAULT_ABLATIONS),
                      help="EKD variants to add: 'none', 'all' or a comma list of "
                      f'{list(ABLATIONS)} (default: %(default)s)')
  parser.add_argument('--ablation-seeds', type=int, default=1, metavar='N',
                      help='seeds 0..N-1 of each ablation, each after that seed\'s '
                           'main runs (default 1)')
  parser.add_argument('--recalibrate-bn', type=int, default=20, metavar='N',
                      help='after each DDNN run, also score it with each depth\'s BN '
                      'statistics re-estimated on N training batches (0: skip)')
  parser.add_argument('--comparison', type=int, default=0, metavar='SEEDS',
                      help='also run the comparison methods (depth_pruning, offline_kd, '
                      'one, mcod, indistill) for this many seeds, after the main runs')
  parser.add_argument('--released', default=os.path.join(REPO, 'docs', 'models', 'study30'),
                      help='released runs (python -m ddnn_jax.release): a comparison run '
                      'reads its full net from here when OUT lost that run\'s checkpoints')
  parser.add_argument('--only', help='comma-separated run names to run (default: all)')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  args = parser.parse_args(argv)
  if not os.path.exists(args.root):
    raise SystemExit(f'error: --root {args.root} does not exist; pass the CIFAR-10 '
                     'ImageFolder root or cifar10-jpeg-train.tar')
  shared = recipe(args)
  runs = plan(args)
  start = time.time()
  for run in runs:
    execute(run, shared, os.path.abspath(args.out), args.dry_run, args.recalibrate_bn)
  if not args.dry_run:
    print(f'all {len(runs)} runs finished; this invocation took '
          f'{(time.time() - start) / 60:.1f} min', flush=True)


if __name__ == '__main__':
  main()
