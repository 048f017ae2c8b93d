"""The measurements behind docs/SCALING.md: ddnn_jax.aot over configs x TPU slices.

  python bench/scaling.py --out docs/scaling            # compile (resumable), then
  python bench/scaling.py --out docs/scaling --table    # print the Markdown tables

Each (config, topology) pair runs `python -m ddnn_jax.aot ... --json OUT/<name>.json`
in its own process and is skipped when its JSON exists, so an interrupted run
resumes. On two CPU cores a ResNet EKD train step takes 4-16 minutes to
compile for a TPU slice, so every pair compiles the train step and the full
net alone, and only the pairs given by `--eval CONFIG@TOPOLOGY` (default: each
config on v5litepod-256) also compile the eval programs; `--max-batch
CONFIG@TOPOLOGY` searches the largest per-chip train batch for that pair.
Needs libtpu: pip install -e '.[tpu]'.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('configs/imagenet.py', 'configs/imagenet_r34.py')
TOPOLOGIES = ('v4-32', 'v4-128', 'v5litepod-64', 'v5litepod-256')
COVERAGE = 'smoke_topologies.json'  # the smoke config over every topology (SCALING.md)


def json_name(config: str, topology: str) -> str:
  return f'{pathlib.Path(config).stem}_{topology}.json'


def measure(out: pathlib.Path, configs, topologies, evals: set[str], max_batch: set[str],
            utilization: float) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for config in configs:
    for topology in topologies:
      path = out / json_name(config, topology)
      if path.exists():
        print(f'{path.name}: done already', flush=True)
        continue
      command = [sys.executable, '-m', 'ddnn_jax.aot', '--config', config,
                 '--topology', topology, f'--utilization={utilization}',
                 '--json', str(path.with_suffix('.tmp'))]
      if f'{config}@{topology}' not in evals:
        command.append('--noeval_programs')
      if f'{config}@{topology}' in max_batch:
        command.append('--find_max_batch')
      print('+', ' '.join(command), flush=True)
      start = time.perf_counter()
      with open(path.with_suffix('.log'), 'w') as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                check=False)
      print(f'{path.name}: exit {result.returncode} after '
            f'{time.perf_counter() - start:.0f} s', flush=True)
      if path.with_suffix('.tmp').exists():  # written also when a program does not fit
        os.replace(path.with_suffix('.tmp'), path)


def _duration(seconds: float) -> str:
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


def _reports(out: pathlib.Path):
  """(config, report) for every JSON in `out`, by config, chip and slice size.
  Files are named <config stem>_<topology>; topologies hold no underscore."""
  stems = {pathlib.Path(c).stem: c for c in CONFIGS}
  found = []
  for path in out.glob('*.json'):
    config = stems.get(path.stem.rsplit('_', 1)[0])
    if config:
      found += [(config, r) for r in json.loads(path.read_text())]
  return sorted(found, key=lambda cr: (CONFIGS.index(cr[0]), cr[1]['chip'], cr[1]['chips']))


def table(out: pathlib.Path, utilization: float) -> str:
  """The SCALING.md tables from the JSON files in `out`, projected at `utilization`."""
  from ddnn_jax.tpu_slices import CHIPS

  gib = 2**30
  train = ['| config | slice | chips | batch/chip | train step GiB/chip (% of usable HBM) | '
           'GFLOP/step/chip | GFLOP/image | img/s/chip | img/s slice | ImageNet epoch | '
           'roofline img/s/chip | EKD step / full net alone |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  evals = ['| config | slice | program | batch/chip | GiB/chip | GFLOP/step/chip |',
           '|---|---|---|---:|---:|---:|']
  for config, r in _reports(out):
    chip = CHIPS[r['chip']]
    programs = {p['name']: p for p in r['programs']}
    step, proj = programs['train_step'], r['projection']
    scale = utilization / r['utilization']  # throughput is linear in the utilisation
    roofline = (f'{proj["roofline_images_per_second_per_chip"]:,.0f}'
                if 'roofline_images_per_second_per_chip' in proj else 'n/a')
    ratio = (f'{proj["flops_vs_full_net_alone"]:.2f}x'
             if 'flops_vs_full_net_alone' in proj else '-')
    name = pathlib.Path(config).name
    train.append(
        f'| {name} | {r["topology"]} | {r["chips"]} | {step["batch_per_chip"]} | '
        f'{step["total"] / gib:.2f} ({step["total"] / chip.hbm_bytes:.0%}) | '
        f'{step["flops"] / 1e9:,.0f} | {proj["flops_per_image"] / 1e9:.1f} | '
        f'{proj["images_per_second_per_chip"] * scale:,.0f} | '
        f'{proj["images_per_second"] * scale:,.0f} | '
        f'{_duration(proj["epoch_seconds"] / scale)} | {roofline} | {ratio} |')
    for p in r['programs']:
      if p['name'] not in ('train_step', 'full_net_alone'):
        evals.append(f'| {name} | {r["topology"]} | {p["name"]} | {p["batch_per_chip"]} | '
                     f'{p["total"] / gib:.2f} | {p["flops"] / 1e9:,.0f} |')
  tables = ['\n'.join(train), '\n'.join(evals)]
  coverage = out / COVERAGE
  if coverage.exists():  # one smoke-config run over many topologies (SCALING.md)
    rows = ['| --topology | libtpu topology | chips | chip | batch/chip | '
            'train step MiB/chip | GFLOP/step/chip | compile s |',
            '|---|---|---:|---|---:|---:|---:|---:|']
    for r in json.loads(coverage.read_text()):
      p = r['programs'][0]
      rows.append(f'| {r["topology"]} | {r["libtpu_topology"]} | {r["chips"]} | {r["chip"]} | '
                  f'{p["batch_per_chip"]} | {p["total"] / 2**20:.1f} | {p["flops"] / 1e9:.3f} | '
                  f'{p["compile_seconds"]:.0f} |')
    tables.append('\n'.join(rows))
  return '\n\n'.join(tables)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=REPO / 'docs' / 'scaling')
  parser.add_argument('--config', action='append', help=f'default: {", ".join(CONFIGS)}')
  parser.add_argument('--topology', action='append', help=f'default: {", ".join(TOPOLOGIES)}')
  parser.add_argument('--eval', action='append', metavar='CONFIG@TOPOLOGY',
                      help='default: ' + ', '.join(f'{c}@v5litepod-256' for c in CONFIGS))
  parser.add_argument('--max-batch', action='append', default=[], metavar='CONFIG@TOPOLOGY')
  parser.add_argument('--utilization', type=float, default=0.3,
                      help='projections are rescaled to it from the stored ones')
  parser.add_argument('--table', action='store_true', help='print the tables and exit')
  args = parser.parse_args(argv)
  if args.table:
    print(table(args.out, args.utilization))
    return 0
  evals = args.eval or [f'{c}@v5litepod-256' for c in CONFIGS]
  measure(args.out, args.config or CONFIGS, args.topology or TOPOLOGIES, set(evals),
          set(args.max_batch), args.utilization)
  return 0


if __name__ == '__main__':
  sys.exit(main())
