"""The largest batch whose program fits in memory, in few compiles.

Each probe compiles a program (seconds to minutes for a large net), so the
search predicts the boundary from the bytes measured so far instead of
bisecting blindly; `ddnn_jax.aot --find_max_batch` uses it per chip.
"""

from __future__ import annotations

from collections.abc import Callable

# batch -> bytes per chip, None when the compiler runs out of memory.
Measure = Callable[[int], int | None]


def find_max_batch(measure: Measure, capacity: int, start: int, step: int = 8,
                   limit: int = 1 << 16) -> int:
  """Largest per-chip batch whose program fits in `capacity` bytes: a multiple
  of `step` (smaller only when not even `step` fits); 0 when batch 1 does not.

  `measure(batch)` compiles and returns bytes per chip, None when the compiler
  runs out of memory. The result fits and result + step does not.
  """
  found = _largest_fitting(lambda k: measure(k * step), capacity, max(1, start // step),
                           max(1, limit // step))
  if found or step == 1:
    return found * step
  return _largest_fitting(measure, capacity, min(start, step - 1), step - 1)


def _largest_fitting(measure: Measure, capacity: int, start: int, limit: int) -> int:
  """Largest n >= 1 with measure(n) <= capacity (0 if none), assuming memory
  grows with n. Memory is close to affine in the batch, so each probe is where
  a line through the two largest measured points meets `capacity`, kept
  strictly inside the bracket (largest fit, smallest failure)."""
  measured: dict[int, int | None] = {}

  def fits(n: int) -> bool:
    if n not in measured:
      measured[n] = measure(n)
    used = measured[n]
    return used is not None and used <= capacity

  low = max(1, start)
  while not fits(low):
    if low == 1:
      return 0
    low //= 2
  high = None  # smallest n known not to fit
  while high is None or high - low > 1:
    if high is None and low >= limit:
      return low
    points = sorted((n, used) for n, used in measured.items() if used is not None)[-2:]
    guess = 0
    if len(points) == 2 and points[1][1] > points[0][1]:
      (n0, m0), (n1, m1) = points
      guess = int(n0 + (capacity - m0) * (n1 - n0) / (m1 - m0))
    if high is None:  # grow: to the prediction (past `low`), or double
      guess = min(max(guess, low + 1) if guess else 2 * low, limit)
    elif not low < guess < high:  # shrink: the prediction if inside, else the middle
      guess = (low + high) // 2
    if fits(guess):
      low = guess
    else:
      high = guess
  return low
