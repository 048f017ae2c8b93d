"""Every benchmark of BENCHMARKS.md in one command: JSON for scripts, Markdown for people.

  python bench/run_all.py [--quick] [--cifar-tar PATH] [--out bench/results.json]
                          [--markdown BENCHMARKS.md]

Every measurement runs in subprocesses (bench/workers.py; JAX and PyTorch never
share one), and both outputs are rewritten after each section, so a crash keeps
what was measured. --quick (fewer rounds and steps, a tenth of an epoch) takes
minutes on two cores. The tables replace what lies between `<!-- run_all:begin
-->` and `<!-- run_all:end -->` in --markdown (appended when absent). The tar
defaults to $DDNN_CIFAR10_TAR, else ../shared/datasets/cifar10-jpeg-train.tar.

JSON keys (null plus `<key>_skipped` with the reason when not measurable;
`machine`: CPU, nproc, load average at start and end, versions, XLA_FLAGS, date):
  ekd_train_vs_torch_w1, _w05: median PyTorch-eager step time / median ddnn_jax
    step time (> 1: ddnn_jax faster) of the EKD train step of cifar_resnet20
    (width 1.0 / 0.5, depths 1,1,1 2,2,2 3,3,3, batch 128, fp32, one synthetic
    batch), alternating N JAX steps and N torch steps for R rounds;
    ekd_<w>_{jax,torch}_img_s and _round_medians_ms: throughputs, round medians.
    ekd_train_vs_torch_<w>_kept_memory: the same against PyTorch run with the
    glibc malloc setting ddnn_jax uses (runtime.keep_freed_host_memory), which
    speeds PyTorch up too; ekd_<w>_torch_kept_*: its numbers.
  peer_loss_abs_diff: |JAX - peer EKD loss| on the same variables and batch,
    checked before timing (largest of both widths); the run stops above 1e-4.
  eval_vs_torch: the same for the full net's eval forward (width 1.0, batch 256).
  fused_vs_separate_ratio: fused EKD step time (width 0.5) / the sum of three
    separately jitted single-depth steps (method 'individual').
  subnet_flops_ratio, subnet_time_ratio: the DDNN's compiled eval forward at
    depth 2,2,2 / the standalone net of that depth (width 0.5, batch 256, XLA
    convolutions): cost-analysis FLOPs, median time.
  pipeline_vs_step_ratio: img/s of the real CIFAR-10 input pipeline (batch 128)
    / img/s of the JAX EKD width-0.5 step.
  train_fraction_of_matmul_peak: train_gflops (compiled cost-analysis FLOPs of
    the width-1.0 EKD step / its median time; counted with XLA convolutions, as
    the oneDNN custom calls count 0) / matmul_gflops (jitted 2048^3 fp32).
  epoch_s_w05, _w1, eval_s_w05, _w1: seconds of a training epoch (45,000 images,
    input pipeline included; from the 'training' log line, which follows the
    trainer's up-front compile, logged apart as epoch_<w>_compile_*) and of the
    evaluation after it (checkpoint save, 5,000 held-out images) of `python -m
    ddnn_jax.main`, from its log time stamps; the train part is extrapolated
    from the fraction epoch_extrapolated_from of an epoch (1.0: none).
  compile_cold_s, compile_cached_s: seconds to compile the EKD width-0.5 train and
    eval steps with an empty, then the populated persistent compilation cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import workers  # bench/ is sys.path[0]
from report import machine_facts, write_outputs
from worker_client import Worker, WorkerError

REPO = pathlib.Path(workers.ROOT)
sys.path.insert(0, str(REPO))
from ddnn_jax import runtime  # noqa: E402  -- sets XLA_FLAGS, which workers inherit

runtime.configure_xla_flags()

STEPS_PER_EPOCH = 45_000 // 128  # 5,000 of the 50,000 images are held out
READY_TIMEOUT = 1200  # start, build, compile and warm up, on a loaded machine


@dataclasses.dataclass
class Settings:  # the full run; (steps per round and runtime, rounds) of each timing
  train: tuple[int, int] = (10, 5)
  eval: tuple[int, int] = (20, 5)
  fused: tuple[int, int] = (5, 3)
  subnet: tuple[int, int] = (20, 5)
  pipeline_batches: int = 350  # an epoch
  matmul_reps: int = 20
  epoch_fraction: float = 1.0
  epoch_timeout: float = 7200


QUICK = Settings((3, 3), (5, 3), (2, 2), (5, 3), 100, 5, 0.1, 1200)


class PeerMismatch(RuntimeError):
  pass


def skipped(reason: str, *keys: str) -> dict:
  return {k: v for key in keys for k, v in ((key, None), (f'{key}_skipped', reason))}


def one_shot(ctx, command: str, *args, name: str | None = None) -> dict:
  """The reply of a one-shot bench/workers.py command."""
  with Worker(name or command, [command, *args], ctx.log_dir) as worker:
    return worker.receive(READY_TIMEOUT)


# ---------------------------------------------------------------- sections


def vs_torch(ctx, kind: str, width: float, batch: int, key: str, prefix: str,
             check=lambda jax_ready, torch_ready: None) -> dict:
  """The JAX and torch workers of `kind` built once, `check` of their ready
  replies (it may raise), then N steps of each in turn, for R rounds."""
  name, variables = f'{kind}-w{width:g}', os.path.join(ctx.log_dir, f'{kind}-w{width:g}.pkl')
  args, (steps, rounds) = ['--width', width, '--batch', batch], getattr(ctx.settings, kind)
  with contextlib.ExitStack() as stack:
    start = lambda runtime, *more: stack.enter_context(  # noqa: E731
        Worker(f'{runtime}-{name}', [f'{runtime}-{kind}', *args, *more], ctx.log_dir))
    timed = {'jax': start('jax', '--variables-out', variables, *(
        ['--xla-conv-flops'] if kind == 'train' and width == 1.0 else []))}
    ready = {'jax': timed['jax'].receive(READY_TIMEOUT)}
    if ctx.torch_reason is None:
      timed['torch'] = start('torch', '--variables', variables)
      ready['torch'] = timed['torch'].receive(READY_TIMEOUT)
      check(ready['jax'], ready['torch'])
      if kind == 'train':  # PyTorch given ddnn_jax's malloc setting too
        timed['torch_kept'] = stack.enter_context(Worker(
            f'torch-kept-{name}', ['torch-train', *args, '--variables', variables,
                                   '--keep-freed-host-memory'], ctx.log_dir))
        ready['torch_kept'] = timed['torch_kept'].receive(READY_TIMEOUT)
    times = {k: [] for k in timed}
    for _ in range(rounds):
      for k, worker in timed.items():
        times[k].append(worker.request(120 + 60 * steps, cmd='time', n=steps)['times'])
  out = {'jax_device': ready['jax'].pop('device')}
  for k, rounds_s in times.items():
    median = statistics.median(t for r in rounds_s for t in r)
    out.update({f'{prefix}_{k}_step_ms': 1e3 * median, f'{prefix}_{k}_img_s': batch / median,
                f'{prefix}_{k}_round_medians_ms': [1e3 * statistics.median(r)
                                                   for r in rounds_s]})
    out.update({f'{prefix}_{k}_{field}': v for field, v in ready[k].items() if field != 'ready'})
  if 'torch' not in times:
    return {**out, **skipped(ctx.torch_reason, key, f'{prefix}_torch_img_s')}
  out[key] = out[f'{prefix}_torch_step_ms'] / out[f'{prefix}_jax_step_ms']
  if 'torch_kept' in times:
    out[f'{key}_kept_memory'] = out[f'{prefix}_torch_kept_step_ms'] / out[f'{prefix}_jax_step_ms']
  return out


def ekd_train_vs_torch(ctx, width: float) -> dict:
  tag = 'w1' if width == 1.0 else 'w05'

  def check(jax_ready, torch_ready):
    diff = abs(jax_ready['loss'] - torch_ready['loss'])
    ctx.results[f'peer_loss_abs_diff_{tag}'] = diff
    if not diff <= 1e-4:
      raise PeerMismatch(
          f'width {width}: the JAX EKD loss {jax_ready["loss"]} and the PyTorch peer\'s '
          f'{torch_ready["loss"]} differ by {diff} > 1e-4 on the same variables and '
          'batch: the peer does not compute the same thing, so nothing was timed')

  out = vs_torch(ctx, 'train', width, 128, f'ekd_train_vs_torch_{tag}', f'ekd_{tag}', check)
  diffs = [v for k, v in ctx.results.items() if k.startswith('peer_loss_abs_diff_')]
  if diffs:
    out['peer_loss_abs_diff'] = max(diffs)
  elif ctx.torch_reason:
    out.update(skipped(ctx.torch_reason, 'peer_loss_abs_diff'))
  return out


def eval_vs_torch(ctx) -> dict:
  return vs_torch(ctx, 'eval', 1.0, 256, 'eval_vs_torch', 'eval_w1')


def fused_vs_separate(ctx) -> dict:
  steps, rounds = ctx.settings.fused
  return one_shot(ctx, 'fused', '--width', 0.5, '--batch', 128, '--steps', steps,
                  '--rounds', rounds)


def subnet(ctx) -> dict:
  steps, rounds = ctx.settings.subnet
  return one_shot(ctx, 'subnet', '--width', 0.5, '--batch', 256, '--steps', steps,
                  '--rounds', rounds)


def pipeline_vs_step(ctx) -> dict:
  if ctx.tar is None:
    return skipped(ctx.tar_reason, 'pipeline_vs_step_ratio', 'pipeline_img_s')
  out = one_shot(ctx, 'pipeline', '--tar', ctx.tar, '--batch', 128, '--batches',
                 ctx.settings.pipeline_batches)
  step = ctx.results.get('ekd_w05_jax_img_s')
  if step is None:
    return {**out, **skipped('the EKD width-0.5 step was not measured',
                             'pipeline_vs_step_ratio')}
  return {**out, 'pipeline_vs_step_ratio': out['pipeline_img_s'] / step}


def train_fraction_of_matmul_peak(ctx) -> dict:
  out = one_shot(ctx, 'matmul', '--n', 2048, '--reps', ctx.settings.matmul_reps)
  r = ctx.results
  flops = r.get('ekd_w1_jax_flops_xla_conv') or r.get('ekd_w1_jax_flops')
  if flops is None or r.get('ekd_w1_jax_step_ms') is None:
    return {**out, **skipped('the EKD width-1.0 step was not measured',
                             'train_fraction_of_matmul_peak', 'train_gflops')}
  train = flops / (r['ekd_w1_jax_step_ms'] / 1e3) / 1e9
  return {**out, 'train_gflops': train, 'train_flops': flops,
          'train_fraction_of_matmul_peak': train / out['matmul_gflops']}


def epoch_times(text: str) -> dict:
  """Train and eval seconds from a ddnn_jax.main log's absl time stamps: the
  epoch is the time to the first train log line plus the rest of the epoch's
  steps at the rate between the first and the last train log line."""
  events = []
  for line in text.splitlines():
    if m := re.match(r'[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) +\d+ +\S+\] (.*)', line):
      day = datetime.datetime(2000, int(m[1]), int(m[2])).timestamp()
      events.append((day + 3600 * int(m[3]) + 60 * int(m[4]) + float(m[5]), m[6]))
  start, header = next((t, m) for t, m in events if m.startswith('training '))
  per_epoch = int(re.search(r'\((\d+) per epoch\)', header)[1])
  train = [(int(m[1]), t) for t, line in events if (m := re.match(r'\[(\d+)\] train/', line))]
  if len(train) < 2:
    raise ValueError('the log has fewer than two train metric lines')
  (first, t_first), (last, t_last) = train[0], train[-1]
  steady = (t_last - t_first) / (last - first)
  eval_end = next(t for t, line in events if re.match(r'\[\d+\] eval/', line))
  compiled = [m for _, line in events if (m := re.match(
      r'compiled the train step in ([\d.]+) s and the eval step in ([\d.]+) s', line))]
  return {'epoch_s': t_first - start + (per_epoch - first) * steady,
          'eval_s': eval_end - t_last, 'steady_step_s': steady,
          'first_steps_s': t_first - start, 'steps_run': last,
          **({'compile_train_step_s': float(compiled[0][1]),
              'compile_eval_step_s': float(compiled[0][2])} if compiled else {})}


def epoch(ctx, width: float) -> dict:
  tag = 'w1' if width == 1.0 else 'w05'
  if ctx.tar is None:
    return skipped(ctx.tar_reason, f'epoch_s_{tag}', f'eval_s_{tag}',
                   'epoch_extrapolated_from')
  fraction = ctx.settings.epoch_fraction
  workdir = tempfile.mkdtemp(prefix=f'epoch_{tag}_', dir=ctx.log_dir)
  command = [sys.executable, '-m', 'ddnn_jax.main', '--config', 'configs/cifar10_folder.py',
             f'--workdir={workdir}', f'--config.data.root={ctx.tar}',
             f'--config.model.width_multiplier={width}', f'--config.num_epochs={fraction}',
             f'--config.eval_every_epochs={fraction}',
             f'--config.log_every_steps={max(1, round(fraction * STEPS_PER_EPOCH) // 8)}']
  log_path = os.path.join(ctx.log_dir, f'epoch_{tag}.log')
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    try:
      rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          timeout=ctx.settings.epoch_timeout, check=False).returncode
    except subprocess.TimeoutExpired:
      rc = f'a timeout after {ctx.settings.epoch_timeout:.0f} s'
  wall = time.perf_counter() - start
  text = pathlib.Path(log_path).read_text()
  if rc != 0:
    raise WorkerError(f'{shlex.join(command)} ended with {rc}; {log_path} ends:\n'
                      f'{text[-3000:]}')
  shutil.rmtree(workdir, ignore_errors=True)
  t = epoch_times(text)
  return {f'epoch_s_{tag}': t.pop('epoch_s'), f'eval_s_{tag}': t.pop('eval_s'),
          'epoch_extrapolated_from': fraction, f'epoch_{tag}_run_wall_s': wall,
          **{f'epoch_{tag}_{k}': v for k, v in t.items()},
          f'epoch_{tag}_command': shlex.join(['python', *command[1:]])}


def compile_times(ctx) -> dict:
  cache = tempfile.mkdtemp(prefix='jax_cache_', dir=ctx.log_dir)
  out = {}
  for kind in ('cold', 'cached'):
    r = one_shot(ctx, 'compile', '--width', 0.5, '--cache-dir', cache,
                 name=f'compile-{kind}')
    out.update({f'compile_{kind}_{k}': v for k, v in r.items()})
  if not out['compile_cached_cache_files']:
    out.update(skipped('the persistent compilation cache stayed empty', 'compile_cached_s'))
  return out


# -------------------------------------------------------------------- main

SECTIONS = (  # (name, measurement, the keys it must write), in running order
    ('ekd_train_w1', lambda ctx: ekd_train_vs_torch(ctx, 1.0), ('ekd_train_vs_torch_w1',)),
    ('ekd_train_w05', lambda ctx: ekd_train_vs_torch(ctx, 0.5),
     ('ekd_train_vs_torch_w05', 'peer_loss_abs_diff')),
    ('eval', eval_vs_torch, ('eval_vs_torch',)),
    ('fused', fused_vs_separate, ('fused_vs_separate_ratio',)),
    ('subnet', subnet, ('subnet_flops_ratio', 'subnet_time_ratio')),
    ('pipeline', pipeline_vs_step, ('pipeline_vs_step_ratio',)),
    ('matmul', train_fraction_of_matmul_peak, ('train_fraction_of_matmul_peak',)),
    ('epoch_w05', lambda ctx: epoch(ctx, 0.5),
     ('epoch_s_w05', 'eval_s_w05', 'epoch_extrapolated_from')),
    ('epoch_w1', lambda ctx: epoch(ctx, 1.0), ('epoch_s_w1', 'eval_s_w1')),
    ('compile', compile_times, ('compile_cold_s', 'compile_cached_s')),
)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='fewer rounds and steps, a tenth of an epoch (minutes)')
  parser.add_argument('--cifar-tar', default=os.environ.get('DDNN_CIFAR10_TAR') or str(
      REPO.parent / 'shared' / 'datasets' / 'cifar10-jpeg-train.tar'))
  parser.add_argument('--out', default=str(REPO / 'bench' / 'results.json'))
  parser.add_argument('--markdown', default=str(REPO / 'BENCHMARKS.md'))
  hidden = argparse.SUPPRESS  # overrides for short trial runs
  parser.add_argument('--steps', type=int, help=hidden)
  parser.add_argument('--rounds', type=int, help=hidden)
  parser.add_argument('--epoch-fraction', type=float, help=hidden)
  parser.add_argument('--only', type=lambda v: v.split(','), help=hidden)
  args = parser.parse_args()
  args.settings = dataclasses.replace(QUICK if args.quick else Settings())
  for timing in ('train', 'eval', 'fused', 'subnet'):
    steps, rounds = getattr(args.settings, timing)
    setattr(args.settings, timing, (args.steps or steps, args.rounds or rounds))
  args.settings.epoch_fraction = args.epoch_fraction or args.settings.epoch_fraction
  return args


def torch_unavailable() -> str | None:
  """None when torch imports in a fresh interpreter, else why not."""
  result = subprocess.run([sys.executable, '-c', 'import torch'], capture_output=True,
                          text=True, timeout=600, check=False)
  if result.returncode == 0:
    return None
  last = (result.stderr.strip().splitlines() or ['?'])[-1]
  return f"PyTorch is not importable ({last}); pip install -e '.[bench]'"


def main() -> int:
  args = parse_args()
  log_dir = tempfile.mkdtemp(prefix='ddnn_bench_')
  results = {'command': shlex.join(['python', 'bench/run_all.py', *sys.argv[1:]]),
             'settings': {'quick': args.quick, **dataclasses.asdict(args.settings)},
             'machine': machine_facts(), 'log_dir': log_dir, 'section_s': {}}
  tar_ok = os.path.isfile(args.cifar_tar)
  ctx = types.SimpleNamespace(
      settings=args.settings, results=results, log_dir=log_dir,
      tar=os.path.abspath(args.cifar_tar) if tar_ok else None,
      tar_reason=f'no CIFAR-10 tar at {args.cifar_tar} (--cifar-tar or $DDNN_CIFAR10_TAR)',
      torch_reason=torch_unavailable())
  print(f'[run_all] worker logs in {log_dir}', flush=True)
  errors = []
  for name, measure, keys in SECTIONS:
    if args.only and name not in args.only:
      results.update(skipped('not run (--only)', *keys))
      continue
    print(f'[run_all] {name} ...', flush=True)
    start = time.perf_counter()
    try:
      results.update(measure(ctx))
    except PeerMismatch as e:
      write_outputs(results, args.out, args.markdown)
      print(f'error: {e}', file=sys.stderr)
      return 2
    except Exception as e:  # one failed measurement must not lose the others
      errors.append(f'{name}: {e}')
      results.update(skipped(f'error: {str(e).splitlines()[0]} (logs: {log_dir})', *keys))
    results['section_s'][name] = time.perf_counter() - start
    for key in keys:  # a measurement that wrote neither a value nor a reason
      if results.setdefault(key, None) is None:
        results.setdefault(f'{key}_skipped', f'not measured (logs: {log_dir})')
    write_outputs(results, args.out, args.markdown)
    print(f'[run_all] {name}: {time.perf_counter() - start:.0f} s, '
          + ', '.join(f'{k}={results[k]}' for k in keys), flush=True)
  write_outputs(results, args.out, args.markdown)
  for error in errors:
    print(f'error in {error}', file=sys.stderr)
  print(f'[run_all] wrote {args.out} and {args.markdown}')
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
