"""InDistill (METHODS.md section 4): a wider auxiliary net learns from the
teacher, is L1-pruned by output filter to the student's width, and the
student matches the pruned auxiliary's feature maps one layer at a time,
shallow layers first, before the final-layer distillation.

One run; three nets side by side (methods/nets.py): the student
('student', `indistill.student_depth` at `model.width_multiplier`), the
auxiliary ('auxiliary', the same depth, `indistill.aux_width` times as wide)
and the pruned auxiliary ('pruned', the student's shape). The teacher is the
reference net of the run in `config.teacher_workdir` (any method's: its full
depth), frozen, read as offline_kd reads it. Phases:

1. 'auxiliary', `aux_epochs`: the auxiliary trains with
   CE + ekd.alpha * T^2 KL(teacher || auxiliary), T = ekd.temperature.
2. At its end a transition prunes the auxiliary into 'pruned' (below).
3. 'stage<s>' for each s of `indistill.stages`, `stage_epochs` each: the
   student trains on the mean squared difference between its stage-s output
   and the pruned auxiliary's (no adapter: the widths are equal).
4. 'final', the rest of `num_epochs`: the student trains with
   CE + ekd.alpha * T^2 KL(teacher || student).
Only the phase's net trains (Method.trainable); the others keep their
parameters, optimizer state and BN statistics.

L1 filter pruning: each conv keeps the output filters with the largest L1
norm (sum of |weight| over the kernel and its input channels), in their
original order, as many as the student's conv has; the next layers' input
channels, the BN layer after the conv and the head's rows follow. A residual
stream (the channels a stage's blocks add to) is one set for all the convs
that write it (the stem or the projection shortcut, and each block's last
conv): a channel's score is the sum of its filters' L1 norms over them.

Choices where METHODS.md is silent: the layers are the stage outputs (one
per stage: 3 for the CIFAR nets, whence the default 3, 4, 5 epochs); the
student starts from its own random initialisation (the pruned auxiliary is
the target only; starting the student from it would zero the curriculum's
loss); the curriculum's loss is the MSE alone (no cross-entropy), as in the
authors' code; the final-layer distillation is KL on the teacher's logits,
the same term as offline KD, where the authors' code distils the auxiliary's
representation (PKT); the pruned auxiliary runs in inference mode; every
net uses shared BatchNorm (one depth each). One learning-rate schedule
(config.optim) spans all phases. Each step runs the teacher and all three
nets, frozen ones included (one program for every phase). Evaluation
reports the student, the pruned auxiliary and the auxiliary, the reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddnn_jax import losses, models, optim
from ddnn_jax.methods import base, nets, offline_kd

STUDENT, PRUNED, AUXILIARY = ('student',), ('pruned',), ('auxiliary',)
MEMBERS = (STUDENT, PRUNED, AUXILIARY)  # the reference (the auxiliary) last
_BLOCK = re.compile(r'stage(\d+)_block(\d+)')


def check_config(config: ml_collections.ConfigDict, num_stages: int) -> None:
  """One-line ValueErrors for the fields this method reads."""
  base.setting(config, 'indistill.aux_width', base.is_number(lambda v: v >= 1),
               'a number >= 1 (the auxiliary is the wider net)', '2.0')
  base.setting(config, 'indistill.aux_epochs', base.is_number(lambda v: v > 0),
               'a number > 0', '10')
  example = str(tuple(range(1, num_stages + 1))).replace(' ', '')
  stages = tuple(base.setting(
      config, 'indistill.stages',
      lambda v: (all(isinstance(s, int) and 1 <= s <= num_stages for s in v)
                 and list(v) == sorted(set(v))),
      f'increasing stage numbers in 1..{num_stages}', example))
  per_stage = f'({",".join(["3.0"] * len(stages))})'
  base.setting(config, 'indistill.stage_epochs',
               lambda v: len(v) == len(stages) and all(base.is_number(lambda e: e > 0)(e)
                                                       for e in v),
               f'one number > 0 per stage of indistill.stages={stages}', per_stage)


def phases(config: ml_collections.ConfigDict, steps_per_epoch: int
           ) -> tuple[tuple[str, int], ...]:
  """(name, first step) of every phase: 'auxiliary', 'stage<s>'..., 'final'."""
  c = config.indistill
  names = ['auxiliary', *(f'stage{s}' for s in c.stages), 'final']
  ends = [0.0]
  for epochs in (c.aux_epochs, *c.stage_epochs):
    ends.append(ends[-1] + epochs)
  starts = [optim.epochs_to_steps(e, steps_per_epoch) for e in ends]
  for name, start, end in zip(names, starts, starts[1:]):
    if end <= start:
      raise ValueError(f'indistill phase {name!r} is shorter than one step at '
                       f'{steps_per_epoch} steps per epoch; lengthen indistill.'
                       f'{"aux_epochs" if name == "auxiliary" else "stage_epochs"}')
  return tuple(zip(names, starts))


# ------------------------------------------------------------- L1 filter pruning


def _layers(params: dict) -> tuple[list[tuple[str, str, str, str | None, str]], str]:
  """The convs of a standalone ResNet, (module, conv, its norm, input channel
  group, output channel group), and the group the head reads. A group is a
  set of channels pruned together: a residual stream, or a block's inside."""
  layers = [('stem', 'conv', 'bn', None, 'stem')]
  stream = 'stem'
  blocks = sorted((k for k in params if _BLOCK.fullmatch(k)),
                  key=lambda k: tuple(map(int, _BLOCK.fullmatch(k).groups())))
  for name in blocks:
    block, inputs = params[name], stream
    if 'proj_conv' in block:
      stream = f'{name}/out'
      layers.append((name, 'proj_conv', 'proj_bn', inputs, stream))
    convs = ['conv1', 'conv2', 'conv3'] if 'conv3' in block else ['conv1', 'conv2']
    previous = inputs
    for i, conv in enumerate(convs):
      out = stream if i == len(convs) - 1 else f'{name}/{conv}'
      layers.append((name, conv, f'bn{i + 1}', previous, out))
      previous = out
  return layers, stream


