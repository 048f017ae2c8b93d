"""Convolutions through oneDNN on XLA:CPU, a drop-in for `lax.conv_general_dilated`.

XLA:CPU's convolutions run 2-3x slower than oneDNN's on the narrow layers
(8-64 channels) of CIFAR ResNets, forward and backward (BENCHMARKS.md). This
module builds `csrc/onednn_conv.cc` (three XLA FFI handlers: forward, input
gradient, kernel gradient) on first use with the system C++ compiler against
the pip-installed oneDNN (`onednn-cpu-gomp` / `onednn-devel-cpu-gomp`), caches
the shared library by content hash, and wraps the handlers in a custom_vjp.

`conv_general_dilated(impl)` returns the function a `flax.linen.Conv` calls:
- 'xla': `lax.conv_general_dilated`, unchanged numerics everywhere;
- 'onednn': the oneDNN kernels on CPU (error if they cannot be built);
- 'auto': oneDNN when the program is lowered for CPU, the process sees one
  device and the library builds, else XLA. TPU and GPU programs always get
  XLA's convolution (`lax.platform_dependent` picks it at lowering), so
  `ddnn_jax.aot` and accelerator runs are unaffected.

Only what ResNets use goes to oneDNN: float32 NHWC x HWIO, no dilation, one
feature group; anything else falls back to XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ddnn_jax import runtime

IMPLS = ('auto', 'xla', 'onednn')
_SOURCE = os.path.join(os.path.dirname(__file__), 'csrc', 'onednn_conv.cc')
_TARGETS = {'forward': 'DdnnConvForward', 'input_grad': 'DdnnConvInputGrad',
            'kernel_grad': 'DdnnConvKernelGrad'}


class OneDNNUnavailableError(RuntimeError):
  pass


def _onednn_prefix() -> str:
  """The prefix holding include/oneapi/dnnl and lib/libdnnl.so (pip data files)."""
  candidates = [os.environ.get('DDNN_ONEDNN_PREFIX', ''), sys.prefix,
                sysconfig.get_paths()['data']]
  for prefix in candidates:
    if prefix and os.path.exists(os.path.join(prefix, 'include', 'oneapi', 'dnnl',
                                              'dnnl.hpp')) \
        and os.path.exists(os.path.join(prefix, 'lib', 'libdnnl.so')):
      return prefix
  raise OneDNNUnavailableError(
      "oneDNN headers/library not found; pip install -e . installs them on x86-64 "
      "Linux (onednn-cpu-gomp, onednn-devel-cpu-gomp), or set "
      "--config.model.conv_impl=xla")


def _build() -> str:
  """Compiles the FFI library once per (source, jaxlib, oneDNN) and returns its path."""
  prefix = _onednn_prefix()
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise OneDNNUnavailableError(
        'no C++ compiler (g++) to build the oneDNN convolution; install one or set '
        '--config.model.conv_impl=xla')
  with open(_SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read() + jax.__version__.encode() + prefix.encode())
  path = os.path.join(runtime.default_cache_dir(), f'onednn_conv-{digest.hexdigest()[:16]}.so')
  if os.path.exists(path):
    return path
  os.makedirs(runtime.default_cache_dir(), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC',
             f'-I{jax.ffi.include_dir()}', f'-I{os.path.join(prefix, "include")}',
             _SOURCE, f'-L{os.path.join(prefix, "lib")}', '-ldnnl',
             f'-Wl,-rpath,{os.path.join(prefix, "lib")}', '-o', tmp]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise OneDNNUnavailableError(
        f'building the oneDNN convolution failed ({compiler}): '
        f'{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""}; '
        'set --config.model.conv_impl=xla')
  os.replace(tmp, path)  # atomic: concurrent builders never see half a file
  return path


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(_build())
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'ddnn_conv_{target}',
                                jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the oneDNN kernels can be used here (builds them on first call)."""
  try:
    _register()
  except (OneDNNUnavailableError, OSError) as e:
    logging.warning('oneDNN convolutions unavailable, using XLA: %s', e)
    return False
  return True


def _output_shape(x_shape, w_shape, strides, padding):
  (pt, pb), (pl, pr) = padding
  kh, kw, _, out = w_shape
  return (x_shape[0], (x_shape[1] + pt + pb - kh) // strides[0] + 1,
          (x_shape[2] + pl + pr - kw) // strides[1] + 1, out)


def _attrs(strides, padding):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
              pad_right=np.int64(pr))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _ffi(target, out_shape, *args, strides, padding):
  # Under vmap (jax.jacrev, per-example gradients) each call runs once per
  # batch element, in a loop.
  call = jax.ffi.ffi_call(f'ddnn_conv_{target}',
                          jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method='sequential')
  return call(*args, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  shape = _output_shape(x.shape, w.shape, strides, padding)
  return lax.platform_dependent(
      x, w, cpu=lambda x, w: _ffi('forward', shape, x, w, strides=strides,
                                  padding=padding),
      default=lambda x, w: _xla_conv(x, w, strides, padding))


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals

  def onednn(x, w, dy):
    kw = dict(strides=strides, padding=padding)
    return (_ffi('input_grad', x.shape, x, w, dy, **kw),
            _ffi('kernel_grad', w.shape, x, w, dy, **kw))

  def xla(x, w, dy):
    return jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding), x, w)[1](dy)

  return lax.platform_dependent(x, w, dy, cpu=onednn, default=xla)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _supported(x, w, strides, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count) -> bool:
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 4:
    return False
  if feature_group_count != 1:
    return False
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  expected = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
  given = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
  return given == expected and len(strides) == 2


def _onednn_general(x, w, window_strides: Sequence[int], padding, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                    precision=None):
  if not _supported(x, w, window_strides, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(
        x, w, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):  # 'SAME' / 'VALID' as lax resolves them
    padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(x, w, strides, padding)


def _auto(x, w, *args, **kwargs):
  if jax.device_count() != 1 or not available():
    return lax.conv_general_dilated(x, w, *args, **kwargs)
  return _onednn_general(x, w, *args, **kwargs)


def _forced(x, w, *args, **kwargs):
  try:
    _register()
  except (OneDNNUnavailableError, OSError) as e:
    raise OneDNNUnavailableError(f'conv_impl=onednn: {e}') from None
  return _onednn_general(x, w, *args, **kwargs)


def conv_general_dilated(impl: str):
  """The convolution function for `flax.linen.Conv(conv_general_dilated=...)`."""
  if impl not in IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r}; set --config.model.conv_impl to '
                     f'one of {IMPLS}')
  return {'xla': lax.conv_general_dilated, 'onednn': _forced, 'auto': _auto}[impl]
