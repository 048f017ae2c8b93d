"""The measurements behind docs/SCALING.md: ddnn_jax.aot over configs x TPU slices.

  python bench/scaling.py --out docs/scaling            # compile (resumable), then
  python bench/scaling.py --out docs/scaling --table    # print the Markdown tables

Each (config, topology) pair runs `python -m ddnn_jax.aot ... --json OUT/<name>.json`
in its own process and is skipped when its JSON exists, so an interrupted run
resumes. On two CPU cores a ResNet-50 EKD train step takes 5-13 minutes to
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


def _fmt_seconds(seconds: float) -> str:
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


def table(out: pathlib.Path) -> str:
  """One row per (config, topology) from the JSON files in `out`."""
  rows = ['| config | slice | chips | batch/chip | train step GiB/chip (of HBM) | '
          'eval step GiB/chip | train GFLOP/step/chip | GFLOP/image | img/s/chip | '
          'img/s slice | ImageNet epoch | EKD / full net alone | largest batch/chip |',
          '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for config in CONFIGS:
    for path in sorted(out.glob(f'{pathlib.Path(config).stem}_*.json'),
                       key=lambda p: (p.stem.split('_')[-1][:2], json.loads(
                           p.read_text())[0]['chips'])):
      for r in json.loads(path.read_text()):
        programs = {p['name']: p for p in r['programs']}
        step, proj = programs['train_step'], r['projection']
        eval_step = programs.get('eval_step')
        gib = 2**30
        rows.append(
            f'| {pathlib.Path(config).name} | {r["topology"]} | {r["chips"]} | '
            f'{step["batch_per_chip"]} | {step["total"] / gib:.2f} '
            f'({step["total"] / r["hbm_bytes"]:.0%}) | '
            + (f'{eval_step["total"] / gib:.2f}' if eval_step else '-') + ' | '
            f'{step["flops"] / 1e9:,.0f} | {proj["flops_per_image"] / 1e9:.1f} | '
            f'{proj["images_per_second_per_chip"]:,.0f} | {proj["images_per_second"]:,.0f} | '
            f'{_fmt_seconds(proj["epoch_seconds"])} | '
            + (f'{proj["flops_vs_full_net_alone"]:.2f}x' if 'flops_vs_full_net_alone' in proj
               else '-') + ' | '
            + (str(r['max_batch_per_chip']) if r.get('max_batch_per_chip') else '-') + ' |')
  return '\n'.join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=REPO / 'docs' / 'scaling')
  parser.add_argument('--config', action='append', help=f'default: {", ".join(CONFIGS)}')
  parser.add_argument('--topology', action='append', help=f'default: {", ".join(TOPOLOGIES)}')
  parser.add_argument('--eval', action='append', metavar='CONFIG@TOPOLOGY',
                      help='default: ' + ', '.join(f'{c}@v5litepod-256' for c in CONFIGS))
  parser.add_argument('--max-batch', action='append', default=[], metavar='CONFIG@TOPOLOGY')
  parser.add_argument('--utilization', type=float, default=0.35)
  parser.add_argument('--table', action='store_true', help='print the tables and exit')
  args = parser.parse_args(argv)
  if args.table:
    print(table(args.out))
    return 0
  evals = args.eval or [f'{c}@v5litepod-256' for c in CONFIGS]
  measure(args.out, args.config or CONFIGS, args.topology or TOPOLOGIES, set(evals),
          set(args.max_batch), args.utilization)
  return 0


if __name__ == '__main__':
  sys.exit(main())
