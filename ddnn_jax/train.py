"""The training loop: data -> jitted, sharded train step -> logs, evals, checkpoints."""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import asynclib, metric_writers, periodic_actions
from flax import traverse_util
from jax.experimental import multihost_utils

from ddnn_jax import (
  any_depth,
  checkpointing,
  config_checks,
  config_lib,
  evaluate,
  experiment,
  gradients,
  input_pipeline,
  methods,
  models,
  preemption,
  reporting,
)
from ddnn_jax import mesh as mesh_lib
from ddnn_jax import workdir as workdir_lib
from ddnn_jax.train_state import TrainState


class NonFiniteLossError(RuntimeError):
  pass


class EventWriteError(OSError):
  """The TensorBoard event files could not be written (a full disk)."""


def _event_write_error(error: asynclib.AsyncError, workdir: str) -> EventWriteError:
  """clu's writer thread failed (TF reports a full disk as ResourceExhaustedError
  '{{op}} PATH; No space left on device'): one line with the reason."""
  cause = error.__cause__ or error
  first = (str(cause).strip().splitlines() or [''])[0]
  reason = re.sub(r'\{\{[^}]*\}\}\s*', '', first).split('; ')[-1]
  return EventWriteError(checkpointing.write_failure(
      f'the event log in {workdir}', reason, getattr(cause, 'errno', None),
      checkpointing.checkpoint_dir(workdir)))


def make_train_step(exp: experiment.Experiment):
  """Jitted (state, batch, *exp.step_args) -> (state, metrics); every member
  of the method (every depth) runs in this one step. `exp.step_args` holds a
  frozen teacher's variables when the method has one, else nothing. A method
  with any-depth training gets its sandwich step instead (any_depth.py), a
  few programs per step behind the same call."""
  method, mesh = exp.method, exp.mesh
  if method.any_depth is not None:
    return any_depth.SandwichStep(exp, make_loss_fn, make_update)
  model, depths, teacher = method.model, method.depths, method.teacher
  loss_fn = make_loss_fn(model, depths, method.objective, teacher, method.solo_steps)
  update = make_update(exp)

  def step(state: TrainState, batch, teacher_variables=None):
    step_args = () if teacher is None else (teacher_variables,)
    state = methods.apply_transitions(method, exp.tx, state, step_args)  # between phases
    args = (state.batch_stats, batch, state.step, teacher_variables)
    if method.grads is None:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, (terms, batch_stats, _)), grads = grad_fn(state.params, *args)
    else:
      loss, terms, batch_stats, grads = gradients.differentiate(
          method.grads, depths, loss_fn, state.params, args)
    return update(state, grads, batch_stats, loss, terms)

  in_shardings = (exp.state_sharding, mesh_lib.batch_sharding(mesh))
  if teacher is not None:
    in_shardings += (mesh_lib.replicated(mesh),)
  return jax.jit(step, in_shardings=in_shardings,
                 out_shardings=(exp.state_sharding, mesh_lib.replicated(mesh)),
                 donate_argnums=0)


def make_loss_fn(model, depths, objective, teacher=None, solo_steps: int = 0):
  """(params, batch_stats, batch, step, teacher_variables) -> (loss, (terms,
  new batch_stats, outputs)): `depths` of `model` in train mode, the
  objective over their outputs (with a frozen teacher's, if any) and each
  member's batch accuracy in `terms`. Before step `solo_steps` only the last
  member runs (one branch of a lax.cond): the others' outputs are zeros and
  their BatchNorm statistics are kept."""

  def forward(params, batch_stats, images, step):
    variables = {'params': params, 'batch_stats': batch_stats}

    def run(members):
      return model.apply(variables, images, members, True, method=model.forward_depths,
                         mutable=['batch_stats'])

    if not solo_steps:
      return run(depths)

    def everyone():
      outputs, updates = run(depths)
      return outputs, updates.get('batch_stats', batch_stats)

    def reference_only():
      (reference,), updates = run(depths[-1:])
      shapes = jax.eval_shape(everyone)[0]
      outputs = tuple(reference if i == len(depths) - 1 else
                      jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shape)
                      for i, shape in enumerate(shapes))
      stats = traverse_util.flatten_dict(batch_stats)
      stats.update(traverse_util.flatten_dict(updates.get('batch_stats', {})))
      return outputs, traverse_util.unflatten_dict(stats)

    outputs, stats = jax.lax.cond(step < solo_steps, reference_only, everyone)
    return outputs, {'batch_stats': stats}

  def loss_fn(params, batch_stats, batch, step, teacher_variables=None):
    outputs, updates = forward(params, batch_stats, batch['image'], step)
    extra = {}
    if teacher is not None:
      extra['teacher_outputs'] = jax.lax.stop_gradient(teacher.model.apply(
          teacher_variables, batch['image'], teacher.depths, False,
          method=teacher.model.forward_depths))
    loss, terms = objective(outputs, batch['label'], step, **extra)
    for depth, output in zip(depths, outputs):
      correct = jnp.argmax(output.logits, -1) == batch['label']
      terms[f'{models.member_name(model, depth)}/accuracy'] = correct.mean()
    if solo_steps:
      terms['subnets_on'] = (step >= solo_steps).astype(jnp.float32)
    return loss, (terms, updates.get('batch_stats', batch_stats), outputs)

  return loss_fn


