"""The method interface: what a training method gives the trainer and evaluation.

A method fixes the network(s) a step trains, the members of it that run in
every step (the depths of a DDNN), the objective over their outputs, and
optionally a frozen teacher that runs in the step without being trained.

What the interface carries:
- one DDNN at several depths (ekd, joint_ce) or one standalone net (individual);
- several networks trained together (peers, a multi-branch model with a gate):
  `model` is any Flax module with `forward_depths(images, members, train)`
  returning one output (`.logits`, `.features`) per member, `full_depth` (the
  member evaluation compares the others with) and `check_depth`; a gate's
  output is one more member or a term of the objective; members that are not
  depths get names and standalone variables through the model's optional
  `member_name(member)` and `member_variables(variables, member)`
  (models.member_name: the depth tag without them), and `model.apply(
  variables, images, member)` gives one member's logits (FLOPs, img/s), as in
  one.py and mcod.py; `nets.Nets` holds standalone nets side by side, one
  member each, with both hooks (depth_pruning, indistill);
- a frozen teacher restored from another workdir: `Teacher(model, variables,
  depths)`; the train step runs it under stop_gradient and passes its outputs
  to the objective as `teacher_outputs`; its variables are a step argument
  (replicated), never baked into the program as constants (with `depths=()`
  nothing runs: the variables only reach the transitions, below);
- multi-phase training: the objective receives the step, so its terms can
  change over epochs (`phased` switches between objectives at step bounds,
  the KD ramp-up scales terms);
- a change of the state between two phases (copy a trained net's weights
  into another, prune one into a narrower one): `Method.transitions`, each a
  `Transition(step, fn)`. The train step applies it to the state after `step`
  steps, before its own update, inside the one jitted program (`lax.cond` on
  the step), so a run resumed from any checkpoint applies it exactly when an
  uninterrupted run does. `fn(variables, *step_args)` returns the top-level
  nets it replaces, {'params': {net: ...}, 'batch_stats': {net: ...}}; their
  optimizer state starts afresh (`tx.init` of the new values: zero momentum),
  while the optimizer's step count, and with it the learning-rate schedule,
  goes on;
- nets that train in some phases only: `Method.trainable(step)` maps
  top-level nets to a boolean; a net mapped to False keeps its parameters,
  optimizer state and BatchNorm statistics through that step (no weight decay,
  no momentum), a net not in the map trains.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddnn_jax import any_depth, gradients, losses, models

# (outputs of forward_depths, labels, step, *, teacher_outputs=None) -> (loss, terms)
Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# step -> {top-level net: bool scalar}: which nets the step updates
Trainable = Callable[[jax.Array], Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A network the train step runs but does not train."""
  model: nn.Module
  variables: Any  # its {'params', 'batch_stats'} (host or device arrays)
  depths: tuple[Any, ...]  # the members whose outputs the objective receives


@dataclasses.dataclass(frozen=True)
class Transition:
  """A change of the train state between two phases (see the module docstring)."""
  step: int  # applied to the state after `step` steps, before the next update
  fn: Callable[..., dict]  # (variables, *step_args) -> the replaced nets


@dataclasses.dataclass(frozen=True)
class Method:
  model: nn.Module  # a DDNNResNet, or any module with the same forward_depths
  depths: tuple[Any, ...]  # every member a train step runs, the reference (full) last
  objective: Objective
  ekd: losses.EKDConfig | None = None  # the KD settings the objective uses, if any
  rampup_steps: int = 0  # steps of the KD ramp-up (0: none)
  teacher: Teacher | None = None
  transitions: tuple[Transition, ...] = ()  # applied in this order
  trainable: Trainable | None = None  # None: every net trains in every step
  any_depth: any_depth.AnyDepth | None = None  # the sandwich rule (any_depth.py)
  # Steps at the start in which only the reference member (depths[-1]) runs
  # (delayed sub-nets): the others' outputs read as zeros there and their
  # BatchNorm statistics stay as they are; the program runs one branch.
  solo_steps: int = 0
  grads: gradients.GradientRule | None = None  # surgery on the members' gradients


# (config, num_classes, steps_per_epoch or None) -> Method
Builder = Callable[[ml_collections.ConfigDict, int, 'int | None'], Method]
_REGISTRY: dict[str, Builder] = {}
# What `model.bn_mode='auto'` (the configs' default) means for each method.
_BN_DEFAULTS: dict[str, str] = {}
# Why a method takes shared norm layers only, for the methods that do.
_SHARED_BN_ONLY: dict[str, str] = {}
BN_AUTO = 'auto'


