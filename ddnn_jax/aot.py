"""Ahead-of-time compilation of the real programs for a TPU slice, on any machine.

  python -m ddnn_jax.aot --config configs/imagenet.py --topology v5e:16x16
      [--topology v4-32 ...] [--utilization 0.3] [--find_max_batch]
      [--json FILE] [--config.batch_size=4096 ...]

No TPU is needed: libtpu (`pip install -e '.[tpu]'`) describes the slice's
devices and compiles for them on the CPU. For each topology this builds the Mesh
from those devices as training does (`mesh.create_mesh`), lowers the trainer's
own jitted train step (`train.make_train_step`, same shardings and dtypes) and
eval step, and each depth's inference forward, from abstract shapes only: no
parameter is materialised. It prints per chip what each program needs in HBM
(arguments, outputs, temporaries, code) against the chip's capacity, its FLOPs
per step (XLA's cost analysis of the partitioned program, i.e. one chip's
share), and a projected step time and throughput at a stated fraction of the
chip's peak bf16 FLOP/s. It also compiles the train step of the full net alone
(method 'individual' at the full depth, same batch) to put the method's cost
next to it.

Topologies: libtpu names (`v5e:16x16`, `v4:2x2x4`, `v5p:2x2x1`, `v6e:4x4`) or
Cloud TPU accelerator types (`v4-32`, `v5litepod-256`, `v5p-8`, `v6e-16`).
Exits 1 with a one-line reason when a program does not fit in a chip's HBM or
the input is wrong; `--find_max_batch` also searches the largest per-chip train
batch that fits (to a multiple of 8).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from ddnn_jax import evaluate, experiment, input_pipeline, models, train
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.tpu_slices import GIB, AotError, Slice, parse_topology, topology_devices


@dataclasses.dataclass
class Program:
  """One compiled program; bytes and FLOPs are per chip."""
  name: str
  batch_field: str  # the config field that sets its batch
  batch_per_chip: int
  argument: int = 0
  output: int = 0
  alias: int = 0  # outputs that reuse (donated) argument buffers
  temp: int = 0
  code: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0  # HBM traffic XLA's cost model expects
  compile_seconds: float = 0.0
  error: str | None = None  # the compiler's reason when it did not compile

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code


_OOM = re.compile(r'RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds? .*memory')


def _compile(name: str, batch_field: str, batch_per_chip: int, jitted, *args) -> Program:
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- XLA raises one type for every reason
    message = str(e)
    if not _OOM.search(message):
      raise AotError(f'{name} does not compile: {message.strip().splitlines()[0][:300]}') from e
    return Program(name, batch_field, batch_per_chip,
                   compile_seconds=time.perf_counter() - start,
                   error=' '.join(message.split())[:400])
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  return Program(name, batch_field, batch_per_chip, argument=memory.argument_size_in_bytes,
                 output=memory.output_size_in_bytes, alias=memory.alias_size_in_bytes,
                 temp=memory.temp_size_in_bytes, code=memory.generated_code_size_in_bytes,
                 flops=float(cost.get('flops', 0.0)),
                 bytes_accessed=float(cost.get('bytes accessed', 0.0)),
                 compile_seconds=time.perf_counter() - start)


def _batch(image_size: int, global_batch: int, mesh, *, train: bool) -> dict:
  return mesh_lib.sharded_batch_spec(
      input_pipeline.batch_spec(image_size, global_batch, train=train), mesh)


def _num_classes(config) -> int:
  try:
    return input_pipeline.num_classes(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise AotError(str(e)) from e


def _train_examples(config) -> int:
  """Training examples per epoch of the config's dataset, without reading a TFDS
  dataset: the preset's `data.num_examples` (configs/datasets.py), or for an
  image folder, whose sizes depend on its root, the listed files."""
  data = config.data
  if data.name == 'image_folder':
    return input_pipeline.get_info(data).num_examples[data.train_split]
  # .get: configs saved before the field existed lack it.
  known = data.get('num_examples') or {}
  if data.train_split not in known:
    raise AotError(f'the size of {data.name} split {data.train_split!r} is not known '
                   'without the data; pass --train_examples')
  return known[data.train_split]


def build(config, mesh, num_classes: int, train_examples: int,
          global_batch: int | None = None) -> experiment.Experiment:
  """The run's assembly at `global_batch` (default: the config's). The split
  size only sets the schedule's length, so a batch larger than the split (a
  max-batch probe) compiles as one step per epoch."""
  if global_batch is not None:
    config = copy.deepcopy(config)
    config.batch_size = global_batch
  data = experiment.DataSpec(num_classes, config.data.image_size,
                             max(train_examples, config.batch_size))
  return experiment.build(config, mesh, data)


def compile_train_step(exp: experiment.Experiment, name: str = 'train_step') -> Program:
  """The trainer's jitted step of `exp`, lowered from abstract shapes."""
  batch, replicated = exp.config.batch_size, mesh_lib.replicated(exp.mesh)
  teacher = () if exp.method.teacher is None else (jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      exp.method.teacher.variables),)
  return _compile(name, 'batch_size', batch // exp.mesh.size, train.make_train_step(exp),
                  exp.abstract_state, _batch(exp.data.image_size, batch, exp.mesh, train=True),
                  *teacher)


