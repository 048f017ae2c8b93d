"""Which depth to ship under a budget: measure a trained run's candidate
depths, print the Pareto front of accuracy against cost, and pick the most
accurate depth that fits.

  python -m ddnn_jax.search --workdir DIR (--budget_gflops X | --budget_ms Y [--batch B])
      [--max_candidates 16] [--eval_batches N] [--recalibrate_bn 10]
      [--timing_runs 10] [--split NAME] [--out DIR] [--config.FIELD=VALUE ...]

Candidates: every depth the model allows (each stage 1..n blocks) when there
are at most --max_candidates of them; else the smallest depth, the full
depth, the run's trained depths and the rest spread evenly over all depths
ordered by block count (`candidate_depths`). A 'private_all' run has weights
for its trained depths only, and those are its candidates.

Each candidate is the depth's standalone net (ddnn_jax.deploy), its BatchNorm
statistics re-calibrated on --recalibrate_bn training batches, and is
measured by: GFLOPs per image (XLA's cost analysis of the batch-1 forward,
ddnn_jax.costs); latency on this machine (inference.make_forward on a batch of
--batch validation images, the median of --timing_runs timed runs after two
warm-up runs, with the run's convolutions: on a CPU that other processes keep
busy, oneDNN's OpenMP convolutions stall at their barriers and time erratically,
and --config.model.conv_impl=xla times steadily); top-1 on the first --eval_batches
batches of the validation split (0: all of it). The budget picks the cost
axis. It prints the table and the choice and writes search.json and
search_pareto.png into --out (default: the workdir). A budget that no
candidate fits, like any bad input, is one line `error: ...` and exit 2.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from ddnn_jax import costs, deploy, evaluate, inference, models, runtime
from ddnn_jax import mesh as mesh_lib

WARMUP_RUNS = 2
RESULT_FILE, PLOT_FILE = 'search.json', 'search_pareto.png'


def candidate_depths(stage_sizes: Sequence[int], max_candidates: int,
                     keep: Sequence[models.Depth] = ()) -> list[models.Depth]:
  """Every depth of `stage_sizes`, or at most `max_candidates` of them (more
  only when `keep` is longer): the smallest, the full, `keep`, and the rest
  evenly spaced in the order of block count. Sorted by block count."""
  order = lambda d: (sum(d), d)  # noqa: E731
  every = sorted(itertools.product(*(range(1, n + 1) for n in stage_sizes)), key=order)
  if len(every) <= max_candidates:
    return every
  chosen = dict.fromkeys([every[0], every[-1], *map(tuple, keep)])
  rest = [d for d in every if d not in chosen]
  need = max_candidates - len(chosen)
  chosen.update(dict.fromkeys(rest[int((k + 0.5) * len(rest) / need)] for k in range(need)))
  return sorted(chosen, key=order)


def latency_ms(net: deploy.Net, images: np.ndarray, mesh: jax.sharding.Mesh,
               runs: int) -> float:
  """Median wall time of the jitted forward of `net` on `images`, in ms."""
  forward = inference.make_forward(net.model, net.depth, mesh)
  variables = jax.device_put(net.variables, mesh_lib.replicated(mesh))
  batch = mesh_lib.global_batch({'image': images}, mesh)['image']
  for _ in range(WARMUP_RUNS):  # the first compiles
    forward(variables, batch).block_until_ready()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    forward(variables, batch).block_until_ready()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def top1(net: deploy.Net, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
         split: str | None, batch_size: int, num_batches: int) -> tuple[float, int]:
  """(top-1, examples) of `net` on the first `num_batches` batches of `split`."""
  from ddnn_jax import input_pipeline  # noqa: PLC0415

  batches = input_pipeline.eval_batches(config.data, split=split,
                                        global_batch_size=batch_size)
  metrics = evaluate.evaluate_depths(
      net.model, net.variables, itertools.islice(batches, num_batches or None),
      (net.depth,), mesh)
  return metrics[f'{models.depth_tag(net.depth)}/top1'], int(metrics['count'])


def pareto_front(rows: Sequence[dict], cost: str) -> list[dict]:
  """The rows no other row beats on both `cost` (lower) and top-1 (higher)."""
  front, best = [], -1.0
  for row in sorted(rows, key=lambda r: (r[cost], -r['top1'])):
    if row['top1'] > best:
      front.append(row)
      best = row['top1']
  return front


def _label(depth: Sequence[int]) -> str:
  return ','.join(map(str, depth))


def format_table(rows: Sequence[dict], front: Sequence[dict], best: dict,
                 batch: int) -> str:
  on_front = {tuple(r['depth']) for r in front}
  lines = [f'| depth | params | GFLOPs | ms (batch {batch}) | top-1 | Pareto |',
           '|---|---:|---:|---:|---:|:---:|']
  for r in rows:
    mark = 'yes' if tuple(r['depth']) in on_front else ''
    choice = ' **best**' if r['depth'] == best['depth'] else ''
    lines.append(f'| {_label(r["depth"])}{choice} | {r["params"]:,} | {r["gflops"]:.4g} | '
                 f'{r["ms"]:.3f} | {100 * r["top1"]:.2f} | {mark} |')
  return '\n'.join(lines)


def plot_front(rows: Sequence[dict], front: Sequence[dict], best: dict, cost: str,
               budget: float, path: str, title: str) -> None:
  import matplotlib  # noqa: PLC0415 -- loaded only when a plot is drawn
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  axis = {'gflops': 'GFLOPs per image (XLA cost analysis)',
          'ms': 'latency per batch (ms, this machine)'}[cost]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ax.scatter([r[cost] for r in rows], [100 * r['top1'] for r in rows], c='0.6', s=16,
             label='candidates')
  ax.plot([r[cost] for r in front], [100 * r['top1'] for r in front], 'o-', c='C0',
          label='Pareto front')
  for r in rows:
    ax.annotate(_label(r['depth']), (r[cost], 100 * r['top1']), textcoords='offset points',
                xytext=(4, -10), fontsize=7, color='k' if r in front else '0.5')
  ax.plot([best[cost]], [100 * best['top1']], '*', c='C3', ms=13, label='best in budget')
  ax.axvline(budget, ls='--', c='C3', lw=1, label='budget')
  ax.set_xlabel(axis)
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def search(workdir: str, config: ml_collections.ConfigDict, *,
           budget_gflops: float | None = None, budget_ms: float | None = None,
           batch: int = 1, max_candidates: int = 16, eval_batches: int = 0,
           recalibrate_bn: int = 10, timing_runs: int = 10, split: str | None = None,
           step: int | None = None, batch_size: int | None = None,
           out: str | None = None) -> dict:
  """Measures the candidates; returns (and writes) the result with the front
  and the best depth under the budget."""
  from ddnn_jax import input_pipeline  # noqa: PLC0415

  if (budget_gflops is None) == (budget_ms is None):
    raise ValueError('give one budget: --budget_gflops X (per image) or --budget_ms Y '
                     '(per batch of --batch images)')
  cost, budget = ('gflops', budget_gflops) if budget_ms is None else ('ms', budget_ms)
  if not budget > 0:
    raise ValueError(f'the budget must be positive, got {budget}')
  for name, value in (('max_candidates', max_candidates), ('recalibrate_bn', recalibrate_bn),
                      ('timing_runs', timing_runs), ('batch', batch)):
    if value < 1:
      raise ValueError(f'--{name} must be at least 1, got {value}')
  batch_size = batch_size or config.eval_batch_size
  mesh = mesh_lib.create_mesh()
  run = deploy.load_run(workdir, config, step)
  if run.model.bn_mode == 'private_all':
    depths = list(run.private_depths)
  else:
    full = run.model.full_depth
    trained = [tuple(d) for d in config.get('depths', ())  # those this net holds
               if len(d) == len(full) and all(1 <= k <= n for k, n in zip(d, full))]
    depths = candidate_depths(run.model.full_depth, max_candidates, trained)
  sample = next(input_pipeline.eval_batches(config.data, split=split,
                                            global_batch_size=batch_size))['image']
  images = np.resize(sample, (batch, *sample.shape[1:]))  # repeats a short batch
  size = config.data.image_size
  rows = []
  for depth in depths:  # costs first: a budget that nothing fits fails fast
    net = deploy.standalone(run, depth, any_statistics=True, conv_impl=None)
    rows.append({'depth': list(depth), 'params': models.count_params(net.variables['params']),
                 'gflops': costs.compiled_flops(net.model, net.variables, depth, size) / 1e9,
                 'ms': latency_ms(net, images, mesh, timing_runs)})
  cheapest = min(rows, key=lambda r: r[cost])
  if cheapest[cost] > budget:
    unit = 'GFLOPs' if cost == 'gflops' else f'ms per batch of {batch}'
    raise ValueError(
        f'no candidate depth fits --budget_{cost} {budget}: the cheapest, '
        f'{_label(cheapest["depth"])}, needs {cheapest[cost]:.4g} {unit}; raise the budget')
  for row in rows:
    net = deploy.standalone(run, row['depth'], any_statistics=True, conv_impl=None)
    net = deploy.recalibrated(net, config, mesh, recalibrate_bn, batch_size)
    row['top1'], examples = top1(net, config, mesh, split=split, batch_size=batch_size,
                                 num_batches=eval_batches)
  front = pareto_front(rows, cost)
  best = max((r for r in rows if r[cost] <= budget), key=lambda r: (r['top1'], -r[cost]))
  result = {
      'workdir': workdir, 'step': run.step, 'model': config.model.name,
      'budget': {cost: budget, **({'batch': batch} if cost == 'ms' else {})},
      'all_depths': int(np.prod(run.model.full_depth)), 'candidates': len(rows),
      'recalibrate_bn': recalibrate_bn, 'split': split or config.data.eval_split,
      'examples': examples, 'timing_runs': timing_runs, 'device': jax.devices()[0].device_kind,
      'rows': rows, 'front': [r['depth'] for r in front], 'best': best,
  }
  target = epath.Path(out or workdir)
  target.mkdir(parents=True, exist_ok=True)
  (target / RESULT_FILE).write_text(json.dumps(result, indent=2) + '\n')
  title = (f'{config.model.name}, step {run.step}: top-1 on {examples} {result["split"]} '
           f'images; budget {budget} {"GFLOPs" if cost == "gflops" else "ms"}')
  plot_front(rows, front, best, cost, budget, str(target / PLOT_FILE), title)
  result['table'] = format_table(rows, front, best, batch)
  return result


def summary(result: dict) -> str:
  best, cost = result['best'], next(iter(result['budget']))
  unit = 'GFLOPs per image' if cost == 'gflops' else f'ms per batch of {result["budget"]["batch"]}'
  return '\n'.join([
      f'{result["candidates"]} of {result["all_depths"]} depths, BatchNorm re-calibrated on '
      f'{result["recalibrate_bn"]} batches, top-1 on {result["examples"]} '
      f'{result["split"]} images, latency the median of {result["timing_runs"]} runs '
      f'({result["device"]})', '', result['table'], '',
      'Pareto front: ' + '  '.join(_label(d) for d in result['front']),
      f'best under {result["budget"][cost]} {unit}: {_label(best["depth"])} '
      f'(top-1 {100 * best["top1"]:.2f}%, {best["gflops"]:.4g} GFLOPs, '
      f'{best["ms"]:.3f} ms)'])


# ---------------------------------------------------------------- command line


def define_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags on `values` (evaluate.parse_flags calls it)."""
  define = dict(flag_values=values)
  flags.DEFINE_string('workdir', None, 'The trained (or released) run.', **define)
  flags.DEFINE_float('budget_gflops', None, 'Budget: GFLOPs per image.', **define)
  flags.DEFINE_float('budget_ms', None, 'Budget: ms per batch of --batch images.', **define)
  flags.DEFINE_integer('batch', 1, 'Images per timed forward.', **define)
  flags.DEFINE_integer('max_candidates', 16, 'At most this many depths are measured.',
                       **define)
  flags.DEFINE_integer('eval_batches', 0, 'Validation batches scored (0: the whole '
                       'split).', **define)
  flags.DEFINE_integer('recalibrate_bn', 10, "Training batches that re-estimate each "
                       "depth's BatchNorm statistics.", **define)
  flags.DEFINE_integer('timing_runs', 10, 'Timed runs per depth (after 2 warm-up runs).',
                       **define)
  flags.DEFINE_string('split', None, 'Split scored (default: config.data.eval_split).',
                      **define)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', **define)
  flags.DEFINE_integer('batch_size', None, 'Batch size of re-calibration and scoring '
                       '(default: config.eval_batch_size).', lower_bound=1, **define)
  flags.DEFINE_string('out', None, 'Where search.json and search_pareto.png go '
                      '(default: the workdir).', **define)
  flags.mark_flag_as_required('workdir', flag_values=values)
  evaluate.define_config_flag(argv, values)


def parse_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> list[str]:
  return evaluate.parse_flags(argv, values, define=define_flags)


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """app.run's main: searches the run that the parsed `values` name."""
  del argv  # parse_flags let no positional argument through
  result = evaluate.run_or_exit(
      search, values.workdir, values.config, budget_gflops=values.budget_gflops,
      budget_ms=values.budget_ms, batch=values.batch, max_candidates=values.max_candidates,
      eval_batches=values.eval_batches, recalibrate_bn=values.recalibrate_bn,
      timing_runs=values.timing_runs, split=values.split, step=values.step,
      batch_size=values.batch_size, out=values.out)
  print(summary(result))


def _main_owning_the_process(argv: Sequence[str]) -> None:
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # Training's CPU process settings, so the latencies are those of its forward.
  runtime.configure_xla_flags()
  runtime.configure_cpu_process(flags.FLAGS.config.model.get('conv_impl', 'xla'))
  main(argv)


if __name__ == '__main__':
  app.run(_main_owning_the_process, flags_parser=parse_flags)