def register(name: str, *, bn_mode: str = 'shared',
             shared_bn_only: str = '') -> Callable[[Builder], Builder]:
  """Decorator: makes `config.method = name` build a Method with the builder;
  `bn_mode` is the BatchNorm mode the method trains with when the config
  leaves `model.bn_mode` at 'auto'. `shared_bn_only`, where given, says why
  the method takes no other mode (the per-depth modes set BatchNorm across a
  DDNN's depths): create_method then refuses any other with that reason."""
  if bn_mode not in models.BN_MODES:
    raise ValueError(f'method {name!r}: bn_mode {bn_mode!r} is not one of {models.BN_MODES}')
  if shared_bn_only and bn_mode != 'shared':
    raise ValueError(f'method {name!r} takes shared BatchNorm only, so its bn_mode '
                     f"must be 'shared', not {bn_mode!r}")

  def decorate(builder: Builder) -> Builder:
    if name in _REGISTRY and _REGISTRY[name] is not builder:
      raise ValueError(f'method {name!r} is registered twice')
    _REGISTRY[name] = builder
    _BN_DEFAULTS[name] = bn_mode
    if shared_bn_only:
      _SHARED_BN_ONLY[name] = shared_bn_only
    return builder
  return decorate


def bn_mode(config: ml_collections.ConfigDict) -> str:
  """The BatchNorm mode `config` trains with: `model.bn_mode`, or for 'auto'
  its method's default ('shared' where any-depth training is on, which needs
  shared norm layers)."""
  mode = config.model.bn_mode
  if mode != BN_AUTO:
    return mode
  if config.get('any_depth', {}).get('k', 0):
    return 'shared'
  return _BN_DEFAULTS.get(config.method, 'shared')


def resolve_bn_mode(config: ml_collections.ConfigDict,
                    saved: ml_collections.ConfigDict | None = None) -> None:
  """Writes the mode `bn_mode(config)` names into `config.model.bn_mode`, so
  that the run's config.json says which one it trained with; a run resumed
  from `saved` (its config.json) keeps the mode it was started with, since
  'auto' may have named another one then."""
  if config.model.bn_mode != BN_AUTO:
    return
  if saved is not None and saved.get('model', {}).get('bn_mode', BN_AUTO) != BN_AUTO:
    config.model.bn_mode = saved.model.bn_mode
  else:
    config.model.bn_mode = bn_mode(config)


def names() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def create_method(config: ml_collections.ConfigDict, num_classes: int,
                  steps_per_epoch: int | None = None) -> Method:
  """The method of `config`; `steps_per_epoch` is needed by a KD ramp-up only."""
  builder = _REGISTRY.get(config.method)
  if builder is None:
    raise ValueError(
        f'unknown method {config.method!r}; set --config.method to one of {names()}')
  why = _SHARED_BN_ONLY.get(config.method)
  if why and bn_mode(config) != 'shared':
    raise ValueError(
        f'method {config.method!r} {why}, so model.bn_mode={config.model.bn_mode!r} '
        'means nothing; pass --config.model.bn_mode=shared')
  method = builder(config, num_classes, steps_per_epoch)
  k = config.get('any_depth', {}).get('k', 0)
  if k and method.any_depth is None:
    raise ValueError(
        f'any_depth.k={k}: method {config.method!r} does not train the depths of one '
        'DDNN; any-depth training needs --config.method=ekd or joint_ce, or pass '
        '--config.any_depth.k=0')
  return method


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 stage_sizes: Sequence[int] | None = None) -> models.DDNNResNet:
  """The DDNN of `config.model` (`stage_sizes`: a standalone net of that depth)."""
  m = config.model
  return models.create_model(
      m.name, num_classes, width_multiplier=m.width_multiplier, bn_mode=bn_mode(config),
      dtype=m.dtype, zero_init_residual=m.zero_init_residual,
      conv_impl=m.get('conv_impl', 'xla'), stage_sizes=stage_sizes,
      head_grad=m.get('head_grad', 'all'))


def train_depths(config: ml_collections.ConfigDict,
                 model: models.DDNNResNet) -> tuple[models.Depth, ...]:
  """The configured depths, validated, without repeats, the full depth last."""
  depths = []
  for depth in config.depths:
    depth = model.check_depth(depth)
    if depth not in depths and depth != model.full_depth:
      depths.append(depth)
  return (*depths, model.full_depth)


