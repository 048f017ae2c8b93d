"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous (training continues while the arrays are written) and
keep the newest `keep` steps. Restores take an abstract state whose leaves carry
their shardings, so every array lands directly where the train step wants it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def create_manager(workdir: str, *, keep: int = 3,
                   async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> Any:
  """The state saved at `step` (default: the latest), laid out as `abstract_state`.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, such as
  `jax.eval_shape` of the initialiser with the sharding attached.
  """
  if step is None:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'no checkpoint in {manager.directory}; train first or pass the workdir '
        'of a finished run')
  if step not in manager.all_steps():
    raise FileNotFoundError(
        f'no checkpoint for step {step} in {manager.directory}; available steps: '
        f'{sorted(manager.all_steps())}')
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
