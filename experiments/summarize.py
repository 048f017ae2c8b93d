"""Tables and curves from the runs of experiments/cifar10_ekd.py.

  python experiments/summarize.py --out /tmp/cifar10_ekd --results docs/results

Reads every OUT/<run>/eval_validation.json (final per-depth metrics),
DONE.json / attempts.json (wall time) and the TensorBoard events (curves), and
writes RESULTS/cifar10_ekd.md (the tables docs/RESULTS.md quotes),
RESULTS/cifar10_ekd.json (every number behind them) and
RESULTS/curves_<method>.png. Unfinished runs are listed, not averaged.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics

from ddnn_jax import reporting

RUN_NAME = re.compile(r'^(?P<group>.+)_s(?P<seed>\d+)$')
DEPTH_NAMES = {(1, 1, 1): 'ResNet-8 (1,1,1)', (2, 2, 2): 'ResNet-14 (2,2,2)',
               (3, 3, 3): 'ResNet-20 (3,3,3)'}


# The comparison methods' groups (experiments/cifar10_ekd.py comparison_runs):
# what each is, for the comparison table; their nets are named members
# (branch1, a peer's preset, d1-1-1), not depths of one DDNN.
COMPARISON = {
    'depth_pruning': 'depth pruning (cut + fine-tune)',
    'offline_kd_d1': 'offline KD, student (1,1,1)',
    'offline_kd_d2': 'offline KD, student (2,2,2)',
    'one': 'ONE (3 branches, gated ensemble)',
    'mcod': 'MCOD (3 peers)',
    'indistill_d1': 'InDistill, student (1,1,1)',
}
# The study's bar for the DDNN's full net: at most this many points below the
# individually trained net of the same depth (issue 15).
FULL_NET_BAR = 0.3
# Runs these methods start from (a frozen teacher or the net they prune).
FROM_FULL_NET = ('depth_pruning', 'offline_kd_d1', 'offline_kd_d2', 'indistill_d1')


def depth_name(depth) -> str:
  depth = tuple(depth)
  return DEPTH_NAMES.get(depth, str(depth))


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalar series from the run's TensorBoard event files: tag -> [(step, value)]."""
  return {tag: sorted(points.items())
          for tag, points in reporting.read_scalars(workdir).items()}


def load_run(workdir: str) -> dict | None:
  name = os.path.basename(workdir.rstrip('/'))
  match = RUN_NAME.match(name)
  if not match:
    return None
  group = match['group']
  # individual_d1 / _d2 / _d3 are one method, one standalone net per depth.
  method = 'individual' if group.startswith('individual_d') else group
  run = {'name': name, 'group': method, 'seed': int(match['seed']),
         'workdir': workdir, 'done': os.path.exists(os.path.join(workdir, 'DONE.json'))}
  attempts = []
  attempts_path = os.path.join(workdir, 'attempts.json')
  if os.path.exists(attempts_path):
    with open(attempts_path) as f:
      attempts = json.load(f)
    run['seconds'] = sum(a['seconds'] for a in attempts)
    # Attempts recorded before CPU time was kept count their wall time x cores.
    run['cpu_seconds'] = sum(a.get('cpu_seconds', a['seconds'] * (os.cpu_count() or 1))
                             for a in attempts)
  settings_path = os.path.join(workdir, 'driver_settings.json')
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      run['settings'] = json.load(f)
  if not run['done']:
    return run
  with open(os.path.join(workdir, 'DONE.json')) as f:
    done = json.load(f)
  if 'rebuilt_from_release' in done:  # experiments/study_records.py from-release
    run['rebuilt_from'] = done['rebuilt_from_release']
  eval_path = os.path.join(workdir, 'eval_validation.json')
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      run['eval'] = json.load(f)
  if attempts:
    _scale_to_whole_run(run, attempts, event_files(workdir))
  for path in glob.glob(os.path.join(workdir, 'eval_validation_bnrecal*.json')):
    with open(path) as f:
      scored = json.load(f)
    if scored.get('depths'):
      run['recalibrated'] = scored
  return run