def compile_eval_programs(exp: experiment.Experiment) -> list[Program]:
  """The all-depth eval step and each depth's inference forward of `exp`."""
  model, mesh, batch = exp.model, exp.mesh, exp.config.eval_batch_size
  variables = exp.abstract_variables
  eval_batch = _batch(exp.data.image_size, batch, mesh, train=False)
  programs = [_compile('eval_step', 'eval_batch_size', batch // mesh.size,
                       evaluate.make_eval_step(model, exp.depths, mesh),
                       variables, eval_batch)]
  for depth in exp.depths:
    programs.append(_compile(f'forward {models.depth_tag(depth)}', 'eval_batch_size',
                             batch // mesh.size,
                             evaluate.make_forward(model, depth, mesh), variables,
                             eval_batch['image']))
  return programs


def full_net_alone(config):
  """`config` training only its full depth as a standalone net."""
  alone = copy.deepcopy(config)
  with alone.unlocked():
    alone.method = 'individual'
    alone.individual_depth = models.create_model(config.model.name, 2).full_depth
  return alone


@dataclasses.dataclass(frozen=True)
class Options:
  """What to compile and how to judge it."""
  # Fraction of peak bf16 FLOP/s the projection assumes. 0.3: MLPerf Training
  # v1.0's ResNet-50 on TPU v4 (3,453 img/s per chip) at this codebase's 24.1
  # GFLOP per training image is 30% of v4's 275 TFLOP/s (docs/SCALING.md).
  utilization: float = 0.3
  hbm_fraction: float = 1.0  # share of a chip's HBM a program may use
  baseline: bool = True  # also the full net alone, for the method's relative cost
  eval_programs: bool = True  # also the eval step and each depth's forward
  max_batch: bool = False  # also search the largest per-chip train batch
  train_examples: int | None = None  # per epoch; None: the dataset's known size

  def check(self) -> None:
    for name in ('utilization', 'hbm_fraction'):
      if not 0 < getattr(self, name) <= 1:
        raise AotError(f'--{name}={getattr(self, name)} must be in (0, 1]')