def any_depth_rule(config: ml_collections.ConfigDict, model: models.DDNNResNet,
                   depths: tuple[models.Depth, ...], ekd: losses.EKDConfig,
                   ramp: int) -> any_depth.AnyDepth | None:
  """The sandwich rule of `config.any_depth` for a DDNN trained at `depths`
  with the EKD objective (`ekd`, ramp-up `ramp` steps); None when k is 0."""
  if 'any_depth' not in config or not config.any_depth.get('k', 0):
    return None
  k = setting(config, 'any_depth.k', is_whole(0), 'a whole number >= 0', '2')
  cap = setting(config, 'any_depth.max_programs', is_whole(1), 'a whole number >= 1', '32')
  if bn_mode(config) != 'shared':
    raise ValueError(
        f'any_depth.k={k} needs model.bn_mode=shared (per-depth BatchNorm would need '
        'layers for every depth of the space); pass --config.model.bn_mode=shared and '
        're-calibrate each depth after training (--recalibrate_bn)')
  if ekd.subnet_start_epochs or gradients.rule(config) is not None:
    raise ValueError(
        f'any_depth.k={k} trains sampled depths from step 0 with summed gradients; pass '
        '--config.ekd.subnet_start_epochs=0 --config.grads.surgery=none '
        '--config.grads.equilibrium=False, or --config.any_depth.k=0')
  if not ekd.stop_gradient:
    raise ValueError(
        f'any_depth.k={k} needs ekd.stop_gradient=True (the sampled depths learn from '
        'the full net\'s outputs, which get no gradient back); pass '
        '--config.ekd.stop_gradient=True')
  return any_depth.build(model.full_depth, depths, k, cap, config.seed,
                         lambda ds: ekd_objective(model, ds, ekd, ramp))


def rampup_steps(ekd: losses.EKDConfig, steps_per_epoch: int | None) -> int:
  """`ekd.rampup_epochs` in steps (0: none, or no steps_per_epoch given)."""
  if ekd.rampup_epochs and steps_per_epoch is not None:
    return max(1, round(ekd.rampup_epochs * steps_per_epoch))
  return 0


def subnet_start_step(ekd: losses.EKDConfig, steps_per_epoch: int | None) -> int:
  """`ekd.subnet_start_epochs` in steps (0: the sub-nets train from step 0)."""
  return epochs_in_steps(ekd.subnet_start_epochs, steps_per_epoch)


def ekd_objective(model: models.DDNNResNet, depths: tuple[models.Depth, ...],
                  ekd: losses.EKDConfig, ramp: int, start: int = 0) -> Objective:
  """Every depth's cross-entropy plus the full net's KD terms (losses.ekd_loss),
  the KD terms scaled by a sigmoid ramp-up over `ramp` steps; with `start` > 0
  (delayed sub-nets) the sub-nets' whole losses are 0 before step `start` and
  ramp in over `ramp` steps from there."""

  def objective(outputs, labels, step, *, teacher_outputs=None):
    del teacher_outputs  # the teacher is the full depth of this step
    if (ekd.rampup_epochs and not ramp) or (ekd.subnet_start_epochs and not start):
      raise ValueError('ekd.rampup_epochs and ekd.subnet_start_epochs need '
                       'steps_per_epoch in create_method')  # evaluation needs no objective
    if start:
      on = jnp.asarray(step) >= start
      subnet_scale = jnp.where(on, losses.sigmoid_rampup(step - start, ramp), 0.0)
      loss, terms = losses.ekd_loss(outputs, depths, labels, model.full_depth, ekd,
                                    subnet_scale=subnet_scale)
      return loss, {**terms, 'subnet_scale': subnet_scale}
    kd_scale = losses.sigmoid_rampup(step, ramp)
    loss, terms = losses.ekd_loss(outputs, depths, labels, model.full_depth, ekd,
                                  kd_scale=kd_scale)
    if ramp:
      terms['kd_scale'] = kd_scale
    return loss, terms

  return objective


def phased(*phases: tuple[int, Objective]) -> Objective:
  """An objective that is `phases[i][1]` from step `phases[i][0]` on.

  The first phase starts at step 0. One program holds every phase (lax.switch
  runs only the current one); a term missing from a phase reads 0 there, and
  the term 'phase' is the index of the current phase.
  """
  starts = [start for start, _ in phases]
  if not phases or starts[0] != 0 or starts != sorted(set(starts)):
    raise ValueError(f'phase starts {starts} must begin at 0 and increase')

  def objective(outputs, labels, step, **kwargs):
    branches = [lambda o, obj=obj: obj(o, labels, step, **kwargs) for _, obj in phases]
    shapes = [jax.eval_shape(b, outputs)[1] for b in branches]
    keys = sorted(set().union(*shapes))

    def padded(branch, shape):
      def run(o):
        loss, terms = branch(o)
        return loss, {k: (terms[k] if k in shape else jnp.zeros((), jnp.float32)).astype(
            jnp.float32) for k in keys}
      return run

    index = phase_index(starts, step)
    loss, terms = jax.lax.switch(index, [padded(b, s) for b, s in zip(branches, shapes)],
                                 outputs)
    return loss, {**terms, 'phase': index}

  return objective


