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
import time
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


def measure_throughput(model: models.DDNNResNet, variables, depth: models.Depth,
                       images: np.ndarray, mesh: jax.sharding.Mesh,
                       min_seconds: float = 1.0) -> float:
  """Images/s of the jitted inference forward of one depth on this machine."""
  forward = make_forward(model, depth, mesh)
  images = mesh_lib.global_batch({'image': images}, mesh)['image']
  forward(variables, images).block_until_ready()  # compile and warm up
  runs, start = 0, time.perf_counter()
  while runs < 2 or time.perf_counter() - start < min_seconds:
    forward(variables, images).block_until_ready()
    runs += 1
  return runs * images.shape[0] / (time.perf_counter() - start)


def format_table(rows: Sequence[dict]) -> str:
  lines = ['| depth | top-1 | top-5 | loss | KL to full | agreement | params | GFLOPs | img/s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f'| {",".join(map(str, r["depth"]))} | {100 * r["top1"]:.2f} | '
        f'{100 * r["top5"]:.2f} | {r["loss"]:.4f} | {r["kl_to_full"]:.4f} | '
        f'{100 * r["agreement"]:.2f} | {r["params"]:,} | {r["flops"] / 1e9:.4g} | '
        f'{r["images_per_second"]:.0f} |')
  return '\n'.join(lines)


def plot_accuracy_vs_flops(rows: Sequence[dict], path: str, title: str) -> None:
  import matplotlib  # noqa: PLC0415 -- only the CLI draws
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5, 3.5))
  gflops = [r['flops'] / 1e9 for r in rows]
  top1 = [100 * r['top1'] for r in rows]
  ax.plot(gflops, top1, 'o-')
  for r, x, y in zip(rows, gflops, top1):
    ax.annotate(','.join(map(str, r['depth'])), (x, y), textcoords='offset points',
                xytext=(4, -10), fontsize=8)
  ax.set_xlabel('GFLOPs per image (XLA cost analysis)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  from ddnn_jax import bn_calibration, input_pipeline  # noqa: PLC0415

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
  return report(workdir, config, model, variables, depths, metrics,
                step=step, label=label, root=root,
                sample_images=next(iter(batches()))['image'], mesh=mesh,
                extra={'bn_recalibration_batches': recalibrate_bn})


def report(workdir: str, config: ml_collections.ConfigDict, model: models.DDNNResNet,
           variables, depths: Sequence[models.Depth], metrics: dict[str, float], *,
           step: int, label: str, sample_images: np.ndarray, mesh: jax.sharding.Mesh,
           root: str | None = None, extra: dict | None = None) -> list[dict]:
  """Adds params, GFLOPs and img/s to `metrics`; writes json, md and png; prints."""
  from ddnn_jax import costs  # noqa: PLC0415

  host_variables = jax.device_get(variables)
  image_size = sample_images.shape[1]
  rows = []
  for depth in depths:
    tag = models.depth_tag(depth)
    params = models.count_params(models.extract_subnet(host_variables, depth)['params'])
    rows.append({
        'depth': list(depth), 'params': params,
        'flops': costs.compiled_flops(model, variables, depth, image_size),
        'images_per_second': measure_throughput(model, variables, depth, sample_images,
                                                mesh),
        **{name: metrics[f'{tag}/{name}'] for name in METRICS},
    })
  result = {'workdir': workdir, 'step': step, 'split': label, 'root': root,
            'examples': int(metrics['count']), 'model': config.model.name,
            'method': config.method, **(extra or {}), 'depths': rows}
  title = (f'{config.model.name} ({config.method}), step {step}, split {label}, '
           f'{result["examples"]} examples')
  table = format_table(rows)
  if jax.process_index() == 0:
    out = epath.Path(workdir)
    (out / f'eval_{label}.json').write_text(json.dumps(result, indent=2))
    (out / f'eval_{label}.md').write_text(f'{title}\n\n{table}\n')
    plot_accuracy_vs_flops(rows, str(out / 'accuracy_vs_flops.png'), title)
  print(title)
  print(table)
  return rows


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
