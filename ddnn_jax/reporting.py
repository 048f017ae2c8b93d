"""What a user reads of an evaluation: the table, the JSON, the plot; and the
scalars the trainer logged, read back from its TensorBoard event files.

`report` takes the per-depth metrics of `evaluate.evaluate_depths`, adds each
depth's parameters, compiled GFLOPs (ddnn_jax.costs) and images/s measured on
this machine, writes `eval_<label>.json`, `eval_<label>.md` and
`accuracy_vs_flops.png` into the workdir and prints the table. The trainer
calls it after its last evaluation, `python -m ddnn_jax.evaluate` after its own.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from ddnn_jax import costs, inference, models, subnets
from ddnn_jax import mesh as mesh_lib

# The per-depth metrics (evaluate.py computes them) in the order users read them.
COLUMNS = ('top1', 'top5', 'loss', 'kl_to_full', 'agreement')

# How long `report` times each depth's forward (at least two timed runs). The
# test suite sets 0: it checks that the column is filled, and a second per
# depth of every report it makes added minutes to it (tests/conftest.py).
THROUGHPUT_MIN_SECONDS = 1.0


def measure_throughput(model: models.DDNNResNet, variables, depth: models.Depth,
                       images: np.ndarray, mesh: jax.sharding.Mesh,
                       min_seconds: float | None = None) -> float:
  """Images/s of the jitted inference forward of one depth on this machine,
  timed over at least `min_seconds` (default THROUGHPUT_MIN_SECONDS) and two runs."""
  if min_seconds is None:
    min_seconds = THROUGHPUT_MIN_SECONDS
  forward = inference.make_forward(model, depth, mesh)
  images = mesh_lib.global_batch({'image': images}, mesh)['image']
  forward(variables, images).block_until_ready()  # compile and warm up
  runs, start = 0, time.perf_counter()
  while runs < 2 or time.perf_counter() - start < min_seconds:
    forward(variables, images).block_until_ready()
    runs += 1
  return runs * images.shape[0] / (time.perf_counter() - start)


def _label(row: dict) -> str:
  """A row's depth as '3,4,6,3', or the name of a member that is no depth."""
  depth = row['depth']
  if row.get('name', models.depth_tag(depth)) == models.depth_tag(depth):
    return ','.join(map(str, depth))
  return row['name']


def format_table(rows: Sequence[dict]) -> str:
  """The Markdown table of `report`'s rows, one per depth (or named member:
  a branch, a peer, an ensemble)."""
  named = any(_label(r) == r.get('name') for r in rows)
  lines = [f'| {"member" if named else "depth"} | top-1 | top-5 | loss | KL to full | '
           'agreement | params | GFLOPs | img/s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f'| {_label(r)} | {100 * r["top1"]:.2f} | '
        f'{100 * r["top5"]:.2f} | {r["loss"]:.4f} | {r["kl_to_full"]:.4f} | '
        f'{100 * r["agreement"]:.2f} | {r["params"]:,} | {r["flops"] / 1e9:.4g} | '
        f'{r["images_per_second"]:.0f} |')
  return '\n'.join(lines)


def plot_accuracy_vs_flops(rows: Sequence[dict], path: str, title: str) -> None:
  """Top-1 against GFLOPs per image, one point per depth, saved to `path`."""
  import matplotlib  # loaded only when a report is drawn
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  gflops = [r['flops'] / 1e9 for r in rows]
  top1 = [100 * r['top1'] for r in rows]
  ax.plot(gflops, top1, 'o-')
  for r, x, y in zip(rows, gflops, top1):
    ax.annotate(_label(r), (x, y), textcoords='offset points',
                xytext=(4, -10), fontsize=8)
  ax.set_xlabel('GFLOPs per image (XLA cost analysis)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(workdir: str, config: ml_collections.ConfigDict, model: models.DDNNResNet,
           variables, depths: Sequence[models.Depth], metrics: dict[str, float], *,
           step: int, label: str, sample_images: np.ndarray, mesh: jax.sharding.Mesh,
           root: str | None = None, extra: dict | None = None) -> list[dict]:
  """Adds params, GFLOPs and img/s to `metrics`; writes json, md and png; prints."""
  host_variables = jax.device_get(variables)
  image_size = sample_images.shape[1]
  rows = []
  for depth in depths:
    tag = models.member_name(model, depth)
    params = models.count_params(
        subnets.member_variables(model, host_variables, depth)['params'])
    rows.append({
        'depth': list(depth), 'name': tag, 'params': params,
        'flops': costs.compiled_flops(model, variables, depth, image_size),
        'images_per_second': measure_throughput(model, variables, depth, sample_images,
                                                mesh),
        **{name: metrics[f'{tag}/{name}'] for name in COLUMNS},
    })
  result = {'workdir': workdir, 'step': step, 'split': label, 'root': root,
            'examples': int(metrics['count']), 'model': config.model.name,
            'method': config.method, **(extra or {}), 'depths': rows}
  title = (f'{config.model.name} ({config.method}), step {step}, split {label}, '
           f'{result["examples"]} examples')
  table = format_table(rows)
  if jax.process_index() == 0:
    out = epath.Path(workdir)
    (out / f'eval_{label}.json').write_text(json.dumps(result, indent=2))
    (out / f'eval_{label}.md').write_text(f'{title}\n\n{table}\n')
    plot_accuracy_vs_flops(rows, str(out / 'accuracy_vs_flops.png'), title)
  print(title)
  print(table)
  return rows


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Every scalar the trainer wrote to `workdir`'s TensorBoard event files:
  tag -> {step: value} (clu writes them as tensors; older writers as
  simple_value)."""
  import tensorflow as tf  # only this reads events; TF stays out of the rest

  series = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          number = tf.make_ndarray(value.tensor)
          if number.ndim == 0 and number.dtype.kind in 'fiu':
            series[value.tag][event.step] = float(number)
        elif value.HasField('simple_value'):
          series[value.tag][event.step] = value.simple_value
  return dict(series)