def kept_channels(params: dict, target_params: dict) -> dict[str, jax.Array]:
  """Channel group -> the indices kept, in increasing order: the largest
  summed L1 norms of the group's output filters, as many as `target_params`
  (the narrower net's parameters, or their shapes) has."""
  layers, _ = _layers(params)
  scores, widths = {}, {}
  for module, conv, _, _, group in layers:
    l1 = jnp.abs(params[module][conv]['kernel']).sum(axis=(0, 1, 2))
    scores[group] = scores.get(group, 0.0) + l1
    widths[group] = target_params[module][conv]['kernel'].shape[-1]
  return {group: jnp.sort(jnp.argsort(-scores[group], stable=True)[:widths[group]])
          for group in scores}


def l1_prune(variables: dict, target_params: dict) -> dict:
  """A standalone ResNet's {'params', 'batch_stats'} (shared BN) pruned to the
  widths of `target_params` (see the module docstring)."""
  params, stats = variables['params'], variables.get('batch_stats', {})
  layers, head_group = _layers(params)
  keep = kept_channels(params, target_params)
  new = {'params': {}, 'batch_stats': {}}
  for module, conv, norm, inputs, group in layers:
    kernel = params[module][conv]['kernel']
    if inputs is not None:
      kernel = jnp.take(kernel, keep[inputs], axis=2)
    new['params'].setdefault(module, {})[conv] = {
        'kernel': jnp.take(kernel, keep[group], axis=3)}
    for collection, source in (('params', params), ('batch_stats', stats)):
      if norm in source.get(module, {}):
        new[collection].setdefault(module, {})[norm] = jax.tree.map(
            lambda x, g=group: jnp.take(x, keep[g], axis=0), source[module][norm])
  head = params['head']
  new['params']['head'] = {'kernel': jnp.take(head['kernel'], keep[head_group], axis=0),
                           'bias': head['bias']}
  return new


# -------------------------------------------------------------------- objectives


