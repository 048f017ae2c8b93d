"""Any-depth training: the sandwich rule over the whole depth space of a DDNN.

With `config.any_depth.k = k > 0` (methods ekd and joint_ce), every train
step trains the full net, the smallest configured depth and k depth tuples
drawn from the whole space (each stage 1..n blocks), so that any depth a
deployment picks later (`python -m ddnn_jax.search`) was trained, not only
the configured ones. The full net teaches the sampled tuples with the
method's own terms (EKD's KL and attention terms; joint_ce: cross-entropy).

The step is several programs behind one call (`SandwichStep`), because a
program holds a fixed set of depths:

  1. the base program: full net + smallest depth, forward and backward; it
     returns their gradients, the full net's outputs (stop-gradient: the
     teacher of the sampled tuples) and the BatchNorm statistics;
  2. one program per sampled tuple: its forward and backward against the
     teacher's outputs, its gradient added to the sum;
  3. the update program: the optimizer update with the summed gradient.

The gradient is the one a single program over all k + 2 depths would
compute, as the teacher gets no gradient from the KD terms either way
(`ekd.stop_gradient`, required). BatchNorm statistics pass from program to
program in that order, so they must be shared (`model.bn_mode='shared'`);
re-calibrate them per depth after training (evaluate/search
`--recalibrate_bn N`).

The sampler is keyed on (config.seed, step): every process draws the same
tuples with no communication, and a resumed run draws what the uninterrupted
run drew. Each tuple's program compiles once, on its first draw, and is kept.
The number of programs is bounded: the tuples are drawn from a pool of at
most `any_depth.max_programs` tuples (the whole space when it is smaller; a
subset drawn once from config.seed when not), and the trainer reports the
number compiled so far as `train/any_depth_programs`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddnn_jax import mesh as mesh_lib
from ddnn_jax import models

_POOL, _DRAW = 0x706F6F6C, 0x64726177  # separate the two streams of one seed


def switch_off(config) -> None:
  """Sets `config.any_depth.k = 0` (where the field exists): for a config
  that no longer trains a DDNN's depths (a release, an exported single depth,
  the full net alone), which evaluate must build without the rule."""
  if 'any_depth' in config:
    with config.unlocked():
      config.any_depth.k = 0


def depth_space(stage_sizes: Sequence[int]) -> tuple[models.Depth, ...]:
  """Every depth of a net with `stage_sizes`: each stage 1..n blocks."""
  return tuple(itertools.product(*(range(1, n + 1) for n in stage_sizes)))


def _rng(*key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


@dataclasses.dataclass(frozen=True)
class AnyDepth:
  """The sandwich rule of a method: which depths a step trains."""
  base_depths: tuple[models.Depth, ...]  # (smallest configured, full) or (full,)
  pool: tuple[models.Depth, ...]  # the tuples the sampler draws from
  space_size: int  # depths in the whole space
  k: int  # tuples drawn per step
  seed: int
  # (depths, full last) -> the method's objective over their outputs
  objective_for: Callable[[tuple[models.Depth, ...]], Any]

  def sample(self, step: int) -> tuple[models.Depth, ...]:
    """The k distinct tuples step `step` (0-based, = state.step) trains, in
    pool order; a function of (seed, step) alone."""
    picks = _rng(self.seed, _DRAW, int(step)).choice(len(self.pool), self.k, replace=False)
    return tuple(self.pool[i] for i in sorted(picks))

  @property
  def max_programs(self) -> int:
    """An upper bound of the tuple programs a run compiles."""
    return len(self.pool)

  def describe(self) -> str:
    return (f'any-depth: full + {models.depth_tag(self.base_depths[0])} + {self.k} of '
            f'{len(self.pool)} pooled tuples per step (space {self.space_size}); at most '
            f'{len(self.pool)} tuple programs')


def build(full: models.Depth, depths: Sequence[models.Depth], k: int, max_programs: int,
          seed: int, objective_for: Callable) -> AnyDepth:
  """The rule for a net of depth `full` trained at the configured `depths`;
  ValueError when k tuples cannot be drawn."""
  full = tuple(full)
  smallest = min((tuple(d) for d in depths), key=lambda d: (sum(d), d))
  base_depths = (full,) if smallest == full else (smallest, full)
  space = depth_space(full)
  candidates = [d for d in space if d not in base_depths]
  if len(candidates) > max_programs:
    keep = _rng(seed, _POOL).choice(len(candidates), max_programs, replace=False)
    candidates = [candidates[i] for i in sorted(keep)]
  if k > len(candidates):
    raise ValueError(
        f'any_depth.k={k} exceeds the {len(candidates)} depths it can draw from (space of '
        f'{len(space)} minus the full and smallest depths, at most any_depth.max_programs='
        f'{max_programs}); lower --config.any_depth.k or raise --config.any_depth.max_programs')
  return AnyDepth(base_depths, tuple(candidates), len(space), k, seed, objective_for)


class SandwichStep:
  """The any-depth train step: `step(state, batch) -> (state, metrics)` like the
  single-program step of train.make_train_step, for one state's sequence of
  steps (it reads `state.step` once, at its first call, then counts)."""

  def __init__(self, exp, make_loss_fn, make_update):
    rule: AnyDepth = exp.method.any_depth
    model, mesh = exp.model, exp.mesh
    self.rule, self._model = rule, model
    replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    full = rule.base_depths[-1]
    base_loss = make_loss_fn(model, rule.base_depths, rule.objective_for(rule.base_depths))

    def base(state, batch):
      grad_fn = jax.value_and_grad(base_loss, has_aux=True)
      (loss, (terms, batch_stats, outputs)), grads = grad_fn(
          state.params, state.batch_stats, batch, state.step)
      return grads, loss, terms, batch_stats, jax.lax.stop_gradient(outputs[-1])

    self._base_jit = jax.jit(
        base, in_shardings=(exp.state_sharding, batch),
        out_shardings=(replicated, replicated, replicated, replicated, batch))
    self._base = self._base_jit
    update = make_update(exp)

    def finish(state, grads, batch_stats, loss, terms, sampled):
      mean = {f'sampled/{name}': jnp.mean(jnp.stack([t[name] for t in sampled]))
              for name in sampled[0]}
      return update(state, grads, batch_stats, loss, {**terms, **mean})

    self._update = jax.jit(finish, out_shardings=(exp.state_sharding, replicated),
                           donate_argnums=0)
    self._full, self._sharding = full, (replicated, batch)
    self._programs: dict[models.Depth, Callable] = {}
    self._next: int | None = None

  @property
  def programs(self) -> int:
    """Tuple programs compiled so far (at most `rule.max_programs`)."""
    return len(self._programs)

  def summary(self) -> dict:
    """What the run's report says of the rule and the programs compiled."""
    rule = self.rule
    return {'k': rule.k, 'base': [list(d) for d in rule.base_depths],
            'pool': len(rule.pool), 'space': rule.space_size,
            'max_programs': rule.max_programs,
            'programs_compiled_by_this_process': self.programs}

  def lower(self, state, batch):
    """The base program lowered (ahead-of-time analysis: aot.py)."""
    return self._base_jit.lower(state, batch)

  def compile(self, state, batch) -> SandwichStep:
    """Compiles the base program ahead of time (shape and memory errors at
    once); the tuple programs compile on their first draw."""
    self._base = self._base_jit.lower(state, batch).compile()
    return self

  def _program(self, depth: models.Depth) -> Callable:
    if depth not in self._programs:
      model, full, rule = self._model, self._full, self.rule
      objective = rule.objective_for((depth, full))
      tag = models.depth_tag(depth)

      def loss_fn(params, batch_stats, batch, teacher, step):
        (output,), updates = model.apply(
            {'params': params, 'batch_stats': batch_stats}, batch['image'], (depth,), True,
            method=model.forward_depths, mutable=['batch_stats'])
        _, terms = objective((output, teacher), batch['label'], step)
        own = {k.split('/', 1)[1]: v for k, v in terms.items() if k.startswith(tag + '/')}
        own['accuracy'] = (jnp.argmax(output.logits, -1) == batch['label']).mean()
        return own['loss'], (own, updates['batch_stats'])

      def program(params, batch_stats, batch, teacher, step, grads, loss):
        (own_loss, (terms, batch_stats)), own_grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params, batch_stats, batch, teacher, step)
        return (jax.tree.map(jnp.add, grads, own_grads), loss + own_loss, batch_stats,
                terms)

      replicated, batch = self._sharding
      self._programs[depth] = jax.jit(
          program, in_shardings=(replicated, replicated, batch, batch, replicated,
                                 replicated, replicated),
          out_shardings=replicated, donate_argnums=(5, 6))
      logging.info('any-depth: compiling the program of %s (%d of at most %d)', tag,
                   len(self._programs), rule.max_programs)
    return self._programs[depth]

  def __call__(self, state, batch):
    if self._next is None:
      self._next = int(jax.device_get(state.step))
    step, self._next = self._next, self._next + 1
    grads, loss, terms, batch_stats, teacher = self._base(state, batch)
    sampled, depths = [], self.rule.sample(step)
    for depth in depths:
      grads, loss, batch_stats, own = self._program(depth)(
          state.params, batch_stats, batch, teacher, state.step, grads, loss)
      sampled.append(own)
    state, metrics = self._update(state, grads, batch_stats, loss, terms, sampled)
    metrics['train/any_depth_programs'] = self.programs
    metrics['train/sampled_blocks'] = float(np.mean([sum(d) for d in depths]))
    return state, metrics

