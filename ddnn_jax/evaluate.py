"""Per-depth evaluation: the library function the trainer calls, and a CLI.

  python -m ddnn_jax.evaluate --workdir DIR [--config FILE] [--step N]
      [--split NAME] [--root PATH] [--recalibrate-bn N]

restores the latest (or the given) checkpoint of a run and evaluates every
depth on a whole split: top-1, top-5, loss, KL to the full net, top-1 agreement
with the full net, parameters, GFLOPs and measured images/s on this machine. It
writes `eval_<split>.json`, `eval_<split>.md` and `accuracy_vs_flops.png` into
the workdir and prints the table. `--root` scores another ImageFolder root with
the same class folders (held-out data the run never saw). `--recalibrate-bn N`
re-estimates each depth's BatchNorm statistics on N training batches first.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from etils import epath

from ddnn_jax import mesh as mesh_lib
from ddnn_jax import methods as methods_lib
from ddnn_jax import models, runtime

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
      result[models.depth_tag(depth)] = DepthMetrics.single_from_model_output(
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


def make_forward(model: models.DDNNResNet, depth: models.Depth, mesh: jax.sharding.Mesh):
  """Jitted inference of one depth: (variables, images) -> logits, batch-sharded."""
  return jax.jit(lambda v, x: model.apply(v, x, depth),
                 in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.batch_sharding(mesh))


def apply_overrides(config: ml_collections.ConfigDict, items: Sequence[str]) -> None:
  """Sets 'a.b=VALUE' items on `config` (VALUE a Python literal, else a string)."""
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r} is not FIELD=VALUE (e.g. model.width_multiplier=0.5)')
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    try:
      target[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      target[leaf] = value


def load_config(workdir: str, config_file: str | None = None) -> ml_collections.ConfigDict:
  """`config_file` ('path.py' or 'path.py:arg'), else the run's saved config.json."""
  if config_file:
    path, _, arg = config_file.partition(':')
    if not os.path.exists(path):
      raise FileNotFoundError(f'config file {path} does not exist')
    spec = importlib.util.spec_from_file_location('_ddnn_config', path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist; pass the workdir of a training run or --config FILE')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore(workdir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            step: int | None = None) -> tuple[methods_lib.Method, dict, int]:
  """(method, model variables, step) of the run's latest (or `step`)
  checkpoint, replicated on `mesh`. Only the variables are read (a checkpoint
  of the legacy one-item layout is read whole, optimizer state included)."""
  from ddnn_jax import checkpointing, experiment, input_pipeline  # noqa: PLC0415

  info = input_pipeline.get_info(config.data)
  exp = experiment.build(config, mesh, experiment.DataSpec.from_info(info, config))
  manager = checkpointing.create_manager(workdir, async_save=False)
  step = checkpointing.resolve_step(manager, step)
  variables = checkpointing.restore_variables(manager, exp.abstract_variables, step)
  if variables is None:  # the legacy layout holds the optimizer state too
    variables = checkpointing.restore(manager, exp.abstract_state, step).variables
  return exp.method, variables, step


def run(workdir: str, config: ml_collections.ConfigDict, *, step: int | None = None,
        split: str | None = None, root: str | None = None,
        batch_size: int | None = None, recalibrate_bn: int = 0) -> list[dict]:
  """Evaluates every depth of the checkpoint; writes json, md and png to workdir.

  `recalibrate_bn` > 0: first re-estimate each depth's BatchNorm statistics on
  that many training batches (ddnn_jax.bn_calibration); the outputs then carry
  a `_bnrecal<N>` suffix so they do not replace the plain evaluation.
  """
  # Here: reporting imports this module, and the input pipeline loads TensorFlow.
  from ddnn_jax import bn_calibration, input_pipeline, reporting  # noqa: PLC0415

  mesh = mesh_lib.create_mesh()
  batch_size = batch_size or config.eval_batch_size
  mesh_lib.check_batch_size(batch_size, mesh, 'eval_batch_size')
  method, variables, step = restore(workdir, config, mesh, step)
  model, depths = method.model, method.depths
  split = split or config.data.eval_split

  def batches():
    return input_pipeline.eval_batches(config.data, split=split, root=root,
                                       global_batch_size=batch_size)

  label = split if root is None else f'{os.path.basename(os.path.normpath(root))}_{split}'
  if recalibrate_bn:
    recalibrated = bn_calibration.recalibrate_depths(
        model, variables, depths,
        lambda: input_pipeline.train_batches(config.data, global_batch_size=batch_size,
                                             seed=config.seed),
        mesh, recalibrate_bn)
    eval_step = make_eval_step(model, depths, mesh, per_depth_variables=True)
    metrics = evaluate_depths(model, recalibrated, batches(), depths, mesh, eval_step)
    label = f'{label}_bnrecal{recalibrate_bn}'
  else:
    metrics = evaluate_depths(model, variables, batches(), depths, mesh)
  return reporting.report(workdir, config, model, variables, depths, metrics,
                          step=step, label=label, root=root,
                          sample_images=next(iter(batches()))['image'], mesh=mesh,
                          extra={'bn_recalibration_batches': recalibrate_bn})


def main(argv: Sequence[str] | None = None, process_settings: bool = False) -> int:
  """The CLI; `process_settings` (the `python -m` entry) first makes the CPU
  process settings of training (runtime.py), so throughput is comparable."""
  parser = argparse.ArgumentParser(prog='python -m ddnn_jax.evaluate',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the run directory')
  parser.add_argument('--config', help="config file ('file.py' or 'file.py:arg'); "
                      'default: the run\'s saved config.json')
  parser.add_argument('--step', type=int, help='checkpoint step (default: latest)')
  parser.add_argument('--split', help='split to score (default: the eval split)')
  parser.add_argument('--root', help='another ImageFolder root with the same classes')
  parser.add_argument('--batch-size', type=int, help='global eval batch size')
  parser.add_argument('--recalibrate-bn', type=int, default=0, metavar='N',
                      help='re-estimate each depth\'s BatchNorm statistics on N training '
                      'batches first (outputs get a _bnrecalN suffix)')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = load_config(args.workdir, args.config)
    if process_settings:  # before JAX starts its CPU client
      runtime.configure_xla_flags()
      runtime.configure_cpu_process(config.model.get('conv_impl', 'xla'))
    if args.recalibrate_bn < 0:
      raise ValueError(f'--recalibrate-bn must be >= 0, got {args.recalibrate_bn}')
    run(args.workdir, config, step=args.step, split=args.split, root=args.root,
        batch_size=args.batch_size, recalibrate_bn=args.recalibrate_bn)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(process_settings=True))