def event_files(workdir: str) -> list[dict]:
  """What each TensorBoard event file in `workdir` says about the attempt that
  wrote it (each training process writes its own file), oldest first:
  `first_wall` (its first event is the file's creation) and
  `first_train_step`/`last_train_step` (its `train/*` scalars; None if none)."""
  import tensorflow as tf  # as reporting.read_scalars: only event readers need TF

  files = []
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    walls, steps = [], []
    for event in tf.compat.v1.train.summary_iterator(path):
      walls.append(event.wall_time)
      if any(value.tag.startswith('train/') for value in event.summary.value):
        steps.append(event.step)
    if walls:
      files.append({'first_wall': min(walls),
                    'first_train_step': min(steps) if steps else None,
                    'last_train_step': max(steps) if steps else None})
  return sorted(files, key=lambda f: f['first_wall'])


def _scale_to_whole_run(run: dict, attempts: list[dict], files: list[dict]) -> None:
  """Scales a resumed run's time to the whole run, marked as an estimate.

  The driver appends an attempt to attempts.json when its training process
  ends; a process killed with its session (and the driver with it) leaves only
  its event file, so the recorded time covers only the steps trained after the
  last resume. Those steps are counted from the recorded attempts' event files
  (a resume starts at an epoch checkpoint: the epoch before the first logged
  step), and the recorded wall and CPU time are scaled by final step / those
  steps: the run's cost at the speed of the attempts that finished. (Wall time
  of the killed attempts is not used: the study pauses runs while other work
  holds the cores.)"""
  if all('started' in a for a in attempts):
    covered = [f for f in files
               if any(a['started'] - 1 <= f['first_wall'] <= a['started'] + a['seconds']
                      for a in attempts)]
  else:  # older records without start times: the recorded attempts came last
    covered = files[len(files) - len(attempts):] if len(files) > len(attempts) else files
  if len(covered) == len(files) or 'eval' not in run:
    return
  final_step, per_epoch = run['eval']['step'], _steps_per_epoch(run)
  trained = 0.0
  for f in covered:
    if f['first_train_step'] is None:
      continue
    start = (f['first_train_step'] - 1) // per_epoch * per_epoch if per_epoch > 1 else 0
    trained += f['last_train_step'] - start
  if trained <= 0 or trained >= final_step:  # restarted from scratch: all recorded
    return
  scale = final_step / trained
  run['seconds'] *= scale
  run['cpu_seconds'] *= scale
  run['estimated_attempts'] = len(files) - len(covered)
  run['recorded_fraction'] = 1 / scale


def _mean_sd(values: list[float]) -> dict:
  return {'mean': statistics.fmean(values),
          'sd': statistics.stdev(values) if len(values) > 1 else None,
          'values': values}


def _fmt(cell: dict | None, scale: float = 100.0) -> str:
  if not cell:
    return 'n/a'
  text = f'{cell["mean"] * scale:.2f}'
  if cell['sd'] is not None:
    text += f' ± {cell["sd"] * scale:.2f}'
  return f'{text} (n={len(cell["values"])})'


def _result(run: dict, key: str) -> dict | None:
  """A run's evaluation under `key` ('eval' or 'recalibrated'); standalone
  `individual` nets have no re-calibrated one and keep their own."""
  return run.get('eval') if run['group'] == 'individual' or key == 'eval' else run.get(key)


def aggregate(runs: list[dict], key: str = 'eval') -> dict:
  """group -> depth tuple -> metric -> mean/sd over seeds; plus costs per depth.

  `key`: 'eval' (the run's own evaluation) or 'recalibrated' (after per-depth
  BN re-calibration; standalone `individual` nets keep their own evaluation).
  """
  table = collections.defaultdict(lambda: collections.defaultdict(
      lambda: collections.defaultdict(list)))
  costs = {}
  for run in runs:
    group = run['group']
    if group in COMPARISON:
      continue
    result = _result(run, key)
    if result is None:
      continue
    for row in result['depths']:
      depth = tuple(row['depth'])
      for metric in ('top1', 'top5', 'loss', 'kl_to_full', 'agreement'):
        if metric in row:
          table[group][depth][metric].append(row[metric])
      if 'params' in row:
        costs[depth] = {'params': row['params'], 'flops': row['flops']}
  summary = {group: {depth: {m: _mean_sd(v) for m, v in metrics.items()}
                     for depth, metrics in by_depth.items()}
             for group, by_depth in table.items()}
  return {'summary': summary, 'costs': costs}


