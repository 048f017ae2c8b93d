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
next to it. With any-depth training (`any_depth.k > 0`) the train step here is
the sandwich step's base program (the full net and the smallest depth); each
drawn depth runs in a smaller program of its own (ddnn_jax/any_depth.py), so
memory is the base's and FLOPs per step are a lower bound.

Topologies: libtpu names (`v5e:16x16`, `v4:2x2x4`, `v5p:2x2x1`, `v6e:4x4`) or
Cloud TPU accelerator types (`v4-32`, `v5litepod-256`, `v5p-8`, `v6e-16`).
Exits 1 with a one-line reason when a program does not fit in a chip's HBM or
the input is wrong; `--find_max_batch` also searches the largest per-chip train
batch that fits (to a multiple of 8).

This module compiles (`Program`, `check_slice`, `run`) and holds the command
line; `aot_report` judges the programs against the chips and formats them,
`batch_search` finds the largest batch that fits.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from ddnn_jax import (
  any_depth,
  aot_report,
  batch_search,
  evaluate,
  experiment,
  inference,
  input_pipeline,
  models,
  train,
)
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.aot_report import Options, Program
from ddnn_jax.tpu_slices import GIB, AotError, Slice, parse_topology, topology_devices

_OOM = re.compile(r'RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds? .*memory')


def _compile(name: str, batch_field: str, batch_per_chip: int, jitted, *args) -> Program:
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # XLA raises one type for every reason
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
                             inference.make_forward(model, depth, mesh), variables,
                             eval_batch['image']))
  return programs


def full_net_alone(config):
  """`config` training only its full depth as a standalone net."""
  alone = copy.deepcopy(config)
  with alone.unlocked():
    alone.method = 'individual'
    alone.individual_depth = models.create_model(config.model.name, 2).full_depth
  any_depth.switch_off(alone)
  return alone


def check_slice(config, slice_: Slice, options: Options | None = None,
                log=print) -> aot_report.SliceReport:
  """Compiles every program of `config` for `slice_` and reports on them."""
  options = options or Options()
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
  report = aot_report.SliceReport(
      slice_, config.batch_size, options, examples, programs,
      setup={'model': config.model.name, 'method': config.method,
             'dtype': config.model.dtype, 'depths': [list(d) for d in exp.depths]})
  if options.max_batch:
    report.max_batch_per_chip = _max_batch_per_chip(
        config, mesh, classes, examples, programs[0], report.capacity, log)
  return report


def _max_batch_per_chip(config, mesh, classes: int, examples: int, train_step: Program,
                        capacity: int, log) -> int:
  """The largest per-chip train batch whose step fits in `capacity` bytes;
  each probe compiles the train step at that batch (`train_step` is the
  config's own)."""
  compiled = {train_step.batch_per_chip: train_step}

  def measure(per_chip: int) -> int | None:
    program = compiled.get(per_chip) or compile_train_step(
        build(config, mesh, classes, examples, per_chip * mesh.size))
    log(f'  per-chip train batch {per_chip}: '
        + ('out of memory' if program.error else f'{program.total / GIB:.2f} GiB'))
    return None if program.error else program.total

  return batch_search.find_max_batch(measure, capacity, config.batch_size // mesh.size)


def run(config, topologies: Sequence[str], options: Options | None = None,
        log=print) -> list[aot_report.SliceReport]:
  """Checks every topology (all names are checked before anything compiles)."""
  options = options or Options()
  options.check()
  slices = [parse_topology(t) for t in topologies]
  reports = []
  for slice_ in slices:
    report = check_slice(config, slice_, options, log)
    log(aot_report.format_report(report))
    reports.append(report)
  return reports


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
  if problems := aot_report.failures(reports):
    for line in problems:
      print(f'error: {line}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
