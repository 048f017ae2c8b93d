"""Process-level XLA settings shared by the entry points (call before jax starts)."""

import ctypes
import glob
import os
import re

# XLA:CPU runs convolutions about twice as fast with this fusion setting (CIFAR
# ResNet-18 training: 57 instead of 30 img/s on two cores). The flag exists in
# the pinned jaxlib; an XLA that does not know it would abort, hence the pin.
CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def configure_xla_flags() -> None:
  """Adds CPU_CONV_FLAG to XLA_FLAGS unless the user set that option already."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_CONV_FLAG}'.strip()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse instead of unmapping it.

  XLA:CPU allocates each execution's temporaries as one block (225 MB for the
  width-0.5 EKD train step) and frees it afterwards. glibc serves blocks that
  large with a fresh mmap, so every step page-faults all of it in again: 55,000
  faults and 90 ms of kernel time per step, a quarter of the step. With one
  arena, no mmap for large blocks and no trimming, the block is reused and the
  step runs 1.3-1.4x faster (BENCHMARKS.md). The cost: freed host memory stays
  with the process (its peak, not its current use). Call it before JAX starts
  its CPU threads (their first allocation picks their arena). Returns False
  where there is no glibc mallopt (macOS, musl), which changes nothing.
  """
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(_M_ARENA_MAX, 1) == 1, mallopt(_M_MMAP_MAX, 0) == 1,
              mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1])


# Device files of the accelerators JAX would pick over the CPU.
_ACCELERATOR_DEVICES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def _predicts_one_cpu_device() -> bool:
  """Whether JAX will run on exactly one CPU device, judged before it starts."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    if platforms.split(',')[0].strip() != 'cpu':
      return False
  elif any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES):
    return False
  count = re.search(r'xla_force_host_platform_device_count=(\d+)',
                    os.environ.get('XLA_FLAGS', ''))
  if count and int(count.group(1)) > 1:
    return False
  return all(int(os.environ.get(k, '1') or 1) <= 1
             for k in ('JAX_NUM_CPU_DEVICES', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS'))


def configure_cpu_threads(conv_impl: str) -> bool:
  """Gives XLA:CPU one intra-op thread when oneDNN runs the convolutions.

  oneDNN parallelises each convolution over every core with OpenMP; XLA's own
  thread pool (one thread per core) then competes with it for the same cores.
  With one XLA thread, the width-0.5 EKD train step runs 1.2x faster and the
  width-1.0 one 1.15x (BENCHMARKS.md). XLA's own convolutions need the pool,
  so this applies only where `conv_impl` ('auto' or 'onednn') will pick oneDNN:
  a one-device CPU process. XLA reads the size from $NPROC when JAX creates its
  CPU client, so call this before JAX starts; a user's NPROC is kept. Returns
  whether it set the size.
  """
  if conv_impl == 'xla' or 'NPROC' in os.environ or not _predicts_one_cpu_device():
    return False
  os.environ['NPROC'] = '1'
  return True


def configure_cpu_process(conv_impl: str, keep_freed_memory: bool = True) -> bool:
  """Both CPU process settings of training, before JAX starts: freed host memory
  kept (unless `keep_freed_memory` is False) and XLA's thread count for
  `conv_impl`. Returns configure_cpu_threads' answer."""
  if keep_freed_memory:
    keep_freed_host_memory()
  return configure_cpu_threads(conv_impl)


def default_cache_dir() -> str:
  """Where ddnn_jax keeps built kernels and compiled programs between runs."""
  return os.environ.get('DDNN_JAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ddnn_jax')


def enable_compilation_cache(path: str | None) -> None:
  """JAX's persistent compilation cache in `path` ('' or None: off).

  A rerun, a resume or another run with the same shapes loads its programs
  instead of compiling them again (seconds per program on two CPU cores).
  """
  import jax  # here, so that importing this module leaves jax unimported

  if not path:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  # Cache every program, not only those over JAX's default 1 s compile time.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
