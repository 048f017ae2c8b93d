"""Entry point: python -m ddnn_jax.main --config configs/default.py --workdir DIR.

Any config field can be overridden: --config.num_epochs=5 --config.model.bn_mode=private_stats,
or in the config argument: --config configs/default.py:smoke,seed=3 (configs/base.py).
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddnn_jax import runtime

runtime.configure_xla_flags()

import jax  # noqa: E402  -- after XLA_FLAGS

from ddnn_jax import checkpointing, input_pipeline, onednn_conv, train  # noqa: E402

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


class _QuietCheckpointLogs(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config (a missing file, an unknown or
  misplaced field, a value of the wrong type) as one line and exit status 2."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('method')  # a config file that failed to load raises here
    return rest
  except flags.Error as e:
    message = str(e)
  except OSError as e:  # the config file could not be loaded
    detail = str(e).strip().splitlines()[-1].strip()
    message = (f'could not load the --config file: {detail}; pass one of configs/*.py, '
               'e.g. --config configs/default.py')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    message = (f'bad config override {e} among {overrides}: every field and its type is '
               'in configs/base.py (e.g. --config.optim.learning_rate, not '
               '--config.learning_rate)')
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
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
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, checkpointing.UnreadableCheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)  # the input is wrong: as a bad flag
    sys.exit(2)
  except train.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)  # the run failed
    sys.exit(1)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # Another process died: say so in one line and leave at once, since JAX's
    # exit handlers would wait for it at the shutdown barrier, then abort.
    first = str(e).strip().splitlines()[0][:300]
    print(f'error: process {jax.process_index()} lost the other processes of this run '
          f'(one stopped or crashed; see its log): {first}. The checkpoints are kept: '
          'restart every process to resume.', file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