def _kd_objective(member: tuple, alpha: float, temperature: float):
  """CE + alpha * T^2 KL(teacher || member); terms '<member>/ce', '<member>/kd'."""
  index, tag = MEMBERS.index(member), nets.member_name(member)

  def objective(outputs, labels, step, *, teacher_outputs):
    del step
    logits = outputs[index].logits
    ce = losses.cross_entropy(logits, labels)
    kd = losses.kl_divergence(teacher_outputs[0].logits, logits, temperature)
    return ce + alpha * kd, {f'{tag}/ce': ce, f'{tag}/kd': kd}

  return objective


def _stage_objective(stage: int):
  """The mean squared difference of the student's and the pruned auxiliary's
  stage-`stage` outputs; term 'student/mse_stage<s>'."""
  def objective(outputs, labels, step, *, teacher_outputs):
    del labels, step, teacher_outputs
    student = outputs[MEMBERS.index(STUDENT)].features[stage - 1].astype(jnp.float32)
    target = outputs[MEMBERS.index(PRUNED)].features[stage - 1].astype(jnp.float32)
    mse = jnp.mean(jnp.square(student - jax.lax.stop_gradient(target)))
    return mse, {f'student/mse_stage{stage}': mse}
  return objective


def _needs_steps(outputs, labels, step, **kwargs):
  raise ValueError("method 'indistill' needs steps_per_epoch in create_method")


@base.register('indistill', shared_bn_only='trains one net per depth')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  preset = models.get_preset(config.model.name)
  check_config(config, len(preset.stage_sizes))
  try:
    depth = models.validate_depth(config.indistill.student_depth, preset.stage_sizes)
  except ValueError as e:
    example = str(preset.stage_sizes).replace(' ', '')
    raise ValueError(f'indistill.student_depth: {e}; pass e.g. '
                     f'--config.indistill.student_depth={example}') from None
  student = base.create_model(config, num_classes, depth)
  auxiliary = student.clone(
      width_multiplier=config.model.width_multiplier * config.indistill.aux_width)
  model = nets.Nets(MEMBERS, (student, student, auxiliary), reference=AUXILIARY,
                    inference_only=(PRUNED,))
  target = nets.abstract_variables(student)
  nets.check_same_shapes(target, jax.eval_shape(
      l1_prune, nets.abstract_variables(auxiliary), target['params']),
      'the pruned auxiliary', 'the pruning does not know this architecture')
  target = target['params']
  if steps_per_epoch is None:  # the model alone (training builds it with the steps)
    return base.Method(model, MEMBERS, _needs_steps)
  if not config.get('teacher_workdir'):
    raise ValueError("method 'indistill' distils a trained teacher: pass "
                     '--config.teacher_workdir=DIR, the workdir of a finished run (e.g. '
                     'method ekd or individual)')
  teacher = offline_kd.load_teacher(config, num_classes)  # its reference net, frozen
  schedule = phases(config, steps_per_epoch)
  starts = [start for _, start in schedule]
  if optim.epochs_to_steps(config.num_epochs, steps_per_epoch) <= starts[-1]:
    logging.warning('indistill: num_epochs=%s ends before the final phase (step %d)',
                    config.num_epochs, starts[-1])
  alpha, temperature = config.ekd.alpha, config.ekd.temperature
  objectives = [_kd_objective(AUXILIARY, alpha, temperature),
                *(_stage_objective(s) for s in config.indistill.stages),
                _kd_objective(STUDENT, alpha, temperature)]
  names = {m: nets.net_name(m) for m in MEMBERS}

  def prune(variables, *step_args):
    del step_args
    pruned = l1_prune({c: t[names[AUXILIARY]] for c, t in variables.items()}, target)
    return {c: {names[PRUNED]: tree} for c, tree in pruned.items()}

  def trainable(step):
    phase = base.phase_index(starts, step)
    return {names[AUXILIARY]: phase == 0, names[STUDENT]: phase > 0,
            names[PRUNED]: jnp.zeros((), bool)}

  return base.Method(model, MEMBERS, base.phased(*zip(starts, objectives)),
                     teacher=teacher, transitions=(base.Transition(starts[1], prune),),
                     trainable=trainable)
