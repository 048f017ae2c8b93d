"""The measuring subprocesses of bench/run_all.py (one runtime each), and `Worker`,
how run_all.py drives them.

  python bench/workers.py jax-train|jax-eval --width W --batch B --variables-out F
  python bench/workers.py torch-train|torch-eval --width W --batch B --variables F
  python bench/workers.py fused|subnet|pipeline|matmul|compile ...   (one-shot)

Replies are JSON lines on stdout (all else the libraries print goes to stderr).
The servers build and warm up once, reply `{"ready": true, ...}`, then answer
each `{"cmd": "time", "n": N}` line with N step times (s) until `{"cmd":
"quit"}` or the end of stdin. The JAX servers write their initial variables and
a reference (EKD loss, or logits) on the fixed synthetic batch to F; the torch
servers load them into the peer and reply with their loss or logit difference.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if ROOT not in sys.path:  # the config files import `configs`; bench/ stays first
  sys.path.insert(1, ROOT)
CONFIG = os.path.join(ROOT, 'configs', 'cifar10_folder.py')
DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
SUBNET_DEPTH = (2, 2, 2)
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
_replies = sys.stdout


def reply(**message) -> None:
  _replies.write(json.dumps(message) + '\n')
  _replies.flush()


def keep_stdout_for_replies() -> None:
  """Replies keep the real stdout; fd 1 (C and Python prints) goes to stderr."""
  global _replies
  _replies = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)


def synthetic_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32)
  return images, rng.integers(0, NUM_CLASSES, batch).astype(np.int32)


def step_times(fn, n: int) -> list[float]:
  """Seconds of each of n calls of `fn`, which must block until done."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def serve(run_step) -> None:
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    if request['cmd'] == 'quit':
      break
    if request['cmd'] != 'time':
      raise ValueError(f'unknown request {request!r}')
    reply(times=step_times(run_step, int(request['n'])))


def plain(tree):
  """A variable tree as nested dicts of NumPy arrays (picklable without flax)."""
  if hasattr(tree, 'items'):
    return {k: plain(v) for k, v in tree.items()}
  return np.asarray(tree)


# ------------------------------------------------------------------- JAX side


def import_jax(conv_impl: str = 'xla'):
  """jax, after the process settings python -m ddnn_jax.main makes for a config
  with `conv_impl` (they must be made before jax starts)."""
  from ddnn_jax import runtime
  runtime.configure_xla_flags()
  runtime.configure_cpu_process(conv_impl)  # as python -m ddnn_jax.main does
  import jax
  return jax


def load_config(width: float, method: str = 'ekd', individual_depth=None):
  from ddnn_jax import config_lib
  config = config_lib.load(CONFIG)
  config.model.width_multiplier = width
  config.method = method
  # The step the PyTorch peer mirrors (CE + T^2 KL + z-score attention on every
  # stage, no ramp-up: METHODS.md's EKD; one BatchNorm per layer, shared by the
  # depths, so the shared prefix runs once), whatever the configs' defaults.
  config.ekd.beta, config.ekd.rampup_epochs = 1.0, 0.0
  config.model.bn_mode = 'shared'
  if individual_depth is not None:
    config.individual_depth = tuple(individual_depth)
  return config


def compiled_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
    analysis = analysis[0]
  return float(analysis['flops'])


class TrainProgram:
  """The train step built exactly as training does (bench/train_step.py), compiled."""

  def __init__(self, config, images: np.ndarray, labels: np.ndarray):
    jax = import_jax(config.model.conv_impl)
    from ddnn_jax import experiment
    from ddnn_jax import mesh as mesh_lib
    from ddnn_jax.train import make_train_step

    self.config, self.jax = config, jax
    self.mesh = mesh_lib.create_mesh()
    # One epoch of 100 steps: only the schedule's length depends on it.
    exp = experiment.build(config, self.mesh, experiment.DataSpec(
        NUM_CLASSES, images.shape[1], 100 * images.shape[0]))
    self.method = exp.method
    self.state = exp.init_state(jax.random.key(0))
    self.step = make_train_step(exp)
    self.batch = mesh_lib.global_batch({'image': images, 'label': labels}, self.mesh)
    start = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = compiled_flops(self.compiled)

  def run(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batch)
    self.jax.block_until_ready(metrics)

  def ekd_loss(self) -> float:
    """The EKD loss of the current variables on the batch (BN in train mode)."""
    from ddnn_jax import losses
    model, depths = self.method.model, self.method.depths
    outputs, _ = model.apply(self.state.variables, self.batch['image'], depths, True,
                             method=model.forward_depths, mutable=['batch_stats'])
    ekd = losses.EKDConfig(**self.config.ekd.to_dict())
    loss, _ = losses.ekd_loss(outputs, depths, self.batch['label'], model.full_depth, ekd)
    return float(loss)


def device_kind() -> str:
  jax = import_jax()
  return f'{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}'