def _main_table(summary: dict, costs: dict, depths: list) -> list[str]:
  main_groups = [g for g in ('ekd', 'joint_ce', 'individual') if g in summary]
  header = ['depth', 'params', 'GFLOPs'] + [f'{g} top-1' for g in main_groups]
  diffs = [(a, b) for a, b in (('ekd', 'individual'), ('ekd', 'joint_ce'))
           if a in summary and b in summary]
  header += [f'{a} − {b}' for a, b in diffs]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for depth in depths:
    cells = [depth_name(depth), f'{costs[depth]["params"]:,}',
             f'{costs[depth]["flops"] / 1e9:.4f}']
    for g in main_groups:
      cells.append(_fmt(summary[g].get(depth, {}).get('top1')))
    for a, b in diffs:
      e = summary[a].get(depth, {}).get('top1')
      i = summary[b].get(depth, {}).get('top1')
      cells.append(f'{(e["mean"] - i["mean"]) * 100:+.2f}' if e and i else 'n/a')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def markdown(runs: list[dict], agg: dict, recal: dict, out: str) -> str:
  """`agg`, `recal`: aggregate(runs) and aggregate(runs, 'recalibrated')."""
  summary, costs = agg['summary'], {**recal['costs'], **agg['costs']}
  depths = sorted(costs, key=sum)
  lines = [f'Generated by `python experiments/summarize.py --out {out}` from the runs '
           'of `experiments/cifar10_ekd.py`. Validation = the fixed 5,000-image '
           'hold-out of the CIFAR-10 training JPEGs; top-1 in %, mean ± sample SD over '
           'seeds (n = number of seeds).', '']
  rebuilt = sorted(r['name'] for r in runs if 'rebuilt_from' in r)
  if rebuilt:
    lines += [f'Rebuilt from their releases (`experiments/study_records.py from-release`; '
              f'run folder lost, so no plain DDNN evaluation, curves or time): '
              f'{", ".join(rebuilt)}.', '']
  lines += _main_table(summary, costs, depths)
  recal = recal['summary']
  if any(g != 'individual' for g in recal):
    lines += ['', 'The same after re-estimating each depth\'s BatchNorm statistics '
              '(`--recalibrate_bn`, see below; `individual` nets as trained):', '']
    lines += _main_table(recal, costs, depths)
  lines += _claim_table(runs, recal, depths)
  lines += _comparison_table(runs, summary, recal, costs, depths)
  lines += _ablation_table(summary, depths)
  lines += _agreement_table({**summary, **{g: recal[g] for g in recal if g != 'individual'}},
                            depths)
  lines += _recalibration_table(runs, depths)
  lines += _time_table(runs)
  return '\n'.join(lines) + '\n'


def _cpu_hours(runs: list[dict], group: str) -> str | None:
  """Mean CPU hours of a group's finished runs (one run per seed), `~` where a
  run's time includes estimated attempts."""
  timed = [r for r in runs if r['group'] == group and r['done'] and 'cpu_seconds' in r]
  return _hours_text(timed)


def _hours_text(timed: list[dict]) -> str | None:
  if not timed:
    return None
  mean = statistics.fmean(r['cpu_seconds'] / 3600 for r in timed)
  return f'{"~" if any("estimated_attempts" in r for r in timed) else ""}{mean:.2f}'


def compare_nets(runs: list[dict]) -> dict:
  """(comparison group, net name) -> top1 mean/sd over seeds, params, flops."""
  table = collections.defaultdict(list)
  costs = {}
  for run in runs:
    if run['group'] in COMPARISON and 'eval' in run:
      for row in run['eval']['depths']:
        key = (run['group'], row.get('name') or depth_name(row['depth']))
        table[key].append(row['top1'])
        costs[key] = {'params': row.get('params'), 'flops': row.get('flops')}
  return {key: {'top1': _mean_sd(values), **costs[key]} for key, values in table.items()}