@dataclasses.dataclass
class SliceReport:
  slice: Slice
  global_batch: int
  options: Options
  train_examples: int
  programs: list[Program]
  setup: dict = dataclasses.field(default_factory=dict)  # model, method, dtype, depths
  max_batch_per_chip: int | None = None

  @property
  def train_step(self) -> Program:
    return self.programs[0]

  @property
  def baseline(self) -> Program | None:
    return next((p for p in self.programs if p.name == 'full_net_alone'), None)

  @property
  def capacity(self) -> int:
    """Bytes per chip a program may use."""
    return int(self.slice.chip.hbm_bytes * self.options.hbm_fraction)

  def fits(self, program: Program) -> bool:
    return program.error is None and program.total <= self.capacity

  def projection(self) -> dict[str, float]:
    """Step time and throughput at `utilization` of peak bf16 FLOP/s, and the
    roofline bound: FLOPs at peak or HBM traffic at full bandwidth, the slower."""
    step, chip = self.train_step, self.slice.chip
    seconds = step.flops / (self.options.utilization * chip.peak_bf16_flops)
    per_chip = step.batch_per_chip / seconds if seconds else 0.0
    slice_rate = per_chip * self.slice.num_chips
    at_peak = step.flops / chip.peak_bf16_flops
    roofline = max(at_peak, step.bytes_accessed / chip.hbm_bytes_per_second)
    result = {'step_seconds': seconds, 'images_per_second_per_chip': per_chip,
              'images_per_second': slice_rate,
              'epoch_seconds': self.train_examples / slice_rate if slice_rate else 0.0,
              'flops_per_image': step.flops / step.batch_per_chip,
              'peak_step_seconds': at_peak,
              'peak_images_per_second_per_chip':
                  step.batch_per_chip / at_peak if at_peak else 0.0,
              'roofline_step_seconds': roofline,
              'roofline_images_per_second_per_chip':
                  step.batch_per_chip / roofline if roofline else 0.0}
    if self.baseline is not None and self.baseline.flops:
      result['flops_vs_full_net_alone'] = step.flops / self.baseline.flops
    return result

  def to_json(self) -> dict:
    return {**self.setup, 'topology': self.slice.name, 'libtpu_topology': self.slice.topology,
            'chip': self.slice.chip.name, 'chips': self.slice.num_chips,
            'hbm_bytes': self.slice.chip.hbm_bytes,
            'peak_bf16_flops': self.slice.chip.peak_bf16_flops,
            'hbm_bytes_per_second': self.slice.chip.hbm_bytes_per_second,
            'global_batch': self.global_batch, 'utilization': self.options.utilization,
            'capacity_bytes': self.capacity,
            'train_examples': self.train_examples,
            'max_batch_per_chip': self.max_batch_per_chip,
            'programs': [{**dataclasses.asdict(p), 'total': p.total,
                          'fits': self.fits(p)} for p in self.programs],
            'projection': self.projection()}


