"""Preemption: SIGTERM (and SIGINT) end training at a step boundary with a save.

Preemptible TPU VMs and cluster schedulers send SIGTERM some seconds before
they stop a job. The trainer asks `reached(step)` after every step; once it
says yes, it saves that step, waits for the save and exits 0, and rerunning
the same command resumes there, bit-identically.

One process: a signal handler sets a flag. Several processes: every process
must save the same step, so SIGTERM goes through JAX's preemption sync point
(the coordination service picks the step all processes reach next); SIGINT
there keeps its default (KeyboardInterrupt), since one process cannot stop the
others alone.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Context manager: installs the handlers on entry, restores them on exit."""

  def __init__(self):
    self.signal_name: str | None = None  # the signal that asked to stop
    self._multi_process = jax.process_count() > 1
    self._previous: dict[int, object] = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread() and not self._multi_process:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    """True when training should save `step` and stop (every process agrees)."""
    if not self._multi_process:
      return self.signal_name is not None
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = 'SIGTERM'
        return True
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      pass
    return False