def _comparison_table(runs: list[dict], summary: dict, recal: dict, costs: dict,
                      depths: list) -> list[str]:
  """Every deployable net of every method: top-1, its size and its run's cost."""
  nets = compare_nets(runs)
  if not nets:
    return []
  lines = ['', 'Every method at the same recipe and epochs (comparison methods: '
           '`--comparison`). One row per deployable net; ekd and joint_ce after '
           'BatchNorm re-calibration. CPU hours: one run (one seed) of the method, '
           'on this machine; `+ teacher`: the method also needs the individually '
           'trained ResNet-20 it starts from (individual, 3,3,3 row); `~`: a run '
           'resumed after unrecorded attempts, its time scaled to the whole run (see '
           'the time table).', '',
           '| method | net | params | GFLOPs | top-1 | CPU hours per run |',
           '|---|---|---|---|---|---|']

  def row(method, net, cost, top1, hours, extra=''):
    params = 'n/a' if cost.get('params') is None else f'{cost["params"]:,}'
    flops = 'n/a' if cost.get('flops') is None else f'{cost["flops"] / 1e9:.4f}'
    hours_text = 'n/a' if hours is None else f'{hours}{extra}'
    lines.append(f'| {method} | {net} | {params} | {flops} | {_fmt(top1)} | {hours_text} |')

  for group in ('ekd', 'joint_ce'):
    source = recal.get(group) or summary.get(group)
    for depth in depths if source else ():
      row(group, depth_name(depth), costs[depth], source.get(depth, {}).get('top1'),
          _cpu_hours(runs, group))
  for depth in depths if 'individual' in summary else ():
    timed = [r for r in runs if 'eval' in r and 'cpu_seconds' in r
             and r['name'].startswith(f'individual_d{depth[0]}_s')]
    row('individual', depth_name(depth), costs[depth],
        summary['individual'].get(depth, {}).get('top1'), _hours_text(timed))
  for group in COMPARISON:
    for (g, net), cell in nets.items():
      if g == group:
        extra = ' + teacher' if group in FROM_FULL_NET else ''
        row(COMPARISON[group], net, cell, cell['top1'], _cpu_hours(runs, group), extra)
  return lines


def _top1_by_seed(runs: list[dict], group: str) -> dict:
  """depth -> seed -> top-1 of a group's runs after BN re-calibration (the
  values aggregate(runs, 'recalibrated') averages; individual nets as trained)."""
  table = collections.defaultdict(dict)
  for run in runs:
    if run['group'] != group:
      continue
    for row in (_result(run, 'recalibrated') or {}).get('depths', []):
      table[tuple(row['depth'])][run['seed']] = row['top1']
  return table


def _reading(diff: float, a: dict, b: dict) -> str:
  """How a difference of seed means (in points) compares with the seed spread:
  the larger of the two SDs, defined only where both sides have two seeds."""
  if a['sd'] is None or b['sd'] is None:
    return 'one seed: no spread'
  spread = max(a['sd'], b['sd']) * 100
  side = 'ahead' if diff > 0 else 'behind'
  return f'{side} by more than the spread ({spread:.2f})' if abs(diff) > spread else (
      f'{side}, within the spread ({spread:.2f})')


