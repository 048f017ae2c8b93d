"""Release a trained run: its final model variables and a config that needs no
training data, as a run directory that `ddnn_jax.evaluate` scores as it is.

  python -m ddnn_jax.release --workdir RUN --out DIR [--recalibrate_bn N] [--step S]

DIR holds config.json and checkpoints/<step>/variables: the parameters and
BatchNorm statistics, no optimizer state (a CIFAR ResNet-20 at width 0.5 is
about 0.3 MB). With `--recalibrate_bn N` each depth's BatchNorm statistics are
re-estimated on N training batches, exactly as `evaluate --recalibrate_bn N`
does, and stored per depth: a run with shared norm layers is released with
`model.bn_mode = 'private_stats'` (one set of statistics per depth, the scales
and biases shared), a run with per-depth norm layers keeps its mode and gets
each depth's own statistics re-estimated; either way a plain evaluation gives
the re-calibrated numbers. The config
drops the data paths (data.root, data.data_dir) and records the training
root's class folders (data.class_names), so

  python -m ddnn_jax.evaluate --workdir DIR --config.data.root=TRAIN_ROOT  # validation
  python -m ddnn_jax.evaluate --workdir DIR --root OTHER_ROOT --split test

score it on the held-out validation split of the training root, or on any
other image folder with the same class folders. DIR/release.json records the
source run, the step, the re-calibration, and the released model's validation
top-1 per depth next to the source run's (they must agree).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from flax import traverse_util

from ddnn_jax import any_depth, config_lib, models, runtime
from ddnn_jax import mesh as mesh_lib

RELEASE_FILE = 'release.json'


def per_depth_statistics(target_stats: dict, recalibrated: Sequence[dict],
                         depths: Sequence[models.Depth]) -> dict:
  """The batch_stats tree `target_stats` of a per-depth BN model, filled from
  `recalibrated[i]['batch_stats']` for `depths[i]`: the norm `<name>_<tag>`
  takes the statistics of `<name>` (a 'shared' model's tree) or of itself
  (a tree of the same per-depth layout)."""
  tags = {models.depth_tag(d): i for i, d in enumerate(depths)}
  sources = [traverse_util.flatten_dict(v['batch_stats']) for v in recalibrated]
  filled = {}
  for path in traverse_util.flatten_dict(target_stats):
    module = path[-2]
    tag = next((t for t in tags if module.endswith(f'_{t}')), None)
    if tag is None:
      raise ValueError(f'BatchNorm {"/".join(path)} belongs to no released depth')
    source = sources[tags[tag]]
    filled[path] = source[path] if path in source else source[
        (*path[:-2], module[:-len(tag) - 1], path[-1])]
  return traverse_util.unflatten_dict(filled)


def released_config(config: ml_collections.ConfigDict, class_names: Sequence[str] | None,
                    per_depth_bn: bool) -> ml_collections.ConfigDict:
  """`config` without data paths, with the class folders, in the BN mode of
  the released variables."""
  config = copy.deepcopy(config)
  # Empty, not None: config.json keeps no type for a None, and the user sets
  # them again with --config.data.root=... on evaluate's command line.
  config.data.root = ''
  config.data.data_dir = ''
  if class_names is not None and config.data.name == 'image_folder':
    config.data.class_names = tuple(class_names)
  if per_depth_bn:
    config.model.bn_mode = 'private_stats'
  any_depth.switch_off(config)  # a release trains nothing
  return config


def release(workdir: str, out: str, *, recalibrate_bn: int = 0, step: int | None = None,
            batch_size: int | None = None) -> dict:
  """Writes the release of `workdir` to `out`; returns its release.json."""
  from ddnn_jax import (  # noqa: PLC0415 -- TensorFlow loads with the pipeline
      checkpointing,
      evaluate,
      experiment,
      input_pipeline,
  )
  from ddnn_jax import workdir as workdir_lib  # noqa: PLC0415

  if epath.Path(out).exists() and any(epath.Path(out).iterdir()):
    raise ValueError(f'--out {out} is not empty; pass a new folder')
  config = config_lib.load_saved(workdir)
  mesh = mesh_lib.create_mesh()
  batch_size = batch_size or config.eval_batch_size
  method, variables, step = evaluate.restore(workdir, config, mesh, step)
  model, depths = method.model, method.depths
  info = input_pipeline.get_info(config.data)
  per_depth_bn = bool(recalibrate_bn) and len(depths) > 1
  new_config = released_config(config, info.class_names,
                               per_depth_bn and config.model.bn_mode == 'shared')
  if per_depth_bn:
    recalibrated = evaluate.recalibrate_on_training_data(
        config, model, variables, depths, mesh, batch_size, recalibrate_bn)
    target_stats = variables['batch_stats']  # per-depth norms: each depth's own
    if config.model.bn_mode == 'shared':  # into the 'private_stats' layout
      target = experiment.build(new_config, mesh, experiment.DataSpec.from_info(
          info, config)).abstract_variables
      if jax.tree.structure(target['params']) != jax.tree.structure(variables['params']):
        raise ValueError('the per-depth BatchNorm layout changes the parameters of '
                         f'{config.model.name}; release it without --recalibrate_bn')
      target_stats = target['batch_stats']
    variables = {'params': variables['params'], 'batch_stats': per_depth_statistics(
        target_stats, recalibrated, depths)}
  elif recalibrate_bn:  # one net: the statistics of its own batches again
    (variables,) = evaluate.recalibrate_on_training_data(
        config, model, variables, depths, mesh, batch_size, recalibrate_bn)
  variables = jax.device_get(variables)
  workdir_lib.save_config(new_config, out)
  manager = checkpointing.create_manager(out, keep=1, async_save=False)
  checkpointing.save_variables(manager, step, variables)
  manager.close()
  record = {'source': os.path.basename(os.path.normpath(workdir)), 'step': step,
            'recalibrate_bn': recalibrate_bn, 'recalibration_batch_size': batch_size,
            'bn_mode': new_config.model.bn_mode,
            'class_names': list(info.class_names or ()),
            'params': sum(x.size for x in jax.tree.leaves(variables['params']))}
  # The release scored as users will score it (on the training root's
  # validation split; in a copy, which keeps the report files out of `out`),
  # next to the source run's own numbers.
  scored = copy.deepcopy(new_config)
  scored.data.root, scored.data.data_dir = config.data.root, config.data.data_dir
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copytree(out, os.path.join(tmp, 'run'))
    rows = evaluate.run(os.path.join(tmp, 'run'), scored, batch_size=batch_size)
  record['top1'] = {models.depth_tag(r['depth']): r['top1'] for r in rows}
  suffix = f'_bnrecal{recalibrate_bn}' if recalibrate_bn else ''
  source = epath.Path(workdir) / f'eval_{config.data.eval_split}{suffix}.json'
  if source.exists():
    record['source_top1'] = {models.depth_tag(r['depth']): r['top1']
                             for r in json.loads(source.read_text())['depths']}
  (epath.Path(out) / RELEASE_FILE).write_text(json.dumps(record, indent=2) + '\n')
  return record


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined when it runs, not at import, so that
  another entry point (ddnn_jax.export) can import this module."""
  flags.DEFINE_string('workdir', None, 'The trained run to release.')
  flags.DEFINE_string('out', None, 'A new folder for the release.')
  flags.DEFINE_integer('recalibrate_bn', 0, "Store each depth's BatchNorm statistics "
                       're-estimated on this many training batches (0: as trained).',
                       lower_bound=0)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                       lower_bound=0)
  flags.DEFINE_integer('batch_size', None, 'Batch size of the re-calibration and the '
                       'check (default: config.eval_batch_size).', lower_bound=1)
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv: Sequence[str]) -> None:
  if argv[1:]:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  from ddnn_jax import evaluate  # noqa: PLC0415

  runtime.configure_xla_flags()
  record = evaluate.run_or_exit(release, FLAGS.workdir, FLAGS.out,
                                recalibrate_bn=FLAGS.recalibrate_bn, step=FLAGS.step,
                                batch_size=FLAGS.batch_size)
  logging.info('released %s', record)
  print(json.dumps(record, indent=2))


if __name__ == '__main__':
  define_flags()
  app.run(main)
