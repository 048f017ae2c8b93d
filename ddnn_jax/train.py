"""The training loop: data -> jitted, sharded train step -> logs, evals, checkpoints."""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from ddnn_jax import (
  checkpointing,
  evaluate,
  experiment,
  input_pipeline,
  models,
  reporting,
)
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.train_state import TrainState


class NonFiniteLossError(RuntimeError):
  pass


def make_train_step(exp: experiment.Experiment):
  """Jitted (state, batch, *exp.step_args) -> (state, metrics); every member
  of the method (every depth) runs in this one step. `exp.step_args` holds a
  frozen teacher's variables when the method has one, else nothing."""
  method, tx, schedule, mesh = exp.method, exp.tx, exp.schedule, exp.mesh
  model, depths, teacher = method.model, method.depths, method.teacher

  def loss_fn(params, batch_stats, batch, step, teacher_variables):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, batch['image'], depths, True,
        method=model.forward_depths, mutable=['batch_stats'])
    extra = {}
    if teacher is not None:
      extra['teacher_outputs'] = jax.lax.stop_gradient(teacher.model.apply(
          teacher_variables, batch['image'], teacher.depths, False,
          method=teacher.model.forward_depths))
    loss, terms = method.objective(outputs, batch['label'], step, **extra)
    for depth, output in zip(depths, outputs):
      correct = jnp.argmax(output.logits, -1) == batch['label']
      terms[f'{models.depth_tag(depth)}/accuracy'] = correct.mean()
    return loss, (terms, updates.get('batch_stats', batch_stats))

  def step(state: TrainState, batch, teacher_variables=None):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch,
                                                       state.step, teacher_variables)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **{f'train/{k}': v for k, v in terms.items()},
        'train/loss': loss,
        'train/learning_rate': schedule(state.step),
        'train/grad_norm': optax.tree.norm(grads),
        'train/param_norm': optax.tree.norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  in_shardings = (exp.state_sharding, mesh_lib.batch_sharding(mesh))
  if teacher is not None:
    in_shardings += (mesh_lib.replicated(mesh),)
  return jax.jit(step, in_shardings=in_shardings,
                 out_shardings=(exp.state_sharding, mesh_lib.replicated(mesh)),
                 donate_argnums=0)


def _mean_metrics(history: list[tuple[int, dict]]) -> dict[str, float]:
  values = jax.device_get([m for _, m in history])
  return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def _check_finite(history: list[tuple[int, dict]]) -> None:
  losses = jax.device_get([m['train/loss'] for _, m in history])
  for (step, _), loss in zip(history, losses):
    if not math.isfinite(float(loss)):
      raise NonFiniteLossError(
          f'loss is {float(loss)} at step {step}; training stopped and the last '
          'checkpoint (from before that step) is kept. Lower the learning rate or '
          'check the data, then rerun to resume from that checkpoint.')


def _dataset_info(data: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
  """Process 0 prepares the dataset (or extracts the tar) before the others look."""
  if jax.process_index() == 0:
    info = input_pipeline.get_info(data)
  multihost_utils.sync_global_devices('ddnn_jax: dataset ready')
  return info if jax.process_index() == 0 else input_pipeline.get_info(data)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(config.to_json_best_effort(indent=2))


def _build(config: ml_collections.ConfigDict) -> experiment.Experiment:
  """The run's assembly on every device, once both batch sizes divide over them."""
  mesh = mesh_lib.create_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh, 'batch_size')
  mesh_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  return experiment.build(config, mesh,
                          experiment.DataSpec.from_info(_dataset_info(config.data), config))


def _resume_or_init(exp: experiment.Experiment, manager) -> TrainState:
  """The latest checkpoint's state, else a fresh one."""
  if manager.latest_step() is None:
    return exp.init_state()
  state = checkpointing.restore(manager, exp.abstract_state)
  logging.info('resumed from step %d', int(state.step))
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns
  the final evaluation metrics."""
  exp = _build(config)
  mesh, method, num_steps = exp.mesh, exp.method, exp.num_steps

  save_config(config, workdir)
  manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
  state = _resume_or_init(exp, manager)
  start_step = int(state.step)

  train_step, eval_step = _compile_steps(exp, state)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)

  def eval_batches():
    return input_pipeline.eval_batches(config.data, split=config.data.eval_split,
                                       global_batch_size=config.eval_batch_size)

  def run_eval(step: int) -> dict[str, float]:
    metrics = evaluate.evaluate_depths(method.model, state.variables, eval_batches(),
                                       method.depths, mesh, eval_step)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
    return metrics

  batches = input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step)
  history: list[tuple[int, dict]] = []
  eval_metrics: dict[str, float] = {}
  logging.info('training %s (%s) for %d steps (%d per epoch), depths %s',
               config.model.name, config.method, num_steps, exp.steps_per_epoch,
               method.depths)
  with metric_writers.ensure_flushes(writer):
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = train_step(state, mesh_lib.global_batch(next(batches), mesh),
                                  *exp.step_args)
      history.append((step, metrics))
      report(step)
      is_last = step == num_steps
      save_now = is_last or step % exp.every(config.checkpoint_every_epochs) == 0
      if save_now or step % config.log_every_steps == 0:
        _check_finite(history)
        writer.write_scalars(step, _mean_metrics(history))
        history = []
      if save_now:
        checkpointing.save(manager, step, state)
      if is_last or step % exp.every(config.eval_every_epochs) == 0:
        eval_metrics = run_eval(step)
    if start_step >= num_steps:
      eval_metrics = run_eval(start_step)
  manager.wait_until_finished()
  manager.close()
  # The report a user reads: json, Markdown table and plot in the workdir.
  reporting.report(workdir, config, method.model, state.variables, method.depths,
                   eval_metrics, step=int(state.step), label=config.data.eval_split,
                   sample_images=next(iter(eval_batches()))['image'], mesh=mesh)
  return eval_metrics


def _compile_steps(exp: experiment.Experiment, state: TrainState):
  """Compiles the train and eval programs (every depth) before step 1, so that
  shape and memory errors appear at once; logs how long each took (with JAX's
  persistent cache, a rerun loads them instead)."""
  config, mesh = exp.config, exp.mesh

  def spec(batch_size, train):
    return mesh_lib.sharded_batch_spec(
        input_pipeline.batch_spec(exp.data.image_size, batch_size, train=train), mesh)

  start = time.perf_counter()
  train_step = make_train_step(exp).lower(state, spec(config.batch_size, True),
                                          *exp.step_args).compile()
  middle = time.perf_counter()
  eval_step = evaluate.make_eval_step(exp.model, exp.depths, mesh).lower(
      state.variables, spec(config.eval_batch_size, False)).compile()
  logging.info('compiled the train step in %.1f s and the eval step in %.1f s',
               middle - start, time.perf_counter() - middle)
  return train_step, eval_step


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
  """Dotted field -> value; values TensorBoard's hparams cannot hold as JSON."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
          for k, v in flat.items()}