def _claim_table(runs: list[dict], recal: dict, depths: list) -> list[str]:
  """The study's question for every DDNN variant, after BN re-calibration: do
  its sub-nets beat the individual nets and joint CE by more than the spread
  over seeds, and is its full net within FULL_NET_BAR points of the individual
  one?"""
  reference = recal.get('individual', {})
  joint = recal.get('joint_ce', {})
  variants = [g for g in recal if g not in ('individual', 'joint_ce')]
  variants = sorted(variants, key=lambda g: (g != 'ekd', g)) + (['joint_ce'] if joint else [])
  if not reference or not variants:
    return []
  full = depths[-1]
  lines = ['', 'The question of the study, per DDNN variant (after BatchNorm '
           're-calibration; individual nets as trained): difference of the seed '
           'means in points, the same difference within each seed that both sides '
           'ran (seed: difference), and how it compares with the spread (the larger '
           'of the two SDs, n >= 2 on both sides). For the full net the bar is '
           f'{FULL_NET_BAR} points below the individual one.', '',
           '| variant | depth | top-1 | − individual | per seed | reading | − joint_ce | reading |',
           '|---|---|---|---|---|---|---|---|']
  by_seed_ref = _top1_by_seed(runs, 'individual')
  for group in variants:
    by_seed = _top1_by_seed(runs, group)
    for depth in depths:
      own = recal[group].get(depth, {}).get('top1')
      if not own:
        continue
      cells = [group, depth_name(depth), _fmt(own)]
      ref = reference.get(depth, {}).get('top1')
      if ref:
        diff = (own['mean'] - ref['mean']) * 100
        seeds = sorted(set(by_seed[depth]) & set(by_seed_ref[depth]))
        cells += [f'{diff:+.2f}', ', '.join(
            f'{s}: {(by_seed[depth][s] - by_seed_ref[depth][s]) * 100:+.2f}' for s in seeds)
            or 'n/a']
        if depth == full:
          cells.append(f'full net {"within" if diff >= -FULL_NET_BAR else "outside"} '
                       f'the {FULL_NET_BAR}-point bar')
        else:
          cells.append(_reading(diff, own, ref))
      else:
        cells += ['n/a', 'n/a', 'n/a']
      other = joint.get(depth, {}).get('top1') if group != 'joint_ce' else None
      if other:
        diff = (own['mean'] - other['mean']) * 100
        cells += [f'{diff:+.2f}', _reading(diff, own, other)]
      else:
        cells += ['n/a', 'n/a']
      lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _ablation_table(summary: dict, depths: list) -> list[str]:
  """The ablations' own evaluation, mean ± SD over the seeds each has, with ekd
  and joint_ce for reference where their runs kept that evaluation (a run
  rebuilt from its release has only the re-calibrated one)."""
  ablations = [g for g in summary if g not in ('ekd', 'joint_ce', 'individual')
               and g not in COMPARISON]
  if not ablations:
    return []
  groups = [g for g in ('ekd', 'joint_ce') if g in summary] + sorted(ablations)
  lines = ['', 'Ablations (their own evaluation, mean ± SD over seeds; `ekd` and '
           '`joint_ce` for reference, from their runs that kept it):', '',
           '| variant | ' + ' | '.join(depth_name(d) for d in depths) + ' |',
           '|---|' + '---|' * len(depths)]
  for g in groups:
    lines.append(f'| {g} | ' + ' | '.join(_fmt(summary[g].get(depth, {}).get('top1'))
                                           for depth in depths) + ' |')
  return lines


def _agreement_table(summary: dict, depths: list) -> list[str]:
  lines = ['', 'Agreement with the full net and KL(full || depth) on validation '
           '(seed means; after BN re-calibration where the run has it):', '',
           '| method | depth | top-5 | agreement % | KL to full |', '|---|---|---|---|---|']
  for g in [g for g in ('ekd', 'joint_ce') if g in summary]:
    for depth in depths:
      m = summary[g].get(depth)
      if m:
        cells = [f'{m[k]["mean"] * scale:{spec}}' if k in m else 'n/a' for k, scale, spec in
                 (('top5', 100, '.2f'), ('agreement', 100, '.2f'), ('kl_to_full', 1, '.4f'))]
        lines.append(f'| {g} | {depth_name(depth)} | ' + ' | '.join(cells) + ' |')
  return lines


def _recalibration_table(runs: list[dict], depths: list) -> list[str]:
  recalibrated = [r for r in runs if 'recalibrated' in r]
  if not recalibrated:
    return []
  batches = recalibrated[0]['recalibrated'].get('bn_recalibration_batches')
  lines = ['', f'BatchNorm statistics re-estimated per depth on {batches} training '
           'batches after training (`python -m ddnn_jax.evaluate --recalibrate_bn '
           f'{batches}`), top-1 before → after:', '',
           '| run | ' + ' | '.join(depth_name(d) for d in depths) + ' |',
           '|---|' + '---|' * len(depths)]
  for run in sorted(recalibrated, key=lambda r: r['name']):
    before = {tuple(r['depth']): f'{r["top1"] * 100:.2f}'
              for r in run.get('eval', {}).get('depths', [])}
    after = {tuple(r['depth']): r['top1'] for r in run['recalibrated']['depths']}
    cells = [f'{before.get(d, "lost")} → {after[d] * 100:.2f}' if d in after else 'n/a'
             for d in depths]
    lines.append(f'| {run["name"]} | ' + ' | '.join(cells) + ' |')
  return lines


