"""One depth of a trained run as the standalone net that ships: what
`ddnn_jax.export` writes and `ddnn_jax.search` measures.

  run = deploy.load_run(workdir, config)                  # no data, no optimizer
  net = deploy.standalone(run, (2, 2, 2))                 # the depth's own weights
  net = deploy.recalibrated(net, config, mesh, num_batches=20)
  logits = net.model.apply(net.variables, images)         # == the DDNN at (2, 2, 2)

The run is read from its checkpoint alone: the model's stage sizes and classes
come from the variables' names and shapes, its other settings from the config,
so a released run (ddnn_jax.release) loads without its training data. A depth's
standalone net holds only the blocks it runs and that depth's BatchNorm
statistics: the shared ones (`bn_mode='shared'`), its own (the private modes),
or with `recalibrated` statistics re-estimated for it on training batches as
`evaluate --recalibrate_bn` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ddnn_jax import methods, models, subnets

_BLOCK = re.compile(r'^stage(\d+)_block(\d+)$')
_TAG = re.compile(r'_(d\d+(?:-\d+)*)$')


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained DDNN: its config, model and variables (host arrays)."""
  config: ml_collections.ConfigDict
  model: models.DDNNResNet
  variables: dict
  step: int
  # Depths with BatchNorm layers of their own (the private modes), else ().
  private_depths: tuple[models.Depth, ...]


@dataclasses.dataclass(frozen=True)
class Net:
  """A standalone net of one depth: `model.apply(variables, images)`."""
  depth: models.Depth
  model: models.DDNNResNet  # full depth == `depth`, bn_mode 'shared'
  variables: dict


def _layout(variables: dict) -> tuple[models.Depth, tuple[models.Depth, ...]]:
  """(blocks per stage, depths with private norms) of a DDNN's variables."""
  params = variables.get('params', {})
  unknown = sorted(k for k in params if k not in ('stem', 'head') and not _BLOCK.match(k))
  if unknown or 'head' not in params or 'stem' not in params:
    raise ValueError(
        f'the checkpoint holds no depth-dynamic ResNet (layers {unknown or sorted(params)}); '
        'export and search ship depths of the ekd, joint_ce and individual methods')
  blocks = {}
  for name in params:
    match = _BLOCK.match(name)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
  stage_sizes = tuple(blocks[s] for s in sorted(blocks))
  tags = set()
  for path in traverse_util.flatten_dict(dict(variables)):
    for name in path:
      match = _TAG.search(name)
      if match:
        tags.add(match.group(1))
  private = sorted(models.parse_depth(t[1:].replace('-', ',')) for t in tags)
  return stage_sizes, tuple(private)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {'/'.join(path): tuple(np.shape(leaf))
          for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}


def load_run(workdir: str, config: ml_collections.ConfigDict,
             step: int | None = None) -> Run:
  """The model variables of `workdir`'s latest (or `step`) checkpoint and
  the DDNN of `config` they load into; ValueError when they do not match."""
  from ddnn_jax import checkpointing  # noqa: PLC0415 -- Orbax only where a run is read

  variables, step = checkpointing.read_variables(workdir, step)
  variables = jax.device_get({k: dict(v) for k, v in variables.items()})
  stage_sizes, private = _layout(variables)
  num_classes = int(variables['params']['head']['kernel'].shape[-1])
  model = methods.create_model(config, num_classes, stage_sizes)
  image = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda key: models.init_variables(
      model, key, image, private or None), jax.random.key(0))
  saved, wanted = _shapes(variables), _shapes(expected)
  for name in sorted(saved.keys() | wanted.keys()):
    if saved.get(name) != wanted.get(name):
      raise ValueError(
          f'the checkpoint of {workdir} does not fit the config\'s model '
          f'({config.model.name}, width {config.model.width_multiplier}, bn_mode '
          f'{config.model.bn_mode}): {name} is {saved.get(name, "missing")} there, '
          f'{wanted.get(name, "missing")} here; fix --config.model.*')
  return Run(config, model, variables, step, private)


def standalone(run: Run, depth: Any, *, any_statistics: bool = False,
               conv_impl: str | None = 'xla', dtype: Any = None) -> Net:
  """The standalone net of `depth` with the weights and statistics it uses.

  A depth the private BN modes made no norms for has no statistics of its
  own; with `any_statistics` (the caller re-calibrates them) a
  'private_stats' run lends it the full depth's. `conv_impl`: the net's
  convolutions ('xla', which an export needs; None: the run's own); `dtype`:
  its compute dtype (None: the run's).
  """
  depth = run.model.check_depth(depth)
  variables = run.variables
  if run.private_depths and depth not in run.private_depths:
    trained = ', '.join(','.join(map(str, d)) for d in run.private_depths)
    if not (any_statistics and run.model.bn_mode == 'private_stats'):
      raise ValueError(
          f'depth {",".join(map(str, depth))} has no BatchNorm layers of its own in this '
          f'{run.model.bn_mode} run (it has {trained})'
          + ('; pass --recalibrate_bn N to estimate them' if run.model.bn_mode ==
             'private_stats' else '; choose one of those'))
    variables = subnets.extract_subnet(variables, run.model.full_depth)
  model = run.model.clone(stage_sizes=depth, bn_mode='shared',
                          conv_impl=conv_impl or run.model.conv_impl,
                          dtype=jnp.dtype(dtype or run.model.dtype))
  return Net(depth, model, subnets.extract_subnet(variables, depth))


def recalibrated(net: Net, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 num_batches: int, batch_size: int | None = None) -> Net:
  """`net` with its BatchNorm statistics re-estimated on `num_batches`
  training batches of `batch_size` (default config.eval_batch_size), the
  batches and the estimate of `evaluate --recalibrate_bn` and release."""
  from ddnn_jax import evaluate  # noqa: PLC0415 -- TensorFlow loads with the pipeline

  (variables,) = evaluate.recalibrate_on_training_data(
      config, net.model, net.variables, (net.depth,), mesh,
      batch_size or config.eval_batch_size, num_batches)
  return dataclasses.replace(net, variables=jax.device_get(variables))


def normalise(images: jax.Array, data: ml_collections.ConfigDict) -> jax.Array:
  """Pixels in 0..255 (uint8 or float) -> what the model sees, as
  ddnn_jax.preprocessing normalises them (images already data.image_size)."""
  mean = jnp.asarray(data.mean, jnp.float32)
  std = jnp.asarray(data.std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def pixels(images: np.ndarray, data: ml_collections.ConfigDict) -> np.ndarray:
  """The input pipeline's normalised evaluation images back as uint8 pixels
  (exact: evaluation images are the decoded pixels, only normalised)."""
  values = np.asarray(images, np.float32) * np.asarray(data.std, np.float32)
  values += np.asarray(data.mean, np.float32)
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def variable_bytes(tree: Any) -> int:
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))