def find_max_batch(measure, capacity: int, start: int, step: int = 8,
                   limit: int = 1 << 16) -> int:
  """Largest per-chip batch whose program fits in `capacity` bytes: a multiple
  of `step` (smaller only when not even `step` fits); 0 when batch 1 does not.

  `measure(batch)` compiles and returns bytes per chip, None when the compiler
  runs out of memory. The result fits and result + step does not.
  """
  found = _largest_fitting(lambda k: measure(k * step), capacity, max(1, start // step),
                           max(1, limit // step))
  if found or step == 1:
    return found * step
  return _largest_fitting(measure, capacity, min(start, step - 1), step - 1)


def _largest_fitting(measure, capacity: int, start: int, limit: int) -> int:
  """Largest n >= 1 with measure(n) <= capacity (0 if none), assuming memory
  grows with n. Memory is close to affine in the batch, so each probe is where
  a line through the two largest measured points meets `capacity`, kept
  strictly inside the bracket (largest fit, smallest failure)."""
  measured: dict[int, int | None] = {}

  def fits(n: int) -> bool:
    if n not in measured:
      measured[n] = measure(n)
    used = measured[n]
    return used is not None and used <= capacity

  low = max(1, start)
  while not fits(low):
    if low == 1:
      return 0
    low //= 2
  high = None  # smallest n known not to fit
  while high is None or high - low > 1:
    if high is None and low >= limit:
      return low
    points = sorted((n, used) for n, used in measured.items() if used is not None)[-2:]
    guess = 0
    if len(points) == 2 and points[1][1] > points[0][1]:
      (n0, m0), (n1, m1) = points
      guess = int(n0 + (capacity - m0) * (n1 - n0) / (m1 - m0))
    if high is None:  # grow: to the prediction (past `low`), or double
      guess = min(max(guess, low + 1) if guess else 2 * low, limit)
    elif not low < guess < high:  # shrink: the prediction if inside, else the middle
      guess = (low + high) // 2
    if fits(guess):
      low = guess
    else:
      high = guess
  return low


def check_slice(config, slice_: Slice, options: Options = Options(),
                log=print) -> SliceReport:
  """Compiles every program of `config` for `slice_` and reports on them."""
  classes = _num_classes(config)
  examples = options.train_examples or _train_examples(config)
  mesh = mesh_lib.create_mesh(topology_devices(slice_))
  for field in ('batch_size', 'eval_batch_size'):
    try:
      mesh_lib.check_batch_size(config[field], mesh, field)
    except ValueError as e:
      raise AotError(f'{slice_.name}: {e}') from e
  exp = build(config, mesh, classes, examples)
  log(f'compiling {config.model.name} ({config.method}) for {slice_.name}: '
      f'{slice_.num_chips} x {slice_.chip.name}')
  programs = [compile_train_step(exp)]
  log(f'  compiled train_step in {programs[0].compile_seconds:.0f} s')
  if options.baseline and config.method != 'individual':
    programs.append(compile_train_step(build(full_net_alone(config), mesh, classes, examples),
                                       name='full_net_alone'))
    log(f'  compiled full_net_alone in {programs[-1].compile_seconds:.0f} s')
  if options.eval_programs:
    programs += compile_eval_programs(exp)
    log(f'  compiled the eval step and {len(exp.depths)} forwards')
  report = SliceReport(slice_, config.batch_size, options, examples, programs,
                       setup={'model': config.model.name, 'method': config.method,
                              'dtype': config.model.dtype,
                              'depths': [list(d) for d in exp.depths]})
  if options.max_batch:
    compiled = {programs[0].batch_per_chip: programs[0]}  # the config's own batch

    def measure(per_chip: int) -> int | None:
      program = compiled.get(per_chip) or compile_train_step(
          build(config, mesh, classes, examples, per_chip * mesh.size))
      log(f'  per-chip train batch {per_chip}: '
          + ('out of memory' if program.error else f'{program.total / GIB:.2f} GiB'))
      return None if program.error else program.total

    report.max_batch_per_chip = find_max_batch(measure, report.capacity,
                                               config.batch_size // mesh.size)
  return report


def format_report(report: SliceReport) -> str:
  chip, options = report.slice.chip, report.options
  unit, scale = ('GiB', GIB) if report.train_step.total >= GIB // 2 else ('MiB', 2**20)
  lines = [f'{report.slice.name} ({report.slice.topology}): {report.slice.num_chips} chips '
           f'of {chip.name}, {chip.hbm_bytes / GIB:.1f} GiB HBM and '
           f'{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s peak bf16 each; mesh data='
           f'{report.slice.num_chips}; global batch {report.global_batch}',
           f'{"program":<20}{"batch/chip":>11}{"args":>8}{"out":>8}{"alias":>8}{"temp":>8}'
           f'{"code":>8}{"total":>8}{"HBM":>6}{"GFLOP/step":>12}  ({unit} per chip)']
  for p in report.programs:
    if p.error is not None:
      lines.append(f'{p.name:<20}{p.batch_per_chip:>11}  does not compile: {p.error[:160]}')
      continue
    sizes = ''.join(f'{n / scale:>8.2f}' for n in (p.argument, p.output, p.alias, p.temp,
                                                     p.code, p.total))
    lines.append(f'{p.name:<20}{p.batch_per_chip:>11}{sizes}{p.total / chip.hbm_bytes:>6.0%}'
                 f'{p.flops / 1e9:>12.4g}' + ('' if report.fits(p) else '  DOES NOT FIT'))
  if options.hbm_fraction < 1:
    lines.append(f'programs may use {options.hbm_fraction:.0%} of HBM: '
                 f'{report.capacity / GIB:.2f} GiB per chip')
  if report.train_step.error is None:
    proj = report.projection()
    lines.append(
        f'projected at {options.utilization:.0%} of peak: train step '
        f'{proj["step_seconds"] * 1e3:.3g} ms, {proj["images_per_second_per_chip"]:,.0f} '
        f'img/s per chip, {proj["images_per_second"]:,.0f} img/s for the slice, '
        f'{proj["epoch_seconds"]:,.1f} s per epoch of {report.train_examples:,} images; '
        f'{proj["flops_per_image"] / 1e9:.3g} GFLOP per training image')
    lines.append(
        f'at 100% of peak: {proj["peak_step_seconds"] * 1e3:.3g} ms, '
        f'{proj["peak_images_per_second_per_chip"]:,.0f} img/s per chip; roofline bound '
        f'(also {report.train_step.bytes_accessed / 1e9:.3g} GB of HBM traffic at '
        f'{chip.hbm_bytes_per_second / 1e9:.0f} GB/s): '
        f'{proj["roofline_step_seconds"] * 1e3:.3g} ms, at most '
        f'{proj["roofline_images_per_second_per_chip"]:,.0f} img/s per chip')
    if 'flops_vs_full_net_alone' in proj:
      lines.append(f'train step FLOPs / full net alone: {proj["flops_vs_full_net_alone"]:.2f}x')
  if report.max_batch_per_chip is not None:
    lines.append(f'largest per-chip train batch that fits: {report.max_batch_per_chip} '
                 f'(global {report.max_batch_per_chip * report.slice.num_chips})')
  return '\n'.join(lines)


def run(config, topologies: Sequence[str], options: Options = Options(),
        log=print) -> list[SliceReport]:
  """Checks every topology (all names are checked before anything compiles)."""
  options.check()
  slices = [parse_topology(t) for t in topologies]
  reports = []
  for slice_ in slices:
    report = check_slice(config, slice_, options, log)
    log(format_report(report))
    reports.append(report)
  return reports


def failures(reports: Sequence[SliceReport]) -> list[str]:
  """One line per program that does not fit."""
  lines = []
  for report in reports:
    for p in report.programs:
      if not report.fits(p):
        need = 'more than HBM' if p.error else f'{p.total / GIB:.2f} GiB'
        lines.append(
            f'{p.name} needs {need} per chip on {report.slice.name}, which allows '
            f'{report.capacity / GIB:.2f} GiB; lower --config.{p.batch_field} or use more chips '
            '(--find_max_batch finds the largest batch that fits)')
  return lines


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_multi_string('topology', None, 'TPU slice: v5e:16x16, v4-32, ... (repeatable).')
flags.DEFINE_float('utilization', Options.utilization,
                   'Fraction of peak bf16 FLOP/s the projection assumes.')
flags.DEFINE_float('hbm_fraction', Options.hbm_fraction,
                   'Share of each chip\'s HBM a program may use (headroom below 1).')
flags.DEFINE_bool('find_max_batch', False, 'Also search the largest per-chip train batch.')
flags.DEFINE_bool('baseline', True, 'Also compile the full net alone for the cost ratio.')
flags.DEFINE_bool('eval_programs', True, 'Also compile the eval step and per-depth forwards.')
flags.DEFINE_integer('train_examples', None, 'Training examples per epoch (default: known '
                     'split sizes).')
flags.DEFINE_string('json', None, 'Write the reports to this JSON file.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv: Sequence[str]) -> None:
  del argv
  # The host side needs no accelerator: never claim a local TPU or GPU.
  jax.config.update('jax_platforms', 'cpu')
  input_pipeline.hide_accelerators_from_tf()
  options = Options(utilization=FLAGS.utilization, hbm_fraction=FLAGS.hbm_fraction,
                    baseline=FLAGS.baseline, eval_programs=FLAGS.eval_programs,
                    max_batch=FLAGS.find_max_batch, train_examples=FLAGS.train_examples)
  try:
    reports = run(FLAGS.config, FLAGS.topology, options)
  except (AotError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump([r.to_json() for r in reports], f, indent=2)
  if problems := failures(reports):
    for line in problems:
      print(f'error: {line}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
