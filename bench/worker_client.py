"""The benchmark driver's side of a bench/workers.py subprocess: start it, send
requests, read its JSON replies, and turn silence or a crash into WorkerError
with the tail of its log."""

from __future__ import annotations

import json
import os
import queue
import shlex
import subprocess
import sys
import threading

BENCH = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(BENCH, 'workers.py')


class WorkerError(RuntimeError):
  pass


class Worker:
  """A `bench/workers.py COMMAND ...` subprocess: requests in, JSON replies out,
  stderr to `log_path`. Use as a context manager; a reply that does not come
  within its timeout kills the worker and raises WorkerError with its log tail."""

  def __init__(self, name: str, args: list[str], log_dir: str):
    self.name = name
    self.command = [sys.executable, WORKERS, *map(str, args)]
    self.log_path = os.path.join(log_dir, f'{name}.log')
    self._log = open(self.log_path, 'w')  # noqa: SIM115 -- closed in close()
    self.proc = subprocess.Popen(self.command, cwd=os.path.dirname(BENCH), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self._log, text=True)
    self._lines = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def error(self, what: str) -> WorkerError:
    self._log.flush()
    with open(self.log_path) as f:
      tail = f.read()[-3000:]
    return WorkerError(f'{self.name} ({shlex.join(self.command)}) {what}; its stderr '
                       f'({self.log_path}) ends:\n{tail}')

  def receive(self, timeout: float) -> dict:
    try:
      line = self._lines.get(timeout=timeout)
    except queue.Empty:
      self.proc.kill()
      raise self.error(f'sent no reply within {timeout:.0f} s (killed)') from None
    if line is None:
      raise self.error(f'exited with code {self.proc.wait()} before replying')
    return json.loads(line)

  def request(self, timeout: float, **message) -> dict:
    try:
      self.proc.stdin.write(json.dumps(message) + '\n')
      self.proc.stdin.flush()
    except BrokenPipeError:
      raise self.error(f'exited with code {self.proc.wait()}') from None
    return self.receive(timeout)

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()
    self._log.close()

  def __enter__(self) -> Worker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