def is_number(test: Callable[[float], bool]) -> Callable[[Any], bool]:
  """A `setting` test: a finite real number (no bool) that passes `test`."""
  return lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)
                    and math.isfinite(v) and test(v))


def is_whole(minimum: int) -> Callable[[Any], bool]:
  """A `setting` test: an integer (no bool) >= `minimum`."""
  return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum


def setting(config: ml_collections.ConfigDict, field: str, ok: Callable[[Any], bool],
            words: str, example: str) -> Any:
  """The value of the dotted `field` of `config` (a method's own setting);
  a one-line ValueError naming the field and the flag that fixes it when it
  is missing or `ok(value)` fails (`words` says what ok wants)."""
  value = config
  for name in field.split('.'):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or name not in value:
      raise ValueError(f'method {config.method!r} needs config.{field}; build the config '
                       'on configs/base.py, which holds its default, or pass '
                       f'--config.{field}={example}')
    value = value[name]
  if not ok(value):
    raise ValueError(f'{field}={value!r} must be {words}; pass e.g. --config.{field}={example}')
  return value


def epochs_in_steps(epochs: float, steps_per_epoch: int | None) -> int:
  """A duration of a method's schedule in steps: at least 1 when `epochs` > 0,
  0 when it is 0 or `steps_per_epoch` is not known (an objective that needs it
  must then refuse to run)."""
  if not epochs or steps_per_epoch is None:
    return 0
  return max(1, round(epochs * steps_per_epoch))


def phase_index(starts: Sequence[int], step: jax.Array) -> jax.Array:
  """The index of the phase that `step` is in; phase i starts at `starts[i]`."""
  return jnp.searchsorted(jnp.asarray(starts), step, side='right') - 1


def _params_mask(tx: optax.GradientTransformation, opt_state, params,
                 chosen: Mapping[str, jax.Array], other: bool):
  """A boolean tree shaped like `opt_state`: `chosen[net]` on the leaves that
  belong to a parameter of `net`; `other` on the rest (the step count, the
  nets not in `chosen`)."""
  def fill(tree, value):
    return jax.tree.map(lambda _: jnp.asarray(value), tree)

  per_param = {net: fill(tree, chosen.get(net, other)) for net, tree in params.items()}
  return optax.tree_map_params(tx, lambda _, keep: keep, opt_state, per_param,
                               transform_non_params=lambda _: jnp.asarray(other))


def _where(mask, new, old):
  return jax.tree.map(jnp.where, mask, new, old)


def _select_nets(chosen: Mapping[str, jax.Array], new: dict, old: dict) -> dict:
  """`new[net]` where `chosen[net]` (or net not in `chosen`), else `old[net]`."""
  return {net: tree if net not in chosen else
          jax.tree.map(lambda a, b, c=chosen[net]: jnp.where(c, a, b), tree, old[net])
          for net, tree in new.items()}


def apply_transitions(method: Method, tx: optax.GradientTransformation, state,
                      step_args: tuple = ()):
  """`state` (a TrainState) with each transition of `method` whose step is
  `state.step` applied, in order; the train step calls it before its update."""
  for transition in method.transitions:
    def run(state, transition=transition):
      written = transition.fn(state.variables, *step_args)
      nets = written['params']
      params = {**state.params, **nets}
      batch_stats = {**state.batch_stats, **written.get('batch_stats', {})}
      restart = _params_mask(tx, state.opt_state, params,
                             {net: True for net in nets}, other=False)
      opt_state = _where(restart, tx.init(params), state.opt_state)
      return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)

    state = jax.lax.cond(state.step == transition.step, run, lambda s: s, state)
  return state


def keep_frozen(method: Method, tx: optax.GradientTransformation, new, old):
  """`new` (the TrainState after an update) with the nets that
  `method.trainable(old.step)` maps to False as they were in `old`."""
  if method.trainable is None:
    return new
  chosen = method.trainable(old.step)
  updated = _params_mask(tx, new.opt_state, new.params, chosen, other=True)
  return new.replace(params=_select_nets(chosen, new.params, old.params),
                     batch_stats=_select_nets(chosen, new.batch_stats, old.batch_stats),
                     opt_state=_where(updated, new.opt_state, old.opt_state))
