"""Parameters and compiled FLOPs of each depth of a DDNN preset.

  python -m ddnn_jax.summary --model resnet34 --depths 2,2,2,2 3,4,6,3
  python -m ddnn_jax.summary --model cifar_resnet56 --num-classes 10 --image-size 32 --json

FLOPs come from XLA's cost analysis of the jitted batch-1 inference forward pass
(one multiply-add = 2 FLOPs); parameters are those the depth uses, which is the
standalone net's count. Bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ddnn_jax import costs, models


def format_table(name: str, rows: Sequence[costs.DepthCost],
                 full: costs.DepthCost) -> str:
  """Markdown table: one row per depth, fractions relative to ``full``."""
  lines = [
      '| model | depth | same as | params | GFLOPs | params / full | FLOPs / full |',
      '|---|---|---|---:|---:|---:|---:|',
  ]
  for row in rows:
    same_as = models.preset_for_depth(name, row.depth) or '-'
    lines.append(
        f'| {name} | {",".join(map(str, row.depth))} | {same_as} | '
        f'{row.params:,} | {row.flops / 1e9:.3f} | {row.params / full.params:.1%} | '
        f'{row.flops / full.flops:.1%} |')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m ddnn_jax.summary', description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', required=True,
                      help=f'preset name, one of: {", ".join(models.PRESETS)}')
  parser.add_argument('--depths', nargs='+', metavar='K1,K2,...',
                      help='depth configs, blocks per stage (default: full depth)')
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--image-size', type=int, default=None,
                      help='input side in pixels (default 224, or 32 for cifar_*)')
  parser.add_argument('--width-multiplier', type=float, default=1.0)
  parser.add_argument('--json', action='store_true',
                      help='print only a JSON list of {depth, params, flops}')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    model = models.create_model(args.model, args.num_classes,
                                width_multiplier=args.width_multiplier)
    depths = [models.parse_depth(d) for d in args.depths or []]
    depths = [model.check_depth(d) for d in depths] or [model.full_depth]
    image_size = args.image_size
    if image_size is None:
      image_size = 32 if model.stem == 'cifar' else 224
    if image_size < 1:
      raise ValueError(f'--image-size must be positive, got {image_size}')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  full_depth = model.full_depth
  all_depths = depths if full_depth in depths else depths + [full_depth]
  rows = dict(zip(all_depths, costs.depth_costs(model, all_depths, image_size)))
  shown = [rows[d] for d in depths]
  if args.json:
    print(json.dumps([{'depth': list(r.depth), 'params': r.params, 'flops': r.flops}
                      for r in shown]))
  else:
    print(format_table(args.model, shown, rows[full_depth]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