def _time_table(runs: list[dict]) -> list[str]:
  lines = ['', 'Wall and CPU time per run on this machine (all attempts summed; CPU '
           'time of the training processes, BN re-calibration not included). `~`: '
           'the run was resumed after attempts killed with their session, which the '
           'driver never recorded; its recorded time, which covers only the steps '
           'trained after the last resume (counted from the event files), is scaled '
           'to the whole run:', '',
           '| run | finished | wall minutes | CPU hours |', '|---|---|---|---|']
  total = cpu_total = 0.0
  estimated = False
  for run in sorted(runs, key=lambda r: r['name']):
    seconds, cpu = run.get('seconds', 0.0), run.get('cpu_seconds', 0.0)
    total += seconds
    cpu_total += cpu
    if 'rebuilt_from' in run:
      lines.append(f'| {run["name"]} | yes (rebuilt from its release) | lost | lost |')
      continue
    mark = '~' if 'estimated_attempts' in run else ''
    estimated |= bool(mark)
    count = run.get('estimated_attempts', 0)
    note = (f' ({count} unrecorded attempt{"s" * (count > 1)}; recorded '
            f'{run.get("recorded_fraction", 1) * 100:.0f}% of the steps)' if mark else '')
    lines.append(f'| {run["name"]} | {"yes" if run["done"] else "no"}{note} | '
                 f'{mark}{seconds / 60:.1f} | {mark}{cpu / 3600:.2f} |')
  mark = '~' if estimated else ''
  lines.append(f'| **total** | | **{mark}{total / 60:.1f}** | **{mark}{cpu_total / 3600:.2f}** |')
  return lines


def plot_curves(runs: list[dict], results: str) -> list[str]:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  groups = collections.defaultdict(list)
  for run in runs:
    groups[run['group']].append(run)
  written = []
  for group, members in sorted(groups.items()):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in sorted(members, key=lambda r: r['name']):
      curves = read_curves(run['workdir'])
      steps_per_epoch = _steps_per_epoch(run)
      style = '-' if run['seed'] == 0 else '--'
      for tag, points in sorted(curves.items()):
        m = re.fullmatch(r'eval/([^/]+)/top1', tag)
        epochs = [s / steps_per_epoch for s, _ in points]
        if m:
          ax_acc.plot(epochs, [v * 100 for _, v in points], style, marker='.',
                      label=f'{m[1]} s{run["seed"]}')
        loss = re.fullmatch(r'train/([^/]+)/ce', tag)
        if loss:
          ax_loss.plot(epochs, [v for _, v in points], style,
                       label=f'{loss[1]} s{run["seed"]}')
    ax_loss.set(xlabel='epoch', ylabel='train cross-entropy', title=f'{group}: train CE')
    ax_acc.set(xlabel='epoch', ylabel='validation top-1 (%)',
               title=f'{group}: validation top-1')
    for ax in (ax_loss, ax_acc):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(results, f'curves_{group}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written


def _steps_per_epoch(run: dict) -> float:
  """From the finished run (final step / epochs); 1 (x axis in steps) otherwise."""
  epochs = run.get('settings', {}).get('num_epochs')
  if 'eval' in run and epochs:
    return run['eval']['step'] / epochs
  return 1.0


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='the --out of experiments/cifar10_ekd.py')
  parser.add_argument('--results', default='docs/results', help='where tables and PNGs go')
  parser.add_argument('--no-curves', action='store_true')
  args = parser.parse_args(argv)
  workdirs = sorted(glob.glob(os.path.join(args.out, '*/')))
  runs = [r for r in (load_run(w) for w in workdirs) if r]
  if not runs:
    raise SystemExit(f'error: no runs in {args.out}; run experiments/cifar10_ekd.py first')
  os.makedirs(args.results, exist_ok=True)
  agg, recal = aggregate(runs), aggregate(runs, 'recalibrated')
  text = markdown(runs, agg, recal, args.out)
  with open(os.path.join(args.results, 'cifar10_ekd.md'), 'w') as f:
    f.write(text)
  def keyed(summary):
    return {g: {','.join(map(str, d)): m for d, m in by.items()} for g, by in summary.items()}

  dump = {'runs': [{k: v for k, v in r.items() if k != 'workdir'} for r in runs],
          'summary': keyed(agg['summary']),
          'summary_bn_recalibrated': keyed(recal['summary'])}
  with open(os.path.join(args.results, 'cifar10_ekd.json'), 'w') as f:
    json.dump(dump, f, indent=2)
  if not args.no_curves:
    plot_curves(runs, args.results)
  print(text)


if __name__ == '__main__':
  main()
