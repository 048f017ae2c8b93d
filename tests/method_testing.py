"""Helpers of the method tests (tests/test_method_*.py): NumPy references, a
preempted run, the evaluation CLI in this process, checkpoint reads."""

from __future__ import annotations

import os
import signal

import numpy as np
from absl import flags

from ddnn_jax import checkpointing, evaluate, train


def numpy_log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
  x = np.asarray(logits, np.float64) / temperature
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_ce(logits, labels) -> float:
  """Mean cross-entropy against integer labels, in float64."""
  log_p = numpy_log_softmax(logits)
  return float(-log_p[np.arange(len(labels)), np.asarray(labels)].mean())


def numpy_kd(teacher_logits, student_logits, temperature: float) -> float:
  """T^2 KL(softmax(t / T) || softmax(s / T)), summed over classes, batch mean."""
  log_t = numpy_log_softmax(teacher_logits, temperature)
  log_s = numpy_log_softmax(student_logits, temperature)
  return temperature**2 * float((np.exp(log_t) * (log_t - log_s)).sum(-1).mean())


def signal_at(monkeypatch, step: int) -> None:
  """Sends SIGTERM to this process when the trainer fetches step `step`'s
  batch: the trainer saves that step and returns (tests/test_train.py)."""
  real = train.input_pipeline.train_batches

  def batches(*args, start_step, **kwargs):
    for fetched, batch in enumerate(real(*args, start_step=start_step, **kwargs),
                                    start_step + 1):
      if fetched == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train.input_pipeline, 'train_batches', batches)


def preempted_then_resumed(config, workdir: str, step: int, monkeypatch) -> None:
  """Trains `config` in `workdir`, stopped by a preemption after `step`
  steps, then resumed to the end by the same call a user makes."""
  with monkeypatch.context() as patch:
    signal_at(patch, step)
    assert train.train_and_evaluate(config, workdir) == {}
  assert checkpointing.read_variables(workdir)[1] == step
  train.train_and_evaluate(config, workdir)


def evaluate_cli(*args) -> int:
  """Exit status of `python -m ddnn_jax.evaluate ARGS` (flags and main), run
  in this process on fresh flags."""
  values = flags.FlagValues()
  try:
    evaluate.main(evaluate.parse_flags(['evaluate', *args], values), values)
  except SystemExit as e:
    return e.code
  return 0


def variables_at(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'} as NumPy arrays, step) of a checkpoint."""
  variables, step = checkpointing.read_variables(workdir, step)
  return {k: _numpy(v) for k, v in variables.items()}, step


def _numpy(tree):
  if isinstance(tree, dict):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def assert_trees_equal(a, b) -> None:
  """Same keys and bit-identical arrays."""
  assert isinstance(a, dict) == isinstance(b, dict)
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
      assert_trees_equal(a[k], b[k])
  else:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def reporting_scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one scalar the trainer logged in `workdir`."""
  from ddnn_jax import reporting
  return reporting.read_scalars(workdir).get(tag, {})


def save_run(workdir: str, config, data, seed: int = 3) -> str:
  """A workdir holding the (randomly initialised) state of `config`'s method
  at step 0 and its config.json: a finished run, as init_from reads one."""
  import jax

  from ddnn_jax import experiment
  from ddnn_jax import mesh as mesh_lib

  exp = experiment.build(config, mesh_lib.create_mesh(), data)
  manager = checkpointing.create_manager(workdir, async_save=False)
  checkpointing.save(manager, 0, exp.init_state(jax.random.key(seed)))
  manager.close()
  train.save_config(config, workdir)
  return workdir
