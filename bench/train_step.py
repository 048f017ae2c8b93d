"""Images/s of the real jitted train step on this machine (synthetic batches).

  python bench/train_step.py --config configs/cifar10_folder.py \
      --set model.width_multiplier=0.5 --batch-size 128 --steps 20

Builds the method, state and step exactly as training does (same mesh,
shardings and donation), feeds one fixed random batch, and reports the median
step time after the compile. Input-pipeline cost is not included. For
any-depth training, `--set any_depth.k=2 --set any_depth.max_programs=2`
draws the same two depths every step, so every program compiles in the
first step and the median is the steady state.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from ddnn_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddnn_jax import config_lib, experiment  # noqa: E402
from ddnn_jax import mesh as mesh_lib  # noqa: E402
from ddnn_jax.train import make_train_step  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/cifar10_folder.py')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override, e.g. method=individual')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()
  config = config_lib.load(args.config, args.set)
  # The process settings python -m ddnn_jax.main makes, before JAX starts.
  runtime.configure_cpu_process(config.model.get('conv_impl', 'xla'))
  mesh = mesh_lib.create_mesh()
  shape = (args.image_size, args.image_size, 3)
  # One epoch of 100 steps: only the schedule's length depends on it.
  exp = experiment.build(config, mesh, experiment.DataSpec(
      args.num_classes, args.image_size, 100 * args.batch_size))
  method = exp.method
  state = exp.init_state(jax.random.key(0))
  step = make_train_step(exp)
  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch({
      'image': rng.standard_normal((args.batch_size, *shape), dtype=np.float32),
      'label': rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  depths = f'depths={list(method.depths)}'
  if method.any_depth is not None:  # pool every draw compiled in the warm-up: max_programs <= k
    rule = method.any_depth
    depths = (f'any-depth {list(rule.base_depths)} + {rule.k} drawn of {len(rule.pool)} '
              f'({step.programs} tuple programs compiled)')
  print(f'{config.model.name} x{config.model.width_multiplier} {config.method} '
        f'{depths} batch={args.batch_size} devices={jax.device_count()}: '
        f'{args.batch_size / median:.1f} img/s (median step {median * 1e3:.1f} ms, '
        f'first step incl. compile {compile_s:.1f} s, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r})')


if __name__ == '__main__':
  main()