def jax_train(args) -> None:
  config = load_config(args.width)
  program = TrainProgram(config, *synthetic_batch(args.batch))
  loss = program.ekd_loss()
  with open(args.variables_out, 'wb') as f:
    pickle.dump({'variables': plain(program.state.variables), 'loss': loss}, f)
  counts = {'flops': program.flops}
  conv_impl = config.model.get('conv_impl', 'xla')
  if args.xla_conv_flops and conv_impl != 'xla':
    config.model.conv_impl = 'xla'  # custom-call convolutions count 0 FLOPs
    counts['flops_xla_conv'] = TrainProgram(config, *synthetic_batch(args.batch)).flops
  step_times(program.run, 2)
  reply(ready=True, loss=loss, compile_s=program.compile_s, device=device_kind(),
        conv_impl=conv_impl, **counts)
  serve(program.run)


def jax_eval(args) -> None:
  jax = import_jax('auto')  # the config's conv_impl
  from ddnn_jax import inference, methods, models
  from ddnn_jax import mesh as mesh_lib
  images, _ = synthetic_batch(args.batch)
  mesh = mesh_lib.create_mesh()
  config = load_config(args.width)
  model = methods.create_model(config, NUM_CLASSES)  # the trained model, conv_impl too
  variables = models.init_variables(model, jax.random.key(0), images[:1])
  x = mesh_lib.global_batch({'image': images}, mesh)['image']
  start = time.perf_counter()
  forward = inference.make_forward(model, model.full_depth, mesh).lower(variables, x).compile()
  compile_s = time.perf_counter() - start
  with open(args.variables_out, 'wb') as f:
    pickle.dump({'variables': plain(variables), 'logits': np.asarray(forward(variables, x))}, f)
  run = lambda: forward(variables, x).block_until_ready()  # noqa: E731
  step_times(run, 2)
  reply(ready=True, compile_s=compile_s, device=device_kind(),
        conv_impl=config.model.get('conv_impl', 'xla'))
  serve(run)


# ----------------------------------------------------------------- torch side


def torch_peer(args):
  if args.keep_freed_host_memory:  # the same glibc setting as the JAX side
    from ddnn_jax import runtime
    runtime.keep_freed_host_memory()
  import torch
  import torch_peer as peer_lib  # bench/ is sys.path[0]
  threads = len(os.sched_getaffinity(0))
  peer = peer_lib.Peer(width=args.width, depths=DEPTHS, num_classes=NUM_CLASSES,
                       threads=threads)
  with open(args.variables, 'rb') as f:
    saved = pickle.load(f)
  peer_lib.load_jax_variables(peer.model, saved['variables'])
  images, labels = synthetic_batch(args.batch)
  return (torch, peer, peer_lib.to_torch_images(images), torch.from_numpy(labels).long(),
          saved, {'threads': threads, 'version': torch.__version__})


def torch_train(args) -> None:
  torch, peer, images, labels, _, facts = torch_peer(args)
  peer.model.train()
  with torch.no_grad():
    loss = float(peer.loss(images, labels))
  run = lambda: peer.step(images, labels)  # noqa: E731
  step_times(run, 2)
  reply(ready=True, loss=loss, **facts)
  serve(run)


def torch_eval(args) -> None:
  _, peer, images, _, saved, facts = torch_peer(args)
  diff = float(np.max(np.abs(peer.eval_logits(images).numpy() - saved['logits'])))
  run = lambda: peer.eval_logits(images)  # noqa: E731
  step_times(run, 2)
  reply(ready=True, logits_max_abs_diff=diff, **facts)
  serve(run)


# ------------------------------------------------------------------ one-shot


def alternate(runs: dict, steps: int, rounds: int) -> dict[str, float]:
  """Median step seconds of every program, timed in turn (A B C A B C ...)."""
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      times[name] += step_times(run, steps)
  return {name: statistics.median(t) for name, t in times.items()}


def fused(args) -> None:
  images, labels = synthetic_batch(args.batch)
  programs = {'fused': TrainProgram(load_config(args.width), images, labels)}
  for depth in DEPTHS:
    config = load_config(args.width, 'individual', depth)
    programs['d' + '-'.join(map(str, depth))] = TrainProgram(config, images, labels)
  for program in programs.values():
    step_times(program.run, 1)
  median = alternate({k: p.run for k, p in programs.items()}, args.steps, args.rounds)
  reply(fused_vs_separate_ratio=median['fused'] / sum(
            v for k, v in median.items() if k != 'fused'),
        fused_step_ms=1e3 * median.pop('fused'),
        **{f'single_step_ms_{k}': 1e3 * v for k, v in median.items()},
        fused_compile_s={k: p.compile_s for k, p in programs.items()})


