"""Ahead-of-time compilation for TPU slices (libtpu compiles here, on the CPU)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from configs import datasets
from ddnn_jax import (
  aot,
  aot_report,
  batch_search,
  config_lib,
  input_pipeline,
  tpu_slices,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'imagenet.py') + ':smoke'


def smoke_config(**overrides):
  config = config_lib.load(SMOKE)
  config.update(overrides)
  return config


# ---------------------------------------------------------------- no compiler needed


@pytest.mark.parametrize('name, topology, chips', [
    ('v5e:16x16', 'v5e:16x16', 256),
    ('v5e:2x2', 'v5e:2x2', 4),
    ('v4:2x2x4', 'v4:2x2x4', 16),
    ('v4-32', 'v4:2x2x4', 16),  # accelerator types count TensorCores: 2 per v4 chip
    ('v4-128', 'v4:4x4x4', 64),
    ('v5litepod-64', 'v5e:8x8', 64),
    ('v5e-256', 'v5e:16x16', 256),
    ('v5p-8', 'v5:2x2x1', 4),
    ('v6e-16', 'v6e:4x4', 16),
])
def test_parse_topology(name, topology, chips):
  slice_ = tpu_slices.parse_topology(name)
  assert (slice_.topology, slice_.num_chips) == (topology, chips)


@pytest.mark.parametrize('name, message', [
    ('v9:2x2', 'unknown TPU generation'),
    ('v4:2x2', '3 dimensions'),
    ('v4-33', 'not a slice size'),
    ('v5e-6', 'not a slice size'),
    ('tpu', 'neither'),
])
def test_bad_topologies_are_named(name, message):
  with pytest.raises(aot.AotError, match=message):
    tpu_slices.parse_topology(name)


def affine_measure(fixed, per_image, capacity, oom_above=None):
  """bytes(batch) = fixed + per_image * batch; None (compiler OOM) past oom_above."""
  calls = []

  def measure(batch):
    calls.append(batch)
    if oom_above is not None and batch > oom_above:
      return None
    return fixed + per_image * batch

  return measure, calls


@pytest.mark.parametrize('fixed, per_image, start, oom_above', [
    (1000, 10, 4, None),  # answer 896: 8-aligned below the exact 900
    (1000, 10, 512, None),  # the start does not fit
    (100, 1, 1, 950),  # the compiler fails before the byte count says so
    (5000, 3, 16, None),  # nothing but small batches
    (10, 0.5, 64, None),
])
def test_find_max_batch_is_the_boundary(fixed, per_image, start, oom_above):
  capacity = 10_000
  measure, calls = affine_measure(fixed, per_image, capacity, oom_above)
  found = batch_search.find_max_batch(measure, capacity, start, step=8)

  def fits(b):
    used = measure(b)
    return used is not None and used <= capacity

  assert fits(found) and not fits(found + 8)
  assert found % 8 == 0
  assert len(calls) <= 16  # each probe is a compile: a search, not a scan


def test_find_max_batch_below_the_step_and_none():
  measure, _ = affine_measure(9_000, 200, 10_000)  # batch 5 fits, 6 does not
  assert batch_search.find_max_batch(measure, 10_000, 16) == 5
  measure, _ = affine_measure(20_000, 10, 10_000)
  assert batch_search.find_max_batch(measure, 10_000, 16) == 0


def test_train_examples_come_from_the_preset():
  config = config_lib.load(os.path.join(ROOT, 'configs', 'imagenet.py'))
  assert aot._train_examples(config) == 1_281_167
  config.data.train_split = 'train[:90%]'
  with pytest.raises(aot.AotError, match='pass --train_examples'):
    aot._train_examples(config)
  del config.data['num_examples']  # a config saved before the field existed
  config.data.train_split = 'train'
  with pytest.raises(aot.AotError, match='pass --train_examples'):
    aot._train_examples(config)


def test_batch_spec_matches_the_pipeline(tmp_path):
  data = datasets.data_config('digits')
  data.data_dir = str(tmp_path)
  batch = next(input_pipeline.train_batches(data, global_batch_size=16, seed=0))
  evals = next(iter(input_pipeline.eval_batches(data, global_batch_size=16)))
  for spec, real in ((input_pipeline.batch_spec(8, 16, train=True), batch),
                     (input_pipeline.batch_spec(8, 16, train=False), evals)):
    assert sorted(spec) == sorted(real)
    for key, value in real.items():
      assert (spec[key].shape, spec[key].dtype) == (value.shape, value.dtype), key


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real = tpu_slices.importlib.util.find_spec
  monkeypatch.setattr(tpu_slices.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(aot.AotError, match=r"pip install -e '\.\[tpu\]'"):
    tpu_slices.topology_devices(tpu_slices.parse_topology('v5e:2x2'))


def test_cli_bad_input_is_one_line():
  result = subprocess.run(
      [sys.executable, '-m', 'ddnn_jax.aot', '--config', SMOKE, '--topology', 'v5e-6'],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 1
  (line,) = [x for x in result.stderr.splitlines() if x.startswith('error:')]
  assert 'v5e-6' in line and 'v5e:4x4' in line


# ---------------------------------------------------------------- compiled by libtpu


@pytest.fixture(scope='module')
def smoke_report():
  """configs/imagenet.py:smoke, every program, compiled for a v5e 2x2 slice."""
  (report,) = aot.run(smoke_config(), ['v5e:2x2'], aot.Options(utilization=0.5),
                      log=lambda *_: None)
  return report


def test_every_program_compiles_with_positive_memory_and_flops(smoke_report):
  names = [p.name for p in smoke_report.programs]
  assert names == ['train_step', 'full_net_alone', 'eval_step', 'forward d1-1-1-1',
                   'forward d2-2-2-2', 'forward d3-4-6-3']
  for p in smoke_report.programs:
    assert p.error is None and smoke_report.fits(p), p
    assert p.argument > 0 and p.output > 0 and p.total > 0 and p.flops > 0, p
  step = smoke_report.train_step
  assert step.batch_per_chip == 32 // 4 and step.alias > 0  # the state is donated
  assert not aot_report.failures([smoke_report])


def test_projection_and_method_cost(smoke_report):
  programs = {p.name: p for p in smoke_report.programs}
  proj = smoke_report.projection()
  chip = smoke_report.slice.chip
  assert proj['step_seconds'] == pytest.approx(
      programs['train_step'].flops / (0.5 * chip.peak_bf16_flops))
  assert proj['images_per_second'] == pytest.approx(4 * proj['images_per_second_per_chip'])
  assert proj['epoch_seconds'] == pytest.approx(1437 / proj['images_per_second'])
  step = programs['train_step']
  assert proj['peak_images_per_second_per_chip'] == pytest.approx(
      2 * proj['images_per_second_per_chip'])  # 100% of peak against 50%
  assert step.bytes_accessed > 0
  assert proj['roofline_step_seconds'] == pytest.approx(max(
      step.flops / chip.peak_bf16_flops, step.bytes_accessed / chip.hbm_bytes_per_second))
  # EKD runs three depths forward and backward: more than the full net alone,
  # less than three full nets.
  assert 1.2 < proj['flops_vs_full_net_alone'] < 3
  # Shallower depths cost less to run.
  forwards = [programs[f'forward d{d}'].flops for d in ('1-1-1-1', '2-2-2-2', '3-4-6-3')]
  assert forwards == sorted(forwards) and forwards[0] < forwards[-1]
  saved = json.loads(json.dumps(smoke_report.to_json()))
  assert saved['chips'] == 4 and saved['method'] == 'ekd' and len(saved['programs']) == 6


@pytest.mark.parametrize('topology', ['v4-8', 'v5e:2x2', 'v5p-8', 'v6e:2x2'])
def test_usable_hbm_is_what_the_compiler_allows(topology):
  # A program far too big for any chip: the compiler names the HBM it allows.
  import jax
  import jax.numpy as jnp

  slice_ = tpu_slices.parse_topology(topology)
  mesh = aot.mesh_lib.create_mesh(tpu_slices.topology_devices(slice_))
  x = jax.ShapeDtypeStruct((4 * 100_000,), jnp.float32,
                           sharding=aot.mesh_lib.batch_sharding(mesh))
  program = aot._compile('outer', 'batch_size', 100_000,
                         jax.jit(lambda v: (jnp.sin(jnp.outer(v, v)) @ jnp.cos(
                             jnp.outer(v, v))).sum()), x)
  assert program.error is not None
  (available,) = re.findall(r'available HBM \(([\d.]+)G\)', program.error)
  assert int(float(available) * tpu_slices.GIB) == slice_.chip.hbm_bytes


def compile_step(topology, global_batch):
  config = smoke_config(batch_size=global_batch)
  mesh = aot.mesh_lib.create_mesh(tpu_slices.topology_devices(tpu_slices.parse_topology(topology)))
  return aot.compile_train_step(aot.build(config, mesh, 10, 1437, global_batch))


def test_flops_per_step_scale_with_the_global_batch(smoke_report):
  # FLOPs = fixed (optimizer update, norms) + per image x batch: the per-image
  # part doubles with the batch and dominates.
  flops = {32: smoke_report.train_step.flops}
  for batch in (64, 128):
    flops[batch] = compile_step('v5e:2x2', batch).flops
  assert flops[128] - flops[64] == pytest.approx(2 * (flops[64] - flops[32]), rel=0.01)
  assert flops[64] / flops[32] > 1.5


def test_flops_are_per_chip(smoke_report):
  # Four times the chips at four times the global batch: the same work per chip.
  wide = compile_step('v5e:4x4', 128)
  assert wide.batch_per_chip == smoke_report.train_step.batch_per_chip == 8
  assert wide.flops == pytest.approx(smoke_report.train_step.flops, rel=0.02)


def test_cli_exits_non_zero_when_a_program_does_not_fit(tmp_path):
  # The smoke net needs ~60 MiB per chip; allow a ten-thousandth of v5e's HBM.
  out = tmp_path / 'report.json'
  result = subprocess.run(
      [sys.executable, '-m', 'ddnn_jax.aot', '--config', SMOKE, '--topology', 'v5e:2x2',
       '--hbm_fraction=0.0001', '--nobaseline', '--noeval_programs', '--json', str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'DOES NOT FIT' in result.stdout
  (error,) = [x for x in result.stderr.splitlines() if x.startswith('error:')]
  assert 'train_step' in error and 'v5e:2x2' in error and '--config.batch_size' in error
  (saved,) = json.loads(out.read_text())
  assert saved['capacity_bytes'] == int(tpu_slices.CHIPS['v5e'].hbm_bytes * 0.0001)
  assert not saved['programs'][0]['fits']


def test_scaling_table_reads_the_reports(smoke_report, tmp_path):
  spec = importlib.util.spec_from_file_location('scaling', os.path.join(ROOT, 'bench',
                                                                         'scaling.py'))
  scaling = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(scaling)
  saved = smoke_report.to_json()
  (tmp_path / scaling.json_name('configs/imagenet.py', 'v5e:2x2')).write_text(
      json.dumps([saved]))
  train, evals = scaling.table(tmp_path, utilization=0.25).split('\n\n')
  (row,) = train.splitlines()[2:]
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[:4] == ['imagenet.py', 'v5e:2x2', '4', '8']
  # Projections are rescaled from the report's 50% to the asked-for 25%.
  per_chip = saved['projection']['images_per_second_per_chip'] / 2
  assert cells[7] == f'{per_chip:,.0f}'
  assert cells[-1] == f'{saved["projection"]["flops_vs_full_net_alone"]:.2f}x'
  assert len(evals.splitlines()) == 2 + 4  # the eval step and three forwards
