"""Offline KD (METHODS.md section 3): a frozen, pre-trained net teaches a
separately trained shallower one.

The teacher is the reference member (the full depth) of the run in
`config.teacher_workdir`, rebuilt from that run's config.json and latest
checkpoint; the train step runs it in inference mode without training it.
The student is `config.individual_depth` of `config.model.name` as a standalone
net (the same net method 'individual' trains alone). The terms are EKD's,
with config.ekd's settings (ddnn_jax/losses.py):

  L = student_ce * CE(z_s, y) + r(t) * alpha * T^2 KL(softmax(z_t / T) || softmax(z_s / T))
      + r(t) * beta * sum_{s in S} D(A(F_s^s), A(F_t^s))

r(t) being the sigmoid ramp-up over `ekd.rampup_epochs`. The attention term
(beta > 0) needs a teacher whose stage outputs have the student's spatial sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax import checkpointing, config_lib, losses, models
from ddnn_jax.methods import base

_PROBE = (1, 32, 32, 3)  # an image shape to compare the two nets' stage outputs


def load_teacher(config: ml_collections.ConfigDict, num_classes: int) -> base.Teacher:
  """The reference member of the run in `config.teacher_workdir`, frozen."""
  workdir = config.get('teacher_workdir') or ''
  if not workdir:
    raise ValueError("method 'offline_kd' needs a teacher: pass --config.teacher_workdir=DIR, "
                     'the workdir of a finished run (e.g. method ekd or individual)')
  if not checkpointing.has_checkpoints(workdir):
    raise ValueError(f'teacher_workdir={workdir} holds no checkpoint; train the teacher '
                     'there first, or pass the workdir of a finished run')
  try:
    teacher_config = config_lib.load_saved(workdir)
  except FileNotFoundError:
    raise ValueError(f'teacher_workdir={workdir} has no config.json; pass the workdir of a '
                     'run of ddnn_jax.main') from None
  # The convolution kernels are this machine's choice, not the teacher run's.
  teacher_config.model.conv_impl = config.model.get('conv_impl', 'xla')
  method = base.create_method(teacher_config, num_classes)
  model = method.model
  variables, step = checkpointing.read_variables(workdir)
  expected = jax.eval_shape(lambda: models.init_variables(
      model, jax.random.key(0), jnp.zeros(_PROBE, jnp.float32), method.depths))
  shapes = [jax.tree.map(lambda x: tuple(x.shape), tree) for tree in (expected, variables)]
  if shapes[0] != shapes[1]:
    head = shapes[1].get('params', {}).get('head', {}).get('bias')
    classes = f' ({head[0]} classes, this data has {num_classes})' if head else ''
    raise ValueError(f'the checkpoint of step {step} in teacher_workdir={workdir} does not fit '
                     f'the net of its config.json for this data{classes}; pass the workdir of '
                     'a run on the same classes')
  return base.Teacher(model, variables, (model.full_depth,))


def _stage_sizes(model, depth) -> list[tuple[int, int]]:
  """The spatial size of each stage output of `model` at `depth` on a probe image."""
  def run():
    images = jnp.zeros(_PROBE, jnp.float32)
    variables = models.init_variables(model, jax.random.key(0), images, (depth,))
    return model.apply(variables, images, (depth,), method=model.forward_depths)[0].features

  return [tuple(f.shape[1:3]) for f in jax.eval_shape(run)]


def _check_stages(teacher: base.Teacher, student: models.DDNNResNet, ekd: losses.EKDConfig,
                  workdir: str) -> None:
  """The attention term compares stage outputs of equal spatial sizes."""
  theirs = _stage_sizes(teacher.model, teacher.depths[0])
  ours = _stage_sizes(student, student.full_depth)
  if theirs != ours:
    raise ValueError(f'ekd.beta={ekd.beta} compares stage outputs, but the teacher in '
                     f'{workdir} has spatial sizes {theirs} and the student {ours}; '
                     'pass --config.ekd.beta=0 (KL only) or a teacher of the same stages')


def objective(tag: str, ekd: losses.EKDConfig, ramp: int) -> base.Objective:
  """Offline KD's loss over the student's output and the teacher's. Terms
  '<tag>/ce', '<tag>/kl', '<tag>/at', '<tag>/at_stage<s>', '<tag>/loss' and,
  with a ramp-up, 'kd_scale'."""

  def loss_fn(outputs, labels, step, *, teacher_outputs):
    if ekd.rampup_epochs and not ramp:
      raise ValueError('ekd.rampup_epochs needs steps_per_epoch in create_method')
    (student,), (teacher,) = outputs, teacher_outputs
    kd_scale = losses.sigmoid_rampup(step, ramp)
    ce = losses.cross_entropy(student.logits, labels)
    kl = losses.kl_divergence(teacher.logits, student.logits, ekd.temperature)
    terms = {f'{tag}/ce': ce, f'{tag}/kl': kl}
    loss = ekd.student_ce * ce
    if ekd.alpha:  # a zero weight drops the term
      loss = loss + kd_scale * ekd.alpha * kl
    if ekd.beta:
      last = len(student.features) - 1
      at = jnp.zeros((), jnp.float32)
      for s in range(last + 1) if ekd.stages == 'all' else [last]:
        distance = losses.attention_distance(student.features[s], teacher.features[s],
                                             ekd.attention)
        terms[f'{tag}/at_stage{s + 1}'] = distance
        at = at + distance
      terms[f'{tag}/at'] = at
      loss = loss + kd_scale * ekd.beta * at
    if ramp:
      terms['kd_scale'] = kd_scale
    terms[f'{tag}/loss'] = loss
    return loss, terms

  return loss_fn


@base.register('offline_kd')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  full = models.get_preset(config.model.name).stage_sizes
  try:
    depth = models.validate_depth(config.individual_depth, full)
  except ValueError as e:
    text, example = str(config.individual_depth).replace(' ', ''), ','.join(['1'] * len(full))
    raise ValueError(f'individual_depth={text} (the student): {e}; pass e.g. '
                     f'--config.individual_depth=({example})') from None
  teacher = load_teacher(config, num_classes)
  student = base.create_model(config, num_classes, depth)
  ekd = losses.EKDConfig(**config.ekd.to_dict())
  if ekd.beta:
    _check_stages(teacher, student, ekd, config.teacher_workdir)
  ramp = base.rampup_steps(ekd, steps_per_epoch)
  tag = models.depth_tag(student.full_depth)
  return base.Method(student, (student.full_depth,), objective(tag, ekd, ramp), ekd, ramp,
                     teacher)
