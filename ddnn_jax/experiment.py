"""One run assembly: (config, mesh, data facts) -> everything a run needs.

Training, evaluation, ahead-of-time compilation, the benchmarks and the
experiment scripts all call `build`; nothing else turns a config into a
method, an optimizer, a schedule, step counts and a sharded train state.

  exp = experiment.build(config, mesh, experiment.DataSpec.from_info(info, config))
  state = exp.init_state()                       # sharded, initialised under jit
  step = train.make_train_step(exp)              # the jitted train step
  restored = checkpointing.restore(manager, exp.abstract_state)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddnn_jax import checkpointing, input_pipeline, methods, models, optim
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.train_state import TrainState, create_train_state, state_shardings


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the assembly needs to know of the data, without reading it."""
  num_classes: int
  image_size: int
  train_examples: int  # one epoch of the training split

  @classmethod
  def from_info(cls, info, config: ml_collections.ConfigDict) -> DataSpec:
    """From an `input_pipeline.DatasetInfo` of `config.data`."""
    return cls(info.num_classes, info.image_size,
               info.num_examples[config.data.train_split])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A frozen record of one run: read it, never rebuild its parts elsewhere."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data: DataSpec
  method: methods.Method
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps_per_epoch: int
  num_steps: int  # config.num_epochs in steps, at least 1

  @property
  def model(self) -> models.DDNNResNet:
    return self.method.model

  @property
  def depths(self) -> tuple[models.Depth, ...]:
    return self.method.depths

  def every(self, epochs: float) -> int:
    """An interval in epochs (logging, evaluation, checkpoints) in steps, >= 1."""
    return max(1, optim.epochs_to_steps(epochs, self.steps_per_epoch))

  @functools.cached_property
  def _state_shapes(self) -> tuple[TrainState, Any]:
    return state_shardings(self.model, self.depths, self.tx, self.data.image_shape,
                           self.mesh)

  @property
  def state_sharding(self) -> Any:
    """The TrainState's shardings (data parallel: replicated)."""
    return self._state_shapes[1]

  @property
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the TrainState, with shardings: what a restore needs."""
    return checkpointing.abstract_with_shardings(*self._state_shapes)

  @functools.cached_property
  def abstract_variables(self) -> dict:
    """ShapeDtypeStructs of the model variables ({params, batch_stats}),
    replicated on the mesh; no optimizer state."""
    shapes = jax.eval_shape(lambda rng: models.init_variables(
        self.model, rng, jnp.zeros((1, *self.data.image_shape), jnp.float32), self.depths),
        jax.random.key(0))
    replicated = mesh_lib.replicated(self.mesh)
    return checkpointing.abstract_with_shardings(
        shapes, jax.tree.map(lambda _: replicated, shapes))

  @functools.cached_property
  def step_args(self) -> tuple:
    """The train step's arguments after (state, batch): a frozen teacher's
    variables, replicated on the mesh, when the method has a teacher."""
    if self.method.teacher is None:
      return ()
    return (jax.device_put(self.method.teacher.variables, mesh_lib.replicated(self.mesh)),)

  def init_state(self, rng: jax.Array | None = None) -> TrainState:
    """A fresh TrainState (seed `config.seed` unless `rng`), built in its shardings."""
    rng = jax.random.key(self.config.seed) if rng is None else rng
    return create_train_state(self.model, self.depths, self.tx, rng,
                              self.data.image_shape, self.mesh)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          data: DataSpec) -> Experiment:
  """The run of `config` on `mesh`; raises ValueError naming a bad field."""
  spe = input_pipeline.steps_per_epoch(data.train_examples, config.batch_size)
  if spe < 1:
    raise ValueError(
        f'batch_size={config.batch_size} exceeds the {data.train_examples} training '
        'examples; lower --config.batch_size')
  method = methods.create_method(config, data.num_classes, spe)
  tx, schedule = optim.create_optimizer(config, spe)
  num_steps = max(1, optim.epochs_to_steps(config.num_epochs, spe))
  return Experiment(config, mesh, data, method, tx, schedule, spe, num_steps)