def make_update(exp: experiment.Experiment):
  """(state, grads, batch_stats, loss, terms) -> (state, metrics), traced
  inside a train step: the optimizer update of the nets that train this
  step, the step's metrics, and (with config.skip_nonfinite_steps) the old
  state kept when anything came out non-finite."""
  method, tx, schedule = exp.method, exp.tx, exp.schedule
  skip_nonfinite = exp.config.get('skip_nonfinite_steps', False)

  def update(state: TrainState, grads, batch_stats, loss, terms):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = methods.keep_frozen(method, tx, state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state),
        state)
    metrics = {
        **{f'train/{k}': v for k, v in terms.items()},
        'train/loss': loss,
        'train/learning_rate': schedule(state.step),
        'train/grad_norm': optax.tree.norm(grads),
        'train/param_norm': optax.tree.norm(new_state.params),
    }
    finite = _all_finite((loss, grads, params, batch_stats))
    if skip_nonfinite:  # keep the old state, count the step
      # One branch select, not a select per leaf: the per-leaf jnp.where
      # made XLA compile the train step about 8x slower.
      new_state = jax.lax.cond(finite, lambda: new_state,
                               lambda: state.replace(step=state.step + 1))
    metrics['train/nonfinite'] = 1 - finite.astype(jnp.int32)
    return new_state, metrics

  return update


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _mean_metrics(values: list[dict]) -> dict[str, float]:
  """Means over the steps (host metrics) that were finite, and how many were not."""
  finite = [v for v in values if not v['train/nonfinite']] or values
  means = {k: float(np.mean([v[k] for v in finite])) for k in values[0]}
  if 'train/any_depth_programs' in means:  # a count so far, not a mean
    means['train/any_depth_programs'] = float(values[-1]['train/any_depth_programs'])
  means['train/nonfinite'] = float(sum(v['train/nonfinite'] for v in values))
  return means


def _check_finite(steps: list[int], values: list[dict], config: ml_collections.ConfigDict,
                  manager) -> None:
  """Raises NonFiniteLossError at the first of `steps` (host metrics `values`)
  whose loss, gradients, parameters or BatchNorm statistics are not finite,
  before any of it is saved (unless config.skip_nonfinite_steps: the step kept
  the old state)."""
  bad = [(step, v) for step, v in zip(steps, values) if v['train/nonfinite']]
  if not bad or config.get('skip_nonfinite_steps', False):
    return
  step, values = bad[0]
  terms = [k.removeprefix('train/') for k, v in values.items()
           if k != 'train/nonfinite' and not np.isfinite(v).all()]
  checkpointing.wait(manager)
  latest = manager.latest_step()
  resume = (f'the rerun resumes from checkpoint step {latest}' if latest is not None
            else 'no checkpoint exists, so the rerun starts from step 0')
  raise NonFiniteLossError(
      f'training diverged at step {step}: non-finite '
      f'{", ".join(terms) or "parameters or BatchNorm statistics"}; nothing of it was '
      f'saved and {resume}. Lower --config.optim.learning_rate or check the data '
      '(--config.skip_nonfinite_steps=True skips such steps instead)')


def _dataset_info(data: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
  """Process 0 prepares the dataset (extracts the tar, decodes an image folder
  once) before the others look; a bad dataset raises here, before the
  trainer writes anything."""
  if jax.process_index() == 0:
    info = input_pipeline.get_info(data)
    input_pipeline.read_ahead(data)
  multihost_utils.sync_global_devices('ddnn_jax: dataset ready')
  return info if jax.process_index() == 0 else input_pipeline.get_info(data)


def _build(config: ml_collections.ConfigDict) -> experiment.Experiment:
  """The run's assembly on every device, once both batch sizes divide over them."""
  mesh = mesh_lib.create_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh, 'batch_size')
  mesh_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  return experiment.build(config, mesh,
                          experiment.DataSpec.from_info(_dataset_info(config.data), config))


