"""Helpers of the method tests (tests/test_method_*.py): NumPy references of
the loss terms, and smoke runs that are interrupted and resumed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import evaluate_cli, run_cli  # noqa: F401 -- the method tests call runs.*_cli

from ddnn_jax import checkpointing, config_lib, reporting, train
from ddnn_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, arg: str = 'smoke', **fields):
  """configs/<name>.py:<arg> with dotted `fields` set ({'one.kd_weight': 2.0})."""
  config = config_lib.load(os.path.join(ROOT, 'configs', name) + (f':{arg}' if arg else ''))
  config.update_from_flattened_dict(fields)
  return config


# ------------------------------------------------------------ NumPy references


def log_softmax(x, temperature: float = 1.0) -> np.ndarray:
  x = np.asarray(x, np.float64) / temperature
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def softmax(x, temperature: float = 1.0) -> np.ndarray:
  return np.exp(log_softmax(x, temperature))


def ce(logits, labels) -> float:
  """Mean cross-entropy of integer labels, float64."""
  return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def kd(teacher_logits, student_logits, temperature: float) -> float:
  """T^2 KL(softmax(t / T) || softmax(s / T)), summed over classes, batch mean."""
  log_t = log_softmax(teacher_logits, temperature)
  log_s = log_softmax(student_logits, temperature)
  return temperature**2 * float((np.exp(log_t) * (log_t - log_s)).sum(-1).mean())


def sigmoid_rampup(step: int, steps: int) -> float:
  """exp(-5 (1 - t)^2), t = step / steps clipped to 1 (1 without a ramp-up)."""
  if steps <= 0:
    return 1.0
  return float(np.exp(-5.0 * (1.0 - min(step / steps, 1.0)) ** 2))


# ------------------------------------------------------------------ runs


def _signal_at(monkeypatch, step: int) -> None:
  """SIGTERM to this process when the trainer fetches step `step`'s batch."""
  import signal

  real = train.input_pipeline.train_batches

  def batches(*args, start_step, **kwargs):
    for fetched, batch in enumerate(real(*args, start_step=start_step, **kwargs),
                                    start_step + 1):
      if fetched == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train.input_pipeline, 'train_batches', batches)


def interrupted_run(config, workdir: str, stop_at: int) -> dict[str, float]:
  """Trains `config` in `workdir`, stopped by a preemption signal after step
  `stop_at` (saved), then resumed by the same call to the end; returns the
  final evaluation metrics."""
  with pytest.MonkeyPatch.context() as patch:
    _signal_at(patch, stop_at)
    assert train.train_and_evaluate(config, workdir) == {}
  assert checkpointing.read_variables(workdir)[1] == stop_at
  return train.train_and_evaluate(config, workdir)


def assert_same_variables(workdir_a: str, workdir_b: str) -> None:
  """The latest checkpoints of two workdirs hold bit-identical variables."""
  (a, step_a), (b, step_b) = (checkpointing.read_variables(w) for w in (workdir_a, workdir_b))
  flat_a, flat_b = _flat(a), _flat(b)
  assert step_a == step_b and flat_a and flat_a.keys() == flat_b.keys()
  for name, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[name], err_msg=name)


def _flat(tree, prefix=()) -> dict:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, key)).items()}
  return {'/'.join(prefix): np.asarray(tree)}


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one scalar the trainer logged in `workdir`."""
  return reporting.read_scalars(workdir).get(tag, {})


# ------------------------------------------------- checkpoints and workdirs


def variables_at(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'} as nested dicts of NumPy arrays, step) of the
  latest (or `step`'s) checkpoint in `workdir`."""
  variables, step = checkpointing.read_variables(workdir, step)
  return _numpy(variables), step


def _numpy(tree):
  if isinstance(tree, dict):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def assert_trees_equal(a, b) -> None:
  """Nested dicts with the same keys and bit-identical arrays."""
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys(), (sorted(flat_a), sorted(flat_b))
  for name, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[name], err_msg=name)


def save_run(workdir: str, config, data, seed: int = 3) -> str:
  """A workdir holding `config`'s (randomly initialised) state at step 0 and
  its config.json: a finished run, as teacher_workdir and init_from read one."""
  import jax

  from ddnn_jax import experiment
  from ddnn_jax import mesh as mesh_lib

  exp = experiment.build(config, mesh_lib.create_mesh(), data)
  manager = checkpointing.create_manager(workdir, async_save=False)
  checkpointing.save(manager, 0, exp.init_state(jax.random.key(seed)))
  manager.close()
  workdir_lib.save_config(config, workdir)
  return workdir
