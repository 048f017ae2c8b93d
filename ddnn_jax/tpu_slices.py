"""TPU chips and slices: per-chip specs, topology names, and the devices of a
slice as libtpu describes them (no TPU needed; used by `ddnn_jax.aot`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator

GIB = 2**30
INSTALL_HINT = ("install it with pip install -e '.[tpu]' (jax[tpu] at the pinned jax "
                'version: libtpu, about 700 MB)')


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what a chip holds and computes."""
  name: str  # as in accelerator types: v4, v5e, v5p, v6e
  libtpu_name: str  # the prefix of libtpu topology names
  hbm_bytes: int  # what the compiler lets a program use (a little below nominal)
  peak_bf16_flops: float  # per chip, per second
  hbm_bytes_per_second: float
  cores_per_chip: int  # TensorCores per chip: accelerator types count cores
  megacore: bool  # the chip's cores act as one JAX device
  dims: int  # torus dimensions


# Per chip: usable HBM, peak bf16 FLOP/s and HBM bandwidth. Usable HBM is what
# libtpu 0.0.42's compiler reports as available ("exceeds available HBM"; the
# nominal 32 GiB / 16 GiB / 95 GiB / 32 GiB less its reservation), checked by
# tests/test_aot.py; peak and bandwidth from the Cloud TPU docs,
# https://cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e.
CHIPS = {
    'v4': Chip('v4', 'v4', int(30.75 * GIB), 275e12, 1200e9, 2, True, 3),
    'v5e': Chip('v5e', 'v5e', int(15.75 * GIB), 197e12, 819e9, 1, False, 2),
    'v5p': Chip('v5p', 'v5', int(95.74 * GIB), 459e12, 2765e9, 2, True, 3),
    'v6e': Chip('v6e', 'v6e', int(31.25 * GIB), 918e12, 1640e9, 1, False, 2),
}
_CHIP_ALIASES = {'v5litepod': 'v5e', 'v5': 'v5p'}
# Chips -> the slice shape Cloud TPU gives an accelerator type of that size.
_SHAPES = {
    2: {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
        256: '16x16'},
    3: {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
        256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'},
}

class AotError(Exception):
  """Bad input to the ahead-of-time check, or a program that does not fit: one
  line for the user."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as the user wrote it
  chip: Chip
  topology: str  # libtpu topology name, e.g. v5e:16x16
  num_chips: int


def _chip(family: str, name: str) -> Chip:
  chip = CHIPS.get(_CHIP_ALIASES.get(family, family))
  if chip is None:
    raise AotError(f'unknown TPU generation {family!r} in --topology={name}; use one of '
                   f'{", ".join(CHIPS)}')
  return chip


def parse_topology(name: str) -> Slice:
  """'v5e:16x16' (libtpu) or 'v4-32' / 'v5litepod-256' (accelerator type)."""
  if m := re.fullmatch(r'(v\w+?):(\d+(?:x\d+)+)', name):
    chip, shape = _chip(m.group(1), name), m.group(2)
    sizes = [int(n) for n in shape.split('x')]
    if len(sizes) != chip.dims:
      raise AotError(f'--topology={name}: {chip.name} slices have {chip.dims} dimensions, '
                     f'e.g. {chip.name}:{_SHAPES[chip.dims][16]}')
    return Slice(name, chip, f'{chip.libtpu_name}:{shape}', math.prod(sizes))
  if m := re.fullmatch(r'(v\w+?)-(\d+)', name):
    chip = _chip(m.group(1), name)
    chips, rest = divmod(int(m.group(2)), chip.cores_per_chip)
    shape = None if rest else _SHAPES[chip.dims].get(chips)
    if shape is None:
      sizes = ', '.join(f'{chip.name}-{n * chip.cores_per_chip}' for n in _SHAPES[chip.dims])
      raise AotError(f'--topology={name} is not a slice size this tool knows ({sizes}); '
                     f'give the shape instead, e.g. {chip.name}:{_SHAPES[chip.dims][16]}')
    return Slice(name, chip, f'{chip.libtpu_name}:{shape}', chips)
  raise AotError(f'--topology={name} is neither a libtpu topology (v5e:16x16, v4:2x2x4) '
                 'nor an accelerator type (v4-32, v5litepod-256)')


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
  """libtpu prints start-up warnings about the (absent) TPU VM to fd 2."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def topology_devices(slice_: Slice) -> list:
  """The slice's devices, described by libtpu (no TPU needed)."""
  if importlib.util.find_spec('libtpu') is None:
    raise AotError(f'compiling for TPU needs libtpu, which is not installed; {INSTALL_HINT}')
  # libtpu locks /tmp/libtpu_lockfile so that one process owns the local TPU;
  # compiling touches no TPU, so parallel checks (and a trainer) may share it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  kwargs = {'chip_config_name': 'megacore'} if slice_.chip.megacore else {}
  with _quiet_stderr():
    try:
      desc = topologies.get_topology_desc(platform='tpu', topology_name=slice_.topology,
                                          **kwargs)
    except Exception as e:  # libtpu's error names the problem
      raise AotError(f'libtpu rejects topology {slice_.topology} ({slice_.name}): '
                     f'{str(e).splitlines()[0][:300]}') from e
  if len(desc.devices) != slice_.num_chips:
    raise AotError(f'{slice_.name}: libtpu describes {len(desc.devices)} devices for '
                   f'{slice_.num_chips} chips')
  return desc.devices