def _saved_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config.json of a run started in `workdir` before, if any."""
  try:
    return config_lib.load_saved(workdir)
  except FileNotFoundError:
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns
  the final evaluation metrics."""
  # Everything that can be refused is refused before anything is written.
  config_checks.validate(config)
  workdir_lib.check_workdir(workdir)
  methods.resolve_bn_mode(config, _saved_config(workdir))
  workdir_lib.check_config(config, workdir)
  exp = _build(config)
  mesh = exp.mesh
  manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
  if manager.latest_step() is not None:
    state, manager = _resume(workdir, manager, exp)
  else:
    state = exp.init_state()
  workdir_lib.save_config(config, workdir)  # the workdir's checkpoints, if any, fit the config
  train_step, eval_step = _compile_steps(exp, state)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if int(state.step) == 0:
    writer.write_hparams(_flat_hparams(config))

  def evaluate_and_log(state: TrainState) -> dict[str, float]:
    metrics = evaluate.evaluate_depths(exp.model, state.variables, _eval_batches(config),
                                       exp.depths, mesh, eval_step)
    writer.write_scalars(int(state.step), {f'eval/{k}': v for k, v in metrics.items()})
    return metrics

  try:
    with metric_writers.ensure_flushes(writer), preemption.Preemption() as preempt:
      state, eval_metrics = _train_loop(exp, state, train_step, manager, writer,
                                        evaluate_and_log, preempt)
  except BaseException as e:
    # No save left half-written, whatever stopped the loop. When the event
    # files failed, a failed save (the same disk) is the error to report.
    writer_failed = isinstance(e, asynclib.AsyncError)
    checkpointing.finish(manager, quiet=not writer_failed)
    if writer_failed:
      raise _event_write_error(e, workdir) from e
    raise
  checkpointing.finish(manager)
  if preempt.signal_name is not None:
    logging.warning('%s: saved step %d and stopped; rerun the same command to resume',
                    preempt.signal_name, int(state.step))
    return {}
  extra = None
  if isinstance(train_step, any_depth.SandwichStep):
    logging.info('any-depth: %d tuple programs compiled in this process (at most %d)',
                 train_step.programs, train_step.rule.max_programs)
    extra = {'any_depth': train_step.summary()}
  # The report a user reads: json, Markdown table and plot in the workdir.
  reporting.report(workdir, config, exp.model, state.variables, exp.depths,
                   eval_metrics, step=int(state.step), label=config.data.eval_split,
                   sample_images=next(iter(_eval_batches(config)))['image'], mesh=mesh,
                   extra=extra)
  return eval_metrics


def _eval_batches(config: ml_collections.ConfigDict):
  return input_pipeline.eval_batches(config.data, split=config.data.eval_split,
                                     global_batch_size=config.eval_batch_size)


def _train_loop(exp: experiment.Experiment, state: TrainState, train_step, manager,
                writer, evaluate_and_log, preempt: preemption.Preemption
                ) -> tuple[TrainState, dict[str, float]]:
  """Steps from state.step to exp.num_steps with logs, checks, saves and evals;
  returns the final state and the last evaluation's metrics. A preemption
  signal saves the step in progress and returns at once."""
  config, start_step = exp.config, int(state.step)
  report = periodic_actions.ReportProgress(num_train_steps=exp.num_steps, writer=writer)
  batches = input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step)
  history: list[tuple[int, dict]] = []
  eval_metrics: dict[str, float] = {}
  logging.info('training %s (%s) for %d steps (%d per epoch), depths %s',
               config.model.name, config.method, exp.num_steps, exp.steps_per_epoch,
               exp.depths)
  for step in range(start_step + 1, exp.num_steps + 1):
    state, metrics = train_step(state, mesh_lib.global_batch(next(batches), exp.mesh),
                                *exp.step_args)
    history.append((step, metrics))
    report(step)
    is_last = step == exp.num_steps
    preempted = preempt.reached(step)
    save_now = (is_last or preempted
                or step % exp.every(config.checkpoint_every_epochs) == 0)
    if save_now or step % config.log_every_steps == 0:
      values = jax.device_get([m for _, m in history])  # one transfer for both
      _check_finite([s for s, _ in history], values, config, manager)  # before any save
      writer.write_scalars(step, _mean_metrics(values))
      history = []
    if save_now:
      checkpointing.save(manager, step, state)
    if preempted:
      return state, eval_metrics
    if is_last or step % exp.every(config.eval_every_epochs) == 0:
      eval_metrics = evaluate_and_log(state)
  if start_step >= exp.num_steps:
    eval_metrics = evaluate_and_log(state)
  return state, eval_metrics


def _resume(workdir: str, manager, exp: experiment.Experiment):
  """The newest readable checkpoint; unreadable newer ones are set aside
  (moved, never deleted) so that training can save their steps again."""
  state, step, unreadable = checkpointing.restore_readable(
      manager, lambda s: checkpointing.restore(manager, exp.abstract_state, s))
  if unreadable:
    manager.close()
    moved = checkpointing.set_aside(workdir, unreadable)
    logging.warning('set the unreadable checkpoints aside: %s', ', '.join(moved))
    manager = checkpointing.create_manager(workdir, keep=exp.config.keep_checkpoints)
  logging.info('resumed from step %d', step)
  return state, manager


def _compile_steps(exp: experiment.Experiment, state: TrainState):
  """Compiles the train and eval programs (every depth) before step 1, so that
  shape and memory errors appear at once; logs how long each took (with JAX's
  persistent cache, a rerun loads them instead)."""
  config, mesh = exp.config, exp.mesh

  def spec(batch_size, train):
    return mesh_lib.sharded_batch_spec(
        input_pipeline.batch_spec(exp.data.image_size, batch_size, train=train), mesh)

  start = time.perf_counter()
  train_step = make_train_step(exp)
  if isinstance(train_step, any_depth.SandwichStep):  # its tuple programs come later
    logging.info(exp.method.any_depth.describe())
    train_step = train_step.compile(state, spec(config.batch_size, True))
  else:
    train_step = train_step.lower(state, spec(config.batch_size, True),
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