def subnet(args) -> None:
  jax = import_jax()
  from ddnn_jax import inference, models, subnets
  from ddnn_jax import mesh as mesh_lib
  images, _ = synthetic_batch(args.batch)
  mesh = mesh_lib.create_mesh()
  x = mesh_lib.global_batch({'image': images}, mesh)['image']
  ddnn = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=args.width)
  alone = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=args.width,
                              stage_sizes=SUBNET_DEPTH)
  variables = {'ddnn': models.init_variables(ddnn, jax.random.key(0), images[:1])}
  variables['standalone'] = subnets.extract_subnet(variables['ddnn'], SUBNET_DEPTH)
  forward = {
      'ddnn': inference.make_forward(ddnn, SUBNET_DEPTH, mesh),
      'standalone': inference.make_forward(alone, alone.full_depth, mesh)}
  forward = {k: f.lower(variables[k], x).compile() for k, f in forward.items()}
  logits = [np.asarray(f(variables[k], x)) for k, f in forward.items()]
  median = alternate({k: lambda k=k: forward[k](variables[k], x).block_until_ready()
                      for k in forward}, args.steps, args.rounds)
  flops = {k: compiled_flops(f) for k, f in forward.items()}
  reply(subnet_flops_ratio=flops['ddnn'] / flops['standalone'],
        subnet_time_ratio=median['ddnn'] / median['standalone'],
        **{f'subnet_{k}_gflops': v / 1e9 for k, v in flops.items()},
        **{f'subnet_{k}_ms': 1e3 * v for k, v in median.items()},
        subnet_logits_max_abs_diff=float(np.max(np.abs(logits[0] - logits[1]))))


def pipeline(args) -> None:
  import_jax()
  from configs import datasets
  from ddnn_jax import input_pipeline
  input_pipeline.hide_accelerators_from_tf()
  data = datasets.data_config('image_folder')
  data.root = args.tar
  start = time.perf_counter()
  batches = input_pipeline.train_batches(data, global_batch_size=args.batch, seed=0)
  for _ in range(args.warmup):
    next(batches)
  warmup_s, start = time.perf_counter() - start, time.perf_counter()
  for _ in range(args.batches):
    batch = next(batches)
  seconds = time.perf_counter() - start
  assert batch['image'].shape == (args.batch, *IMAGE_SHAPE), batch['image'].shape
  reply(pipeline_img_s=args.batches * args.batch / seconds, pipeline_batches=args.batches,
        pipeline_first_batches_s=warmup_s,
        pipeline_decode_once=bool(data.get('decode_once', False)))


def matmul(args) -> None:
  jax = import_jax()
  a, b = (jax.random.normal(jax.random.key(i), (args.n, args.n), 'float32') for i in (0, 1))
  product = jax.jit(lambda x, y: x @ y)
  times = step_times(lambda: product(a, b).block_until_ready(), args.reps + 2)[2:]
  reply(matmul_gflops=2 * args.n**3 / statistics.median(times) / 1e9, matmul_n=args.n,
        matmul_median_ms=1e3 * statistics.median(times))


def compile_programs(args) -> None:
  jax = import_jax('auto')  # the config's conv_impl
  jax.config.update('jax_compilation_cache_dir', args.cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  from ddnn_jax import evaluate
  from ddnn_jax import mesh as mesh_lib
  config = load_config(args.width)
  program = TrainProgram(config, *synthetic_batch(config.batch_size))
  images, labels = synthetic_batch(config.eval_batch_size)
  batch = mesh_lib.global_batch({'image': images, 'label': labels,
                                 'mask': np.ones(len(labels), bool)}, program.mesh)
  eval_step = evaluate.make_eval_step(program.method.model, program.method.depths,
                                      program.mesh)
  start = time.perf_counter()
  eval_step.lower(program.state.variables, batch).compile()
  eval_s = time.perf_counter() - start
  reply(s=program.compile_s + eval_s, train_step_s=program.compile_s, eval_step_s=eval_s,
        cache_files=sum(len(files) for _, _, files in os.walk(args.cache_dir)))


# ------------------------------------------------------- client (run_all.py)


COMMANDS = {'jax-train': jax_train, 'jax-eval': jax_eval, 'torch-train': torch_train,
            'torch-eval': torch_eval, 'fused': fused, 'subnet': subnet,
            'pipeline': pipeline, 'matmul': matmul, 'compile': compile_programs}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('command', choices=sorted(COMMANDS))
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--variables', help='torch-*: the JAX server\'s variables file')
  parser.add_argument('--keep-freed-host-memory', action='store_true',
                      help='torch-*: glibc malloc set up as ddnn_jax sets it for itself')
  parser.add_argument('--variables-out', help='jax-train/jax-eval: where to write them')
  parser.add_argument('--tar', help='pipeline: the CIFAR-10 JPEG tar')
  parser.add_argument('--warmup', type=int, default=5, help='pipeline: batches not timed')
  parser.add_argument('--batches', type=int, default=20, help='pipeline: batches timed')
  parser.add_argument('--n', type=int, default=2048, help='matmul: matrix side')
  parser.add_argument('--reps', type=int, default=5, help='matmul: timed products')
  parser.add_argument('--cache-dir', help='compile: the persistent compilation cache')
  parser.add_argument('--xla-conv-flops', action='store_true',
                      help='jax-train: also count FLOPs with XLA convolutions')
  args = parser.parse_args()
  os.chdir(ROOT)
  keep_stdout_for_replies()
  COMMANDS[args.command](args)


if __name__ == '__main__':
  main()
