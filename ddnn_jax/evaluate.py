"""Per-depth evaluation: the eval step, the means over a split, and a CLI.

The library: `make_eval_step` (one jitted program scoring every depth on a
batch), `evaluate_depths` (masked means over a whole split, clu metrics merged
batch by batch: '<depth tag>/<metric>' and 'count'), `make_forward` (one
depth's inference), `restore` (a run's variables) and `run` (all of it for a
workdir, then `reporting.report`). The trainer calls the first two.

  python -m ddnn_jax.evaluate --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
      [--step N] [--split NAME] [--root PATH] [--batch_size N] [--recalibrate_bn N]

restores the latest (or the given) checkpoint of a run and evaluates every
depth on a whole split: top-1, top-5, loss, KL to the full net, top-1 agreement
with the full net, parameters, GFLOPs and measured images/s on this machine. It
writes `eval_<split>.json`, `eval_<split>.md` and `accuracy_vs_flops.png` into
the workdir and prints the table. The config is the run's saved config.json
unless --config names a file; --config.FIELD=VALUE overrides either. `--root`
scores another ImageFolder root with the same class folders (held-out data the
run never saw). `--recalibrate_bn N` re-estimates each depth's BatchNorm
statistics on N training batches first. A user error is one line and exit 2.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from clu import metrics as clu_metrics
from ml_collections import config_flags

from ddnn_jax import config_lib, models, runtime
from ddnn_jax import mesh as mesh_lib
from ddnn_jax import methods as methods_lib

METRICS = ('top1', 'top5', 'loss', 'kl_to_full', 'agreement')

# One depth's metrics: each a masked mean over the examples seen, merged batch
# by batch. `create` (not a class body) because clu reads the annotations as
# classes, which `from __future__ import annotations` would turn into strings.
DepthMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in METRICS})


def make_eval_step(model: models.DDNNResNet, depths: Sequence[models.Depth],
                   mesh: jax.sharding.Mesh, per_depth_variables: bool = False):
  """Jitted: (variables, batch) -> {depth tag: DepthMetrics of the batch}.

  With `per_depth_variables`, `variables` is a tuple with one set per depth
  (for example BatchNorm statistics re-calibrated for each) and every depth
  runs its own forward; otherwise one forward shares the common prefix.
  """
  depths = tuple(depths)
  full = depths.index(model.full_depth)

  def forward(variables, images):
    if per_depth_variables:
      return [model.apply(v, images, (d,), False, method=model.forward_depths)[0]
              for v, d in zip(variables, depths, strict=True)]
    return model.apply(variables, images, depths, False, method=model.forward_depths)

  def step(variables, batch):
    outputs = forward(variables, batch['image'])
    labels = batch['label']
    teacher = outputs[full].logits
    teacher_log_probs = jax.nn.log_softmax(teacher)
    result = {}
    for depth, output in zip(depths, outputs):
      logits = output.logits
      k = min(5, logits.shape[-1])
      top_k = jax.lax.top_k(logits, k)[1]
      per_example = {
          'top1': (jnp.argmax(logits, -1) == labels),
          'top5': jnp.any(top_k == labels[:, None], axis=-1),
          'loss': optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels),
          'kl_to_full': optax.losses.kl_divergence_with_log_targets(
              jax.nn.log_softmax(logits), teacher_log_probs),
          'agreement': jnp.argmax(logits, -1) == jnp.argmax(teacher, -1),
      }
      result[models.member_name(model, depth)] = DepthMetrics.single_from_model_output(
          **{name: v.astype(jnp.float32) for name, v in per_example.items()},
          mask=batch['mask'])  # the padding of a split's last batch does not count
    return result

  return jax.jit(step, in_shardings=(mesh_lib.replicated(mesh),
                                     mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def evaluate_depths(model: models.DDNNResNet, variables, batches: Iterable[dict],
                    depths: Sequence[models.Depth], mesh: jax.sharding.Mesh,
                    eval_step=None) -> dict[str, float]:
  """Mean of every metric per depth over all (masked) examples of `batches`.

  Keys are '<depth tag>/<metric>' plus 'count', the number of examples seen.
  """
  eval_step = eval_step or make_eval_step(model, depths, mesh)
  totals = None
  for local in batches:
    # Each batch's float32 sums, added up on the host in float64: a long
    # split loses no precision, and every process reads its replicated copy.
    batch = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(
        eval_step(variables, mesh_lib.global_batch(local, mesh))))
    totals = batch if totals is None else {
        tag: totals[tag].merge(batch[tag]) for tag in totals}
  count = float(next(iter(totals.values())).top1.count) if totals else 0.0
  if not count:
    raise ValueError('the evaluation split is empty')
  means = {f'{tag}/{name}': float(value) for tag, collection in totals.items()
           for name, value in collection.compute().items()}
  return dict(sorted({'count': count, **means}.items()))  # in the order callers log them


def restore(workdir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            step: int | None = None,
            root: str | None = None) -> tuple[methods_lib.Method, dict, int]:
  """(method, model variables, step) of the run's latest (or `step`)
  checkpoint, replicated on `mesh`. Only the variables are read (a checkpoint
  of the legacy one-item layout is read whole, optimizer state included).
  `root`: the image folder to be scored, when it is not the training root."""
  from ddnn_jax import checkpointing, experiment, input_pipeline

  info = input_pipeline.get_info(config.data, root)
  # A released model scoring another root has no training split at hand;
  # evaluation does not use the schedule that its size sets.
  train_examples = info.num_examples.get(config.data.train_split, config.batch_size)
  exp = experiment.build(config, mesh, experiment.DataSpec(info.num_classes, info.image_size,
                                                           train_examples))
  manager = checkpointing.create_manager(workdir, async_save=False)

  def read(step):
    variables = checkpointing.restore_variables(manager, exp.abstract_variables, step)
    if variables is None:  # the legacy layout holds the optimizer state too
      variables = checkpointing.restore(manager, exp.abstract_state, step).variables
    return variables

  variables, step, _ = checkpointing.restore_readable(manager, read, step)
  return exp.method, variables, step


def recalibrate_on_training_data(config: ml_collections.ConfigDict, model, variables,
                                 depths: Sequence[models.Depth], mesh: jax.sharding.Mesh,
                                 batch_size: int, num_batches: int) -> tuple[dict, ...]:
  """One copy of `variables` per depth with that depth's BatchNorm statistics
  re-estimated on the first `num_batches` training batches of `config`'s data
  (seed config.seed: the same batches every time)."""
  from ddnn_jax import bn_calibration, input_pipeline

  return bn_calibration.recalibrate_depths(
      model, variables, depths,
      lambda: input_pipeline.train_batches(config.data, global_batch_size=batch_size,
                                           seed=config.seed),
      mesh, num_batches)


def run(workdir: str, config: ml_collections.ConfigDict, *, step: int | None = None,
        split: str | None = None, root: str | None = None,
        batch_size: int | None = None, recalibrate_bn: int = 0) -> list[dict]:
  """Evaluates every depth of the checkpoint; writes json, md and png to workdir.

  `recalibrate_bn` > 0: first re-estimate each depth's BatchNorm statistics on
  that many training batches (ddnn_jax.bn_calibration); the outputs then carry
  a `_bnrecal<N>` suffix so they do not replace the plain evaluation.
  """
  # Here: reporting imports this module, and the input pipeline loads TensorFlow.
  from ddnn_jax import input_pipeline, reporting

  mesh = mesh_lib.create_mesh()
  batch_size = batch_size or config.eval_batch_size
  mesh_lib.check_batch_size(batch_size, mesh, 'eval_batch_size')
  method, variables, step = restore(workdir, config, mesh, step, root)
  model, depths = method.model, method.depths
  split = split or config.data.eval_split

  def batches():
    return input_pipeline.eval_batches(config.data, split=split, root=root,
                                       global_batch_size=batch_size)

  label = split if root is None else f'{os.path.basename(os.path.normpath(root))}_{split}'
  if recalibrate_bn:
    recalibrated = recalibrate_on_training_data(config, model, variables, depths, mesh,
                                                batch_size, recalibrate_bn)
    eval_step = make_eval_step(model, depths, mesh, per_depth_variables=True)
    metrics = evaluate_depths(model, recalibrated, batches(), depths, mesh, eval_step)
    label = f'{label}_bnrecal{recalibrate_bn}'
  else:
    metrics = evaluate_depths(model, variables, batches(), depths, mesh)
  return reporting.report(workdir, config, model, variables, depths, metrics,
                          step=step, label=label, root=root,
                          sample_images=next(iter(batches()))['image'], mesh=mesh,
                          extra={'bn_recalibration_batches': recalibrate_bn})


# ---------------------------------------------------------------- command line


def _workdir(argv: list[str]) -> str | None:
  """--workdir of `argv`, read before the other flags are defined."""
  values = flags.FlagValues()
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(argv, known_only=True)
  return values.workdir


def define_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command line's flags on `values` for `argv`.

  Called when the command line is parsed, not at import: ddnn_jax.main and
  ddnn_jax.aot define --config too. Without --config in `argv` the config is
  the saved config.json of its --workdir, and --config.FIELD=VALUE overrides
  that as it would a config file.
  """
  argv = list(argv)
  flags.DEFINE_string('workdir', None, 'The run directory.', flag_values=values)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                       lower_bound=0, flag_values=values)
  flags.DEFINE_string('split', None, 'Split to score (default: config.data.eval_split).',
                      flag_values=values)
  flags.DEFINE_string('root', None, 'Another ImageFolder root with the same class folders.',
                      flag_values=values)
  flags.DEFINE_integer('batch_size', None, 'Global eval batch size (default: '
                       'config.eval_batch_size).', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('recalibrate_bn', 0, "Re-estimate each depth's BatchNorm statistics "
                       'on this many training batches first (outputs get a _bnrecalN '
                       'suffix); 0: no.', lower_bound=0, flag_values=values)
  flags.mark_flag_as_required('workdir', flag_values=values)
  define_config_flag(argv, values)


def define_config_flag(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """--config on `values`: a config file, or by default the saved config.json
  of `argv`'s --workdir, which --config.FIELD=VALUE overrides as it would a
  file. Every entry point that reads a run (evaluate, export, search) uses it."""
  argv = list(argv)
  help_string = ("Config file ('file.py' or 'file.py:arg'); default: the run's saved "
                 'config.json. --config.FIELD=VALUE overrides either.')
  workdir = _workdir(argv)
  if workdir is None or any(re.match(r'--?config(=|$)', a) for a in argv[1:]):
    config_flags.DEFINE_config_file('config', None, help_string, flag_values=values,
                                    sys_argv=argv)
  else:
    config_flags.DEFINE_config_dict('config', config_lib.load_saved(workdir), help_string,
                                    flag_values=values, sys_argv=argv)


def _saved_config(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """The config.json that overrides apply to when no --config is given."""
  workdir = _workdir(list(argv))
  if workdir is None or config_lib.config_argument(argv) is not None:
    return None
  try:
    return config_lib.load_saved(workdir)
  except (OSError, ValueError):
    return None


def exit_with_error(message: str) -> NoReturn:
  """One line on stderr and exit status 2, as ddnn_jax.main's flag errors."""
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(2)


def run_or_exit(fn, *args, **kwargs):
  """`fn(*args, **kwargs)` for a command line (evaluate, export, search,
  release): TensorFlow sees no accelerator, and a user error (a bad value, a
  missing file, an unreadable checkpoint) is one line `error: ...` and exit
  status 2, printed once the traceback's frames are gone."""
  from ddnn_jax import checkpointing, input_pipeline

  input_pipeline.hide_accelerators_from_tf()  # before TF starts
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, KeyError,
          checkpointing.UnreadableCheckpointError) as e:
    message = str(e)
  gc.collect()  # iterators left in reference cycles go now, not at exit
  exit_with_error(message)


def parse_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS,
                define=define_flags) -> list[str]:
  """app.run's flags parser: defines the flags on `values` and parses `argv`.

  A bad flag, config file or override, or a workdir without config.json, is
  one line `error: ...` and exit status 2. `define(argv, values)` defines the
  flags (default: evaluate's; ddnn_jax.export and ddnn_jax.search pass theirs).
  """
  argv = list(argv)
  try:
    define(argv, values)
    rest = values(argv)
    values.config.get('method')  # a config file that failed to load raises here
  except FileNotFoundError as e:  # the workdir's config.json
    exit_with_error(str(e))
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    exit_with_error(config_lib.describe_error(e, argv, _saved_config(argv)))
  if rest[1:]:
    exit_with_error(f'unexpected arguments {rest[1:]}; every option is a --flag')
  return rest


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """app.run's main: evaluates the run that the parsed `values` name."""
  del argv  # parse_flags let no positional argument through
  run_or_exit(run, values.workdir, values.config, step=values.step, split=values.split,
              root=values.root, batch_size=values.batch_size,
              recalibrate_bn=values.recalibrate_bn)


def _main_owning_the_process(argv: Sequence[str]) -> None:
  # The table is the output: Orbax's and TFDS's INFO logs (app.run turns them
  # on) only when --verbosity asks for them.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # The CPU process settings of training (runtime.py), made before JAX starts
  # its CPU client, so that the img/s column compares with training's.
  runtime.configure_xla_flags()
  runtime.configure_cpu_process(flags.FLAGS.config.model.get('conv_impl', 'xla'))
  from ddnn_jax import checkpointing
  sys.unraisablehook = checkpointing.quiet_failed_restores(sys.unraisablehook)
  main(argv)


if __name__ == '__main__':
  app.run(_main_owning_the_process, flags_parser=parse_flags)
