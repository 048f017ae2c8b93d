"""Stage-feature diagnostics of trained runs: how spatially flat are the maps?

  python experiments/feature_stats.py /tmp/cifar10_ekd/ekd_s0 /tmp/cifar10_ekd/joint_ce_s0

For every depth and stage of each run's latest checkpoint, on the first
--images validation images (eval mode), it prints:

  spatial CV   mean over images of std/mean over positions of the channel-
               summed map (0 = a spatially constant map, which carries no
               "where" information and makes the zscore_sum attention map 0)
  zscore dist  the zscore_sum attention distance to the full net's map at that
               stage (the EKD attention term, here in eval mode)
  zero frac    fraction of exactly-zero activations (ReLU outputs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddnn_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddnn_jax import config_lib, evaluate, input_pipeline, losses, models  # noqa: E402
from ddnn_jax import mesh as mesh_lib  # noqa: E402


def first_examples(data, count: int, split: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images and labels of `split` (default data.eval_split),
  with evaluation preprocessing."""
  images, labels, seen = [], [], 0
  for batch in input_pipeline.eval_batches(data, split=split, global_batch_size=500):
    images.append(batch['image'][batch['mask']])
    labels.append(batch['label'][batch['mask']])
    seen += int(batch['mask'].sum())
    if seen >= count:
      break
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def stage_statistics(model, variables, depths, images) -> dict:
  """{depth tag: [{'stage', 'spatial_cv', 'zscore_distance', 'zero_fraction'}]}."""
  outputs = model.apply(variables, images, tuple(depths), False, method=model.forward_depths)
  full = outputs[list(depths).index(model.full_depth)]
  result = {}
  for depth, output in zip(depths, outputs):
    rows = []
    for s, features in enumerate(output.features):
      summed = features.astype(jnp.float32).sum(-1).reshape(features.shape[0], -1)
      cv = summed.std(axis=1) / jnp.maximum(jnp.abs(summed.mean(axis=1)), 1e-12)
      rows.append({
          'stage': s + 1,
          'spatial_cv': float(cv.mean()),
          'zscore_distance': float(losses.attention_distance(
              features, full.features[s], 'zscore_sum')),
          'zero_fraction': float((features == 0).mean()),
      })
    result[models.depth_tag(depth)] = rows
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='run directories (with checkpoints)')
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--json', help='also write every number to this file')
  args = parser.parse_args(argv)
  input_pipeline.hide_accelerators_from_tf()
  mesh = mesh_lib.create_mesh()
  everything = {}
  print('| run | depth | stage | spatial CV | zscore dist to full | zero frac |')
  print('|---|---|---:|---:|---:|---:|')
  for workdir in args.workdirs:
    config = config_lib.load_saved(workdir)
    method, variables, _ = evaluate.restore(workdir, config, mesh)
    images, _ = first_examples(config.data, args.images)
    stats = stage_statistics(method.model, jax.device_get(variables), method.depths,
                             images)
    name = os.path.basename(os.path.normpath(workdir))
    everything[name] = stats
    for tag, rows in stats.items():
      for r in rows:
        print(f'| {name} | {tag} | {r["stage"]} | {r["spatial_cv"]:.3f} | '
              f'{r["zscore_distance"]:.3f} | {r["zero_fraction"]:.3f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(everything, f, indent=2)


if __name__ == '__main__':
  main()
