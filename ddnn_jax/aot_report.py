"""What the compiled programs of a TPU slice need, judged against its chips.

`SliceReport` holds the programs `ddnn_jax.aot` compiled for one slice (HBM
bytes and FLOPs per chip) and answers what a run on it would be: which
programs fit in a chip's HBM, the projected step time, images/s and epoch time
at a stated fraction of peak (with the roofline bound), and the JSON that
bench/scaling.py tabulates. `format_report` is the text `python -m
ddnn_jax.aot` prints; `failures` its one-line reasons to exit 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ddnn_jax.tpu_slices import GIB, AotError, Slice


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
  """The programs compiled for one slice, judged against its chips; the train
  step comes first."""
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
