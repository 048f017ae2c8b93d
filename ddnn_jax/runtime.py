"""Process-level XLA settings shared by the entry points (call before jax starts)."""

import os

# XLA:CPU runs convolutions about twice as fast with this fusion setting (CIFAR
# ResNet-18 training: 57 instead of 30 img/s on two cores). The flag exists in
# the pinned jaxlib; an XLA that does not know it would abort, hence the pin.
CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def configure_xla_flags() -> None:
  """Adds CPU_CONV_FLAG to XLA_FLAGS unless the user set that option already."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_CONV_FLAG}'.strip()


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
