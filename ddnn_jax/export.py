"""Ship one depth of a trained run as a standalone model.

  python -m ddnn_jax.export --workdir DIR --depth 2,2,2 --format FORMAT --out PATH
      [--recalibrate_bn N] [--quantize int8] [--step S] [--batch_size B]
      [--platforms cpu,cuda] [--nocompare_full] [--config.FIELD=VALUE ...]

keeps the weights the depth uses (its standalone net, subnets.extract_subnet)
with that depth's BatchNorm statistics: the run's (a 'private_stats' release
has them per depth), or with `--recalibrate_bn N` re-estimated for the depth
on N training batches as `evaluate --recalibrate_bn N` does. FORMAT:

- `checkpoint`: a run directory of the standalone net (config.json with
  method 'individual' at that depth, Orbax `checkpoints/<step>/variables`):
  `checkpointing.read_variables(PATH)` loads into
  `models.create_model(name, classes, stage_sizes=depth)`, and
  `python -m ddnn_jax.evaluate --workdir PATH --config.data.root=...` scores it.
- `savedmodel`: a TensorFlow SavedModel. Signature `serving_default`: uint8
  images (batch, S, S, 3) -> {'logits': float32 (batch, classes)}; the
  normalisation (data.mean, data.std) is inside. `serving_float` takes float32
  pixels in the same 0..255 units (not normalised). Images must already be
  S x S (data.image_size): neither signature resizes or crops.
- `tflite`: a TFLite flatbuffer of the uint8 signature for one image (the
  batch-1 shape lets the converter fold BatchNorm), float32 weights; with
  `--quantize int8`, post-training full-integer quantisation calibrated on
  `--representative_images` training images (augmented as in training), and
  the top-1 drop against the float net on the validation split is reported.

SavedModel and TFLite go through `jax.experimental.jax2tf.convert`: in jax
0.10 it always serialises the program as StableHLO inside one TF
`XlaCallModule` op (the non-native TF-op lowering is gone); TensorFlow runs
that op, and the TFLite converter lowers it to TFLite builtins. The
SavedModel runs on the `--platforms` it was lowered for (default cpu).
The export computes in float32. PATH must be new; PATH/export.json (PATH.json
beside a .tflite) records the source, the sizes and the int8 accuracy. The
full net is written the same way to a temporary folder to report the export's
size next to its size (`--nocompare_full` skips that).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from ddnn_jax import deploy, evaluate, models, runtime, subnets
from ddnn_jax import mesh as mesh_lib

FORMATS = ('checkpoint', 'savedmodel', 'tflite')
QUANTIZATIONS = ('none', 'int8')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
RECORD_FILE = 'export.json'


def serving_function(net: deploy.Net, data: ml_collections.ConfigDict):
  """(variables, images in 0..255) -> logits of `net`, the normalisation inside."""
  return lambda variables, images: net.model.apply(variables,
                                                   deploy.normalise(images, data))


def tf_module(net: deploy.Net, data: ml_collections.ConfigDict,
              platforms: Sequence[str] = ('cpu',), batch: int | None = None):
  """A tf.Module holding `net`'s variables and the two serving functions
  (`serve`: uint8 images, `serve_float`: float32 pixels) for batches of
  `batch` images (None: any number)."""
  import tensorflow as tf  # noqa: PLC0415 -- TensorFlow only for the TF formats
  from jax.experimental import jax2tf  # noqa: PLC0415

  size = data.image_size
  module = tf.Module()
  module.net_variables = jax.tree.map(lambda x: tf.Variable(x, trainable=False),
                                      net.variables)
  converted = jax2tf.convert(serving_function(net, data), with_gradient=False,
                             polymorphic_shapes=[None, None if batch else f'(b, {size}, {size}, 3)'],
                             native_serialization_platforms=tuple(platforms))

  def signature(dtype):
    spec = tf.TensorSpec([batch, size, size, 3], dtype, name='images')
    return tf.function(lambda images: {'logits': converted(module.net_variables, images)},
                       input_signature=[spec], autograph=False)

  module.serve = signature(tf.uint8)
  module.serve_float = signature(tf.float32)
  return module


def write_checkpoint(run: deploy.Run, net: deploy.Net, out: str,
                     class_names: Sequence[str] | None) -> None:
  """`out` as a run directory of the standalone net of `net.depth`."""
  from ddnn_jax import checkpointing, release  # noqa: PLC0415
  from ddnn_jax import workdir as workdir_lib  # noqa: PLC0415

  config = release.released_config(run.config, class_names, per_depth_bn=False)
  config.model.bn_mode = 'shared'
  config.method = 'individual'
  config.individual_depth = net.depth
  config.depths = (net.depth,)
  workdir_lib.save_config(config, out)
  manager = checkpointing.create_manager(out, keep=1, async_save=False)
  checkpointing.save_variables(manager, run.step, net.variables)
  manager.close()


def write_savedmodel(net: deploy.Net, data: ml_collections.ConfigDict, out: str,
                     platforms: Sequence[str]) -> None:
  import tensorflow as tf  # noqa: PLC0415

  module = tf_module(net, data, platforms)
  tf.saved_model.save(module, out, signatures={'serving_default': module.serve,
                                               'serving_float': module.serve_float})


def write_tflite(net: deploy.Net, data: ml_collections.ConfigDict, out: str,
                 representative: np.ndarray | None = None) -> None:
  """The uint8 signature for one image as TFLite; int8 weights and
  activations when `representative` (uint8 images) is given. One image: a
  static shape lets the converter fold BatchNorm into the convolutions (with
  a free batch size every norm stays, behind dynamic broadcasts)."""
  import tensorflow as tf  # noqa: PLC0415

  module = tf_module(net, data, ('cpu',), batch=1)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  if representative is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  epath.Path(out).write_bytes(converter.convert())


def tflite_predictor(path: str):
  """images (uint8, batch first) -> logits with the TFLite interpreter, one
  image at a time: ai_edge_litert's when installed, else TensorFlow's
  (deprecated there)."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
  except ImportError:
    import tensorflow as tf  # noqa: PLC0415

    Interpreter = tf.lite.Interpreter  # noqa: N806
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # TF's deprecation notice
    interpreter = Interpreter(model_path=path)
  interpreter.allocate_tensors()
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

  def predict(images: np.ndarray) -> np.ndarray:
    logits = []
    for image in images:
      interpreter.set_tensor(source['index'], np.asarray(image[None], source['dtype']))
      interpreter.invoke()
      logits.append(np.array(interpreter.get_tensor(target['index'])[0]))
    return np.stack(logits)

  return predict


