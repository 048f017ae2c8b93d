"""Where a trained DDNN's full net loses to the same net trained alone.

  python experiments/depth_diagnostics.py --root ../shared/datasets/cifar10-jpeg-train.tar \\
      docs/models/study30/{ekd_s0,joint_ce_s0,individual_d3_s0}

For each run (a run directory or a release) and each of its depths, with the
BatchNorm statistics the run evaluates with, on the first --images training
images (evaluation preprocessing, no augmentation) and the first --images
validation images:

  train CE / top-1, validation CE / top-1, and their gaps: does a depth lose
               by fitting the training data less (optimisation, capacity) or
               by generalising worse?
  residual ratio per block: mean over images of ||F(x)|| / ||shortcut(x)||,
               the residual branch's output (after its last BatchNorm) against
               what the block adds it to; a block near 0 barely changes its
               input. Reported for every block the depth runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddnn_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from feature_stats import first_examples  # noqa: E402  -- experiments/feature_stats.py

from ddnn_jax import (  # noqa: E402
  config_lib,
  evaluate,
  inference,
  input_pipeline,
  losses,
  models,
  subnets,
)
from ddnn_jax import mesh as mesh_lib  # noqa: E402


def _norm(x: jax.Array) -> jax.Array:
  """Per-image L2 norm of a (batch, H, W, C) map."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2, 3)))


def residual_ratios(model, variables, depth, images) -> dict[str, float]:
  """{'stage<s>_block<b>': mean ||F(x)|| / ||shortcut(x)||} for the blocks `depth` runs.

  Measured on the depth's standalone net (subnets.extract_subnet: the same
  function, its norm layers under the plain names in every BN mode)."""
  depth = tuple(depth)
  standalone = model.clone(stage_sizes=depth, bn_mode='shared')
  _, state = standalone.apply(subnets.extract_subnet(variables, depth), images, (depth,),
                              False, method=standalone.forward_depths,
                              capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']
  last_bn = 'bn2' if model.block == 'basic' else 'bn3'
  ratios = {}
  previous = inter['stem']['__call__'][0]
  for s, num_blocks in enumerate(depth):
    for b in range(num_blocks):
      block = inter[f'stage{s + 1}_block{b}']
      branch = block[last_bn]['__call__'][0]
      shortcut = block['proj_bn']['__call__'][0] if 'proj_bn' in block else previous
      ratio = _norm(branch) / jnp.maximum(_norm(shortcut), 1e-12)
      ratios[f'stage{s + 1}_block{b}'] = float(ratio.mean())
      previous = block['__call__'][0]
  return ratios


def depth_report(model, variables, depth, train, validation, mesh) -> dict:
  row = {'depth': list(depth)}
  forward = inference.make_forward(model, depth, mesh)
  for name, (images, labels) in (('train', train), ('validation', validation)):
    logits = jnp.concatenate([forward(variables, images[i:i + 500])
                              for i in range(0, len(images), 500)])
    row[f'{name}_ce'] = float(losses.cross_entropy(logits, labels))
    row[f'{name}_top1'] = float((jnp.argmax(logits, -1) == labels).mean())
  row['ce_gap'] = row['validation_ce'] - row['train_ce']
  row['top1_gap'] = row['train_top1'] - row['validation_top1']
  row['residual_ratio'] = residual_ratios(model, variables, depth, validation[0][:500])
  return row


def run_names(workdirs: list[str]) -> list[str]:
  """A row label per run: its folder name, or, where two runs share that name
  (the same run at two widths), its parent and folder, so no run's numbers
  overwrite another's in the JSON."""
  paths = [os.path.normpath(w) for w in workdirs]
  base = [os.path.basename(p) for p in paths]
  return [b if base.count(b) == 1 else os.path.join(os.path.basename(os.path.dirname(p)), b)
          for p, b in zip(paths, base)]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='run directories or releases')
  parser.add_argument('--root', required=True, help='the training ImageFolder root or .tar')
  parser.add_argument('--images', type=int, default=5000)
  parser.add_argument('--json', help='also write every number to this file')
  args = parser.parse_args(argv)
  input_pipeline.hide_accelerators_from_tf()
  mesh = mesh_lib.create_mesh()
  everything = {}
  print('| run | depth | train CE | val CE | CE gap | train top-1 | val top-1 | '
        'residual ratio per block |')
  print('|---|---|---:|---:|---:|---:|---:|---|')
  for workdir, name in zip(args.workdirs, run_names(args.workdirs)):
    config = config_lib.load_saved(workdir)
    config.data.root = os.path.abspath(args.root)
    method, variables, _ = evaluate.restore(workdir, config, mesh)
    variables = jax.device_get(variables)
    train = first_examples(config.data, args.images, config.data.train_split)
    validation = first_examples(config.data, args.images)
    rows = [depth_report(method.model, variables, tuple(d), train, validation, mesh)
            for d in method.depths]
    everything[name] = rows
    for r in rows:
      ratios = ' '.join(f'{v:.2f}' for v in r['residual_ratio'].values())
      print(f'| {name} | {models.depth_tag(r["depth"])} | {r["train_ce"]:.3f} | '
            f'{r["validation_ce"]:.3f} | {r["ce_gap"]:+.3f} | {100 * r["train_top1"]:.2f} | '
            f'{100 * r["validation_top1"]:.2f} | {ratios} |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(everything, f, indent=2)


if __name__ == '__main__':
  main()
