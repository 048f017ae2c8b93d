"""Do 2 processes compute the same gradients as 1 process, depth by depth?

  python experiments/multiprocess_grads.py [--depths 1,1,1 1,3,2 3,3,3 ...]
      [--data random|config] [--x64] [--config configs/default.py:smoke]
      [--set FIELD=VALUE ...] [--tol 1e-4]

For each depth, the gradient of its train-mode cross-entropy (BatchNorm on
batch statistics) on one batch of config.batch_size (--data: normal noise, or
the first training batch of the config's data), at the config's initial
parameters, is computed twice: on 1 process with 4 CPU devices and on 2
processes with 2 CPU devices each (jax.distributed on 127.0.0.1; XLA:CPU's
cross-process collectives). Both runs compile the same SPMD program for the
same 4-device data-parallel mesh and see the same global batch; only the order
of the cross-device sums differs.

That order can still change a gradient by whole percents, legitimately: a
ReLU input within round-off of zero (1e-6 in float32) comes out on either side
of its kink, and the ReLU passes or blocks that element's gradient. --x64
computes in float64, where the round-off is 1e-16: a difference that stays
there is not round-off.

Prints one Markdown row per depth (the largest difference over the parameter
leaves relative to the leaf's largest entry, and the leaf where it is) and
exits 1 when any depth differs by more than --tol. Takes about 1 minute on 2
cores for the default depths; nothing is trained and nothing is written
outside a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddnn_jax import runtime  # noqa: E402

runtime.configure_xla_flags()  # XLA's flags of `python -m ddnn_jax.main`

DEFAULT_DEPTHS = ('1,1,1', '2,2,2', '3,3,3', '1,2,2', '2,3,2', '3,3,2', '1,3,1', '1,3,2',
                  '1,3,3')
# The settings of tests/test_train.py's any-depth multi-process run: XLA's
# convolutions on every device count, norms shared by every depth (any depth
# can be asked for), width 0.5.
DEFAULT_SETS = ('model.conv_impl=xla', 'model.bn_mode=shared', 'model.width_multiplier=0.5')


def _depth(text: str) -> tuple[int, ...]:
  return tuple(int(n) for n in text.split(','))


def worker(args) -> None:
  """One process of one run: writes every depth's gradient (process 0)."""
  if args.keep_freed_memory:  # as `python -m ddnn_jax.main` does, before JAX starts
    runtime.keep_freed_host_memory()
  import jax
  import numpy as np
  import optax

  if args.x64:
    jax.config.update('jax_enable_x64', True)
  # The initial parameters of tests/test_train.py's runs, which use this PRNG.
  jax.config.update('jax_threefry_partitionable', False)

  from ddnn_jax import config_lib, experiment, input_pipeline
  from ddnn_jax import mesh as mesh_lib

  if os.environ.get('JAX_NUM_PROCESSES'):
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'],
                               int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  config = config_lib.load(args.config, [*args.set, *(['model.dtype=float64'] if args.x64 else [])])
  mesh = mesh_lib.create_mesh()
  if args.data == 'config':  # the first batch a training run of the config sees
    info = input_pipeline.get_info(config.data)
    data = experiment.DataSpec.from_info(info, config)
    local = next(input_pipeline.train_batches(
        config.data, global_batch_size=config.batch_size, seed=config.seed))
  else:
    data = experiment.DataSpec(num_classes=10, image_size=args.image_size,
                               train_examples=10 * config.batch_size)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(config.batch_size, *data.image_shape)).astype(np.float32)
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    per_process = config.batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    local = {'image': images[rows], 'label': labels[rows]}
  exp = experiment.build(config, mesh, data)
  state = exp.init_state()
  if args.x64:
    local = {**local, 'image': local['image'].astype(np.float64)}
    state = jax.tree.map(lambda v: v.astype(np.float64) if v.dtype == np.float32 else v, state)
  batch = mesh_lib.global_batch(local, mesh)
  model, replicated = exp.model, mesh_lib.replicated(mesh)
  out = {}
  for text in args.depths:
    depth = _depth(text)

    def loss_fn(params, batch_stats, batch, depth=depth):
      (output,), _ = model.apply(
          {'params': params, 'batch_stats': batch_stats}, batch['image'], (depth,), True,
          method=model.forward_depths, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(
          output.logits, batch['label']).mean()

    grads = jax.jit(jax.grad(loss_fn), in_shardings=(
        replicated, replicated, mesh_lib.batch_sharding(mesh)),
                    out_shardings=replicated)(state.params, state.batch_stats, batch)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
      out[f'{text}|{jax.tree_util.keystr(path)}'] = np.asarray(leaf.addressable_data(0))
    if jax.process_count() == 1:
      out[f'relu|{text}'] = np.array(_nearest_relu_input(model, state, batch, depth))
  if jax.process_index() == 0:
    np.savez(args.worker, **out)


def _nearest_relu_input(model, state, batch, depth) -> str:
  """The ReLU input nearest to zero among the norm outputs that feed a ReLU
  alone (the stem's and each block's first), as 'VALUE at LAYER'."""
  import jax
  import numpy as np

  _, variables = jax.jit(lambda v, images: model.apply(
      v, images, (depth,), True, method=model.forward_depths,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, name: name == '__call__' and mdl.name in ('bn', 'bn1'),
  ))({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'])
  nearest = (np.inf, 0.0, '')
  for path, value in jax.tree_util.tree_leaves_with_path(variables['intermediates']):
    value = np.asarray(jax.device_get(value))
    i = np.unravel_index(np.argmin(np.abs(value)), value.shape)
    layer = '/'.join(str(getattr(k, 'key', k)) for k in path[:-2])
    nearest = min(nearest, (abs(float(value[i])), float(value[i]), f'{layer} channel {i[-1]}'))
  return f'{nearest[1]:.2e} at {nearest[2]}'


def _launch(args, out: str, processes: int) -> None:
  """Runs the worker on `processes` processes with 4 devices in all."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  command = [sys.executable, os.path.abspath(__file__), '--worker', out,
             '--config', args.config, '--image-size', str(args.image_size), '--data', args.data,
             '--depths', *args.depths]
  for item in args.set:
    command += ['--set', item]
  if not args.keep_freed_memory:
    command.append('--no-keep-freed-memory')
  if args.x64:
    command.append('--x64')
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
        f'{os.environ["XLA_FLAGS"]} --xla_force_host_platform_device_count={4 // processes}'))
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for proc in procs:
    log, _ = proc.communicate(timeout=1200)
    if proc.returncode:
      sys.exit(f'error: a worker of the {processes}-process run failed:\n{log[-3000:]}')


def compare(one: str, two: str, depths, tol: float) -> bool:
  import numpy as np

  a, b = np.load(one), np.load(two)
  ok = True
  print('| depth | max relative difference | leaf | ReLU input nearest to 0 (1 process) |')
  print('|---|---|---|---|')
  for text in depths:
    worst = (0.0, '')
    for key in a.files:
      name, leaf = key.split('|', 1)
      if name != text:
        continue
      x, y = a[key].astype(np.float64), b[key].astype(np.float64)
      rel = float(np.abs(x - y).max() / (np.abs(x).max() + 1e-30))
      worst = max(worst, (rel, leaf))
    ok &= worst[0] <= tol
    print(f'| {text.replace(",", "-")} | {worst[0]:.1e} | {worst[1]} | {a[f"relu|{text}"]} |')
  return ok


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'default.py') + ':smoke')
  parser.add_argument('--set', action='append', default=list(DEFAULT_SETS),
                      metavar='FIELD=VALUE', help='config override (after the defaults '
                      f'{" ".join(DEFAULT_SETS)}), e.g. model.bn_mode=private_all')
  parser.add_argument('--depths', nargs='+', default=list(DEFAULT_DEPTHS))
  parser.add_argument('--data', choices=('random', 'config'), default='random',
                      help="the batch: normal noise, or the first training batch of the "
                      "config's data")
  parser.add_argument('--image-size', type=int, default=8, help='of the random batch')
  parser.add_argument('--tol', type=float, default=1e-4)
  parser.add_argument('--no-keep-freed-memory', dest='keep_freed_memory', action='store_false',
                      help="leave glibc malloc's settings alone (ddnn_jax.main changes them)")
  parser.add_argument('--x64', action='store_true',
                      help='compute in float64: a difference that stays is not round-off')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    one, two = os.path.join(tmp, 'one.npz'), os.path.join(tmp, 'two.npz')
    _launch(args, one, 1)
    _launch(args, two, 2)
    ok = compare(one, two, args.depths, args.tol)
  print('all depths agree' if ok else f'some depths differ by more than {args.tol}')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
