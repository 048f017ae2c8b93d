"""Process settings made before JAX starts (ddnn_jax/runtime.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from ddnn_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of touching a 64 MB malloc block that replaces a freed one
# of the same size (the way XLA:CPU allocates each execution's temporaries);
# argv[1] == '1' keeps freed memory.
FAULTS = textwrap.dedent('''
    import ctypes, resource, sys
    from ddnn_jax import runtime
    if sys.argv[1] == '1':
      assert runtime.keep_freed_host_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 2, size)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _faults(keep: bool) -> int:
  env = {**os.environ, 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-c', FAULTS, '1' if keep else '0'], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_keep_freed_host_memory_reuses_large_blocks_without_faults():
  # By default glibc unmaps a freed 64 MB block and maps a new one, which
  # faults in page by page (16,384 pages); kept, the block is reused as is.
  default, kept = _faults(False), _faults(True)
  assert default > 16_384 * 0.9, default
  assert kept < 100, kept


@pytest.mark.parametrize('env, expected', [
    ({'JAX_PLATFORMS': 'cpu'}, True),
    ({'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
     False),
    ({'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
     True),
    ({'JAX_PLATFORMS': 'cpu', 'JAX_NUM_PROCESSES': '2'}, False),
    ({'JAX_PLATFORMS': 'cpu', 'SLURM_NTASKS': '4'}, False),
    ({'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '4'}, False),
    ({'JAX_PLATFORMS': 'tpu,cpu'}, False),
    ({'JAX_PLATFORMS': 'cuda'}, False),
])
def test_configure_cpu_threads_only_for_one_cpu_device(monkeypatch, env, expected):
  for key in ('JAX_PLATFORMS', 'XLA_FLAGS', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS',
              'JAX_NUM_CPU_DEVICES', 'NPROC'):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert runtime.configure_cpu_threads('auto') is expected
  assert os.environ.get('NPROC') == ('1' if expected else None)


def test_configure_cpu_threads_keeps_xla_convolutions_and_user_choice(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('NPROC', raising=False)
  assert not runtime.configure_cpu_threads('xla')  # XLA's convolutions need the pool
  assert 'NPROC' not in os.environ
  monkeypatch.setenv('NPROC', '2')
  assert not runtime.configure_cpu_threads('onednn')
  assert os.environ['NPROC'] == '2'


def test_configure_cpu_threads_sees_accelerators_without_jax_platforms(monkeypatch):
  for key in ('JAX_PLATFORMS', 'XLA_FLAGS', 'NPROC'):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(runtime.glob, 'glob',
                      lambda pattern: ['/dev/accel0'] if pattern == '/dev/accel*' else [])
  assert not runtime.configure_cpu_threads('auto')
  monkeypatch.setattr(runtime.glob, 'glob', lambda pattern: [])
  assert runtime.configure_cpu_threads('auto')
