"""Entry point: python -m ddnn_jax.main --config configs/default.py --workdir DIR.

Any config field can be overridden: --config.num_epochs=5 --config.model.bn_mode=private_stats,
or in the config argument: --config configs/default.py:smoke,seed=3 (configs/base.py).

Bad input (a config, dataset or workdir no run can use) is refused before
anything is written: one line `error: ...` on stderr and exit status 2; a run
that fails (diverges, cannot save) exits 1. --verbose shows the traceback
instead. docs/BAD_INPUT.md lists every case and its message.
"""

import errno
import gc
import logging as std_logging
import os
import re
import sys

# TensorFlow's C++ INFO lines (the CPU-feature notice) say nothing a user acts
# on; its warnings and errors stay (TF_CPP_MIN_LOG_LEVEL=0 brings them back).
# Set before anything imports TensorFlow (ml_collections' config_flags does).
# The oneDNN notice goes out before TF reads this, and stays.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddnn_jax import config_lib, runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402  -- after XLA_FLAGS

from ddnn_jax import checkpointing, input_pipeline, onednn_conv, train  # noqa: E402
from ddnn_jax import workdir as workdir_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and eval results.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string(
    'compilation_cache_dir', os.path.join(runtime.default_cache_dir(), 'xla'),
    "JAX's persistent compilation cache ('' turns it off); reruns and resumes "
    'load their programs from it instead of compiling again.')
flags.DEFINE_bool(
    'keep_freed_host_memory', True,
    "Have glibc malloc reuse freed host memory instead of unmapping it, so XLA:CPU's "
    'per-step temporaries are not page-faulted in again every step (1.3x faster CPU '
    'training); the process keeps its peak host memory. See runtime.keep_freed_host_memory.')
flags.DEFINE_integer(
    'heartbeat_timeout_s', 30,
    'Several processes: seconds without a heartbeat after which the others treat a '
    'process as dead and stop with an error instead of waiting for it (JAX: 100).')
flags.DEFINE_bool(
    'verbose', False,
    'On bad input or a failed run, raise the error with its traceback (and keep the '
    "libraries' tracebacks in the log) instead of printing one line `error: ...`.")
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run, when there are any.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  Automatic (JAX detects the rest): a Cloud TPU pod slice, or a SLURM job with
  more than one task.
  """
  env = os.environ
  if all(k in env for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                            'JAX_PROCESS_ID')):
    jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'],
                               int(env['JAX_NUM_PROCESSES']), int(env['JAX_PROCESS_ID']),
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)
  elif int(env.get('SLURM_NTASKS', '1')) > 1 or env.get('TPU_WORKER_HOSTNAMES', '').count(','):
    jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)


class _QuietLibraryLogs(std_logging.Filter):
  """Orbax narrates every save at INFO: keep its warnings and errors only.
  Unless --verbose, a failed checkpoint or event-file write reaches the user
  as one line, so Orbax's and clu's errors lose their traceback, and asyncio's
  'exception was never retrieved' of the abandoned parts of a failed save
  (logged whenever they are collected, even after the error line) goes."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    orbax = '/orbax/' in record.pathname
    if orbax and record.levelno < std_logging.WARNING:
      return False
    if FLAGS.verbose:
      return True
    if record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg):
      return False
    if orbax or '/clu/' in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def _verbose(argv: list[str]) -> bool:
  """--verbose as given on the command line, for errors before FLAGS hold it."""
  return any(a in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for a in argv)