def size_on_disk(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def representative_images(config: ml_collections.ConfigDict, count: int,
                          batch_size: int) -> np.ndarray:
  """`count` training images as uint8 pixels, in the training order."""
  from ddnn_jax import input_pipeline  # noqa: PLC0415

  batches = input_pipeline.train_batches(config.data, global_batch_size=batch_size,
                                         seed=config.seed)
  images = []
  while sum(len(b) for b in images) < count:
    images.append(deploy.pixels(next(batches)['image'], config.data))
  return np.concatenate(images)[:count]


def validation_batches(config: ml_collections.ConfigDict, split: str | None,
                       batch_size: int, num_batches: int) -> Iterator[dict]:
  """The split's batches with uint8 pixels (the first `num_batches`; 0: all)."""
  from ddnn_jax import input_pipeline  # noqa: PLC0415

  batches = input_pipeline.eval_batches(config.data, split=split,
                                        global_batch_size=batch_size)
  for batch in itertools.islice(batches, num_batches or None):
    yield {**batch, 'image': deploy.pixels(batch['image'], config.data)}


def int8_accuracy(net: deploy.Net, config: ml_collections.ConfigDict, path: str, *,
                  split: str | None, batch_size: int, num_batches: int) -> dict:
  """Top-1 of the int8 TFLite model at `path` and of the float net on the
  same uint8 images of the validation split."""
  float_logits = jax.jit(serving_function(net, config.data))
  int8_logits = tflite_predictor(path)
  correct, count = {'float': 0, 'int8': 0}, 0
  for batch in validation_batches(config, split, batch_size, num_batches):
    mask, labels = batch['mask'], batch['label']
    for name, logits in (('float', float_logits(net.variables, batch['image'])),
                         ('int8', int8_logits(batch['image']))):
      correct[name] += int(np.sum((np.argmax(logits, -1) == labels) & mask))
    count += int(mask.sum())
  if not count:
    raise ValueError('the validation split is empty')
  top1 = {name: correct[name] / count for name in correct}
  return {'split': split or config.data.eval_split, 'examples': count,
          'top1_float': top1['float'], 'top1_int8': top1['int8'],
          'top1_drop': top1['float'] - top1['int8']}


def _class_names(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """An image folder's classes, recorded in an exported run directory."""
  if config.data.name != 'image_folder' or config.data.get('class_names'):
    return None
  from ddnn_jax import input_pipeline  # noqa: PLC0415

  try:
    return input_pipeline.get_info(config.data).class_names
  except (OSError, ValueError):  # the training root is not here: none recorded
    return None


def export(workdir: str, config: ml_collections.ConfigDict, *, depth: str | Sequence[int],
           fmt: str, out: str, recalibrate_bn: int = 0, quantize: str = 'none',
           step: int | None = None, batch_size: int | None = None,
           platforms: Sequence[str] = ('cpu',), num_representative: int = 100,
           split: str | None = None, eval_batches: int = 0,
           compare_full: bool = True) -> dict:
  """Writes depth `depth` of `workdir` to `out` in format `fmt`; returns the
  record (also written as export.json) with the sizes and int8 accuracy.
  `compare_full`: also write the full net in format `fmt` (to a temporary
  folder) to report the export's size next to the full net's."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
  if quantize not in QUANTIZATIONS:
    raise ValueError(f'unknown quantization {quantize!r}; choose one of '
                     f'{", ".join(QUANTIZATIONS)}')
  if quantize != 'none' and fmt != 'tflite':
    raise ValueError(f'--quantize {quantize} applies to --format tflite only')
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f'unknown platforms {unknown}; choose from {", ".join(PLATFORMS)}')
  if epath.Path(out).exists() and (epath.Path(out).is_file() or
                                   any(epath.Path(out).iterdir())):
    raise ValueError(f'--out {out} exists; pass a new path')
  if isinstance(depth, str):
    depth = models.parse_depth(depth)
  batch_size = batch_size or config.eval_batch_size
  mesh = mesh_lib.create_mesh()
  run = deploy.load_run(workdir, config, step)
  net = deploy.standalone(run, depth, any_statistics=recalibrate_bn > 0, dtype=jnp.float32)
  if recalibrate_bn:
    net = deploy.recalibrated(net, config, mesh, recalibrate_bn, batch_size)
  representative = (representative_images(config, num_representative, batch_size)
                    if quantize == 'int8' else None)

  def write(net: deploy.Net, out: str) -> int:
    if fmt == 'checkpoint':
      write_checkpoint(run, net, out, _class_names(config))
    elif fmt == 'savedmodel':
      write_savedmodel(net, config.data, out, platforms)
    else:
      write_tflite(net, config.data, out, representative)
    return size_on_disk(out)

  size = write(net, out)
  full = subnets.extract_subnet(run.variables, run.model.full_depth)
  full_size = None
  if compare_full:  # the full net written the same way, for its size alone
    with tempfile.TemporaryDirectory() as tmp:
      full_size = write(deploy.standalone(run, run.model.full_depth, dtype=jnp.float32),
                        os.path.join(tmp, 'full'))
  record = {
      'source': os.path.abspath(workdir), 'step': run.step, 'depth': list(net.depth),
      'format': fmt, 'quantize': quantize, 'recalibrate_bn': recalibrate_bn,
      'path': os.path.abspath(out), 'size_bytes': size, 'full_size_bytes': full_size,
      'params': models.count_params(net.variables['params']),
      'variable_bytes': deploy.variable_bytes(net.variables),
      'full_depth': list(run.model.full_depth),
      'full_params': models.count_params(full['params']),
      'full_variable_bytes': deploy.variable_bytes(full),
      'image_size': config.data.image_size, 'mean': list(config.data.mean),
      'std': list(config.data.std),
  }
  if fmt == 'savedmodel':
    record['platforms'] = list(platforms)
  if quantize == 'int8':
    record['int8'] = int8_accuracy(net, config, out, split=split, batch_size=batch_size,
                                   num_batches=eval_batches)
  record_path = (epath.Path(out) / RECORD_FILE if fmt != 'tflite'
                 else epath.Path(f'{out}.json'))
  record_path.write_text(json.dumps(record, indent=2) + '\n')
  return record


def summary(record: dict) -> str:
  """What a user reads: the export's size next to the full net's."""
  def kb(n):
    return f'{n / 1e3:,.1f} kB'

  depth, full = ','.join(map(str, record['depth'])), ','.join(map(str, record['full_depth']))
  kind = record['format'] + (' int8' if record['quantize'] == 'int8' else '')
  size = f'{kb(record["size_bytes"])} on disk'
  if record['full_size_bytes']:
    size += (f', the full net {full} as {kind}: {kb(record["full_size_bytes"])} '
             f'({record["size_bytes"] / record["full_size_bytes"]:.1%})')
  lines = [
      f'exported depth {depth} (step {record["step"]}) as {kind}: {record["path"]}',
      f'  {size}',
      f'  weights {record["params"]:,} params ({kb(record["variable_bytes"])} float32 with '
      f'BN statistics), the full net {record["full_params"]:,} '
      f'({kb(record["full_variable_bytes"])})']
  if 'int8' in record:
    q = record['int8']
    lines.append(f'  int8 top-1 {100 * q["top1_int8"]:.2f}% vs float {100 * q["top1_float"]:.2f}% '
                 f'(drop {100 * q["top1_drop"]:.2f} points) on {q["examples"]} '
                 f'{q["split"]} images')
  return '\n'.join(lines)


# ---------------------------------------------------------------- command line


def define_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags on `values` (evaluate.parse_flags calls it)."""
  flags.DEFINE_string('workdir', None, 'The trained (or released) run.', flag_values=values)
  flags.DEFINE_string('depth', None, 'The depth to ship, blocks per stage: 2,2,2.',
                      flag_values=values)
  flags.DEFINE_string('format', None, f'One of {", ".join(FORMATS)}.', flag_values=values)
  flags.DEFINE_string('out', None, 'A new path for the export.', flag_values=values)
  flags.DEFINE_integer('recalibrate_bn', 0, "Re-estimate the depth's BatchNorm statistics "
                       'on this many training batches (0: the run\'s).', lower_bound=0,
                       flag_values=values)
  flags.DEFINE_string('quantize', 'none', 'tflite: none or int8 (post-training, '
                      'full-integer).', flag_values=values)
  flags.DEFINE_integer('representative_images', 100, 'int8: training images that '
                       'calibrate the quantisation.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('eval_batches', 0, "int8: validation batches the accuracy drop is "
                       'measured on (0: the whole split).', lower_bound=0, flag_values=values)
  flags.DEFINE_string('split', None, 'int8: the split scored (default: '
                      'config.data.eval_split).', flag_values=values)
  flags.DEFINE_boolean('compare_full', True, 'Also write the full net the same way (in '
                       'a temporary folder) to report its size.', flag_values=values)
  flags.DEFINE_list('platforms', ['cpu'], 'savedmodel: platforms the program is lowered '
                    f'for, from {", ".join(PLATFORMS)}.', flag_values=values)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                       lower_bound=0, flag_values=values)
  flags.DEFINE_integer('batch_size', None, 'Batch size of re-calibration and scoring '
                       '(default: config.eval_batch_size).', lower_bound=1,
                       flag_values=values)
  flags.mark_flags_as_required(['workdir', 'depth', 'format', 'out'], flag_values=values)
  evaluate.define_config_flag(argv, values)


def parse_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> list[str]:
  return evaluate.parse_flags(argv, values, define=define_flags)


def main(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """app.run's main: exports what the parsed `values` ask for."""
  del argv  # parse_flags let no positional argument through
  record = evaluate.run_or_exit(
      export, values.workdir, values.config, depth=values.depth, fmt=values.format,
      out=values.out, recalibrate_bn=values.recalibrate_bn, quantize=values.quantize,
      step=values.step, batch_size=values.batch_size, platforms=values.platforms,
      num_representative=values.representative_images, split=values.split,
      eval_batches=values.eval_batches, compare_full=values.compare_full)
  print(summary(record))


def _main_owning_the_process(argv: Sequence[str]) -> None:
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure_xla_flags()
  main(argv)


if __name__ == '__main__':
  app.run(_main_owning_the_process, flags_parser=parse_flags)