def _flag_error(error: Exception, argv: list[str]) -> str | None:
  """The one-line message of a bad flag or --config, or None for another error."""
  if isinstance(error, flags.Error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    required = re.search(r'Flag (--\w+) must have a value other than None', str(error))
    if required:
      flag = required.group(1)
      example = {'--config': 'configs/default.py', '--workdir': 'DIR'}.get(flag, 'VALUE')
      return f'{flag} is required; pass e.g. {flag}={example}'
    if any(line.startswith('Traceback') for line in lines):  # the config file raised
      return f'could not load the config {config_lib.config_argument(argv)}: {lines[-1]}'
    return ' '.join(lines)
  if isinstance(error, OSError):  # the config file could not be loaded
    detail = str(error).strip().splitlines()[-1].strip()
    return (f'could not load the --config file: {detail}; pass one of configs/*.py, '
            'e.g. --config configs/default.py')
  if isinstance(error, (AttributeError, KeyError, TypeError, ValueError)):
    return config_lib.override_error(error, argv)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config (a missing file, an unknown or
  misplaced field, a value of the wrong type) as one line and exit status 2."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('method')  # a config file that failed to load raises here
    return rest
  except Exception as e:  # noqa: BLE001 -- _flag_error picks the ones it words
    message = None if _verbose(argv) else _flag_error(e, argv)
    if message is None:
      raise
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


# What to do about a system's OSError that reached main (the workdir checks and
# the writes of checkpoints and event files word theirs already).
_OS_ERROR_FIXES = {
    errno.ENOSPC: 'free space on that disk or pass a --workdir on another one, then '
                  'rerun the same command',
    errno.EDQUOT: 'free space in your quota or pass a --workdir on another disk, then '
                  'rerun the same command',
    errno.EACCES: 'make it readable/writable or pass another path',
    errno.EPERM: 'make it readable/writable or pass another path',
    errno.EROFS: 'pass a --workdir on a writable file system',
}


def _one_line(error: Exception) -> str:
  """`error` as one line: its own words, or an OSError's reason, path and fix."""
  if isinstance(error, OSError) and error.errno is not None and error.strerror:
    where = error.filename or f'while running in --workdir {FLAGS.workdir}'
    fix = _OS_ERROR_FIXES.get(error.errno, 'check that path and rerun')
    return f'{error.strerror} ({where}); {fix}'
  return ' '.join(line.strip() for line in str(error).splitlines() if line.strip())


def _train() -> tuple[int, str] | None:
  """Trains; an error the user can act on -> (exit status, its one line).
  Returning (rather than exiting in the handler) drops the error's traceback,
  and with it the frames holding tf.data iterators, while Python still runs:
  TensorFlow then has nothing to complain about at interpreter exit."""
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, workdir_lib.WorkdirError,
          checkpointing.UnreadableCheckpointError) as e:
    if FLAGS.verbose:
      raise
    return 2, _one_line(e)  # the input is wrong: as a bad flag
  except (train.NonFiniteLossError, OSError) as e:
    if FLAGS.verbose:
      raise
    return 1, _one_line(e)  # the run failed
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1 or FLAGS.verbose:
      raise
    # Another process died: say so in one line and leave at once, since JAX's
    # exit handlers would wait for it at the shutdown barrier, then abort.
    first = str(e).strip().splitlines()[0][:300]
    print(f'error: process {jax.process_index()} lost the other processes of this run '
          f'(one stopped or crashed; see its log): {first}. The checkpoints are kept: '
          'restart every process to resume.', file=sys.stderr, flush=True)
    os._exit(1)
  return None


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraryLogs())
  if not FLAGS.verbose:
    sys.unraisablehook = checkpointing.quiet_failed_restores(sys.unraisablehook)
  input_pipeline.hide_accelerators_from_tf()  # before TF starts
  one_xla_thread = runtime.configure_cpu_process(  # before JAX starts its threads
      FLAGS.config.model.get('conv_impl', 'xla'), FLAGS.keep_freed_host_memory)
  initialize_distributed()
  runtime.enable_compilation_cache(FLAGS.compilation_cache_dir)
  logging.info('process %d of %d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  if one_xla_thread:
    logging.info('XLA:CPU gets one intra-op thread; oneDNN convolutions use the cores')
    if jax.device_count() != 1 or not onednn_conv.available():
      logging.warning('XLA:CPU was given one thread for oneDNN convolutions, but XLA runs '
                      'them here; set NPROC to the number of cores to undo that')
  failure = _train()
  if failure is not None:
    code, message = failure
    gc.collect()  # iterators left in reference cycles go now, not at exit
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
