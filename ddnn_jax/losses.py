"""Embedded knowledge distillation (EKD): the full net teaches every sub-net.

For labels y, full-net logits z_f and sub-net logits z_k:

  L = phi * CE_eps(z_f, y) + u(t) * sum_k [ gamma * CE(z_k, y)
                          + r(t) * alpha * T^2 * KL(softmax(z_f / T) || softmax(z_k / T))
                          + r(t) * beta * sum_{s in S} D(A(F_k^s), A(F_f^s)) ]

where A is an attention map of a stage's output, D its distance, phi the full
net's CE weight (`full_ce`), CE_eps its cross-entropy against labels smoothed
by eps (`label_smoothing`, 0: plain), gamma the sub-nets' CE weight
(`student_ce`; 0 with T = 1 and beta = 0 is the in-place distillation of
weight-shared sub-nets) and r(t) the sigmoid ramp-up of the KD terms over the
first `rampup_epochs` (1 without one). u(t) brings the sub-nets in late
(`subnet_start_epochs` > 0, delayed sub-nets): 0 before that epoch, then the
sigmoid ramp over `rampup_epochs` from there (which then scales each
sub-net's whole loss, r(t) = 1); 1 without a delay. Every term is computed in
float32 and reported per depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from ddnn_jax import models

ATTENTION_KINDS = ('zscore_sum', 'at_p2')
STAGE_SETS = ('all', 'last')


@dataclasses.dataclass(frozen=True)
class EKDConfig:
  """The EKD loss's settings. The defaults are METHODS.md's EKD (the paper's),
  for direct use of the loss; training builds every field from `config.ekd`, so
  the project's defaults live in one place, configs/base.py."""
  alpha: float = 1.0  # weight of the KL term
  beta: float = 1.0  # weight of the attention term
  temperature: float = 3.0
  attention: str = 'zscore_sum'  # one of ATTENTION_KINDS
  stages: str = 'all'  # one of STAGE_SETS
  stop_gradient: bool = True  # the teacher's logits and maps get no gradient
  student_ce: float = 1.0  # weight of the sub-nets' own cross-entropy
  full_ce: float = 1.0  # weight of the full net's (the teacher's) cross-entropy
  rampup_epochs: float = 0.0  # sigmoid ramp-up of the KD terms (0: none)
  label_smoothing: float = 0.0  # of the full net's labels (its CE only)
  subnet_start_epochs: float = 0.0  # the sub-nets train from this epoch on (0: from step 0)

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(
          f'unknown attention {self.attention!r}; choose one of {ATTENTION_KINDS}')
    if self.stages not in STAGE_SETS:
      raise ValueError(f'unknown stages {self.stages!r}; choose one of {STAGE_SETS}')
    if not self.temperature > 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}')
    for name in ('alpha', 'beta', 'student_ce', 'full_ce', 'rampup_epochs',
                 'subnet_start_epochs'):
      value = getattr(self, name)
      if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f'{name} must be a finite number >= 0, got {value}')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')


def sigmoid_rampup(step: jax.Array, rampup_steps: int) -> jax.Array:
  """exp(-5 (1 - t)^2) for t = step / rampup_steps < 1, then 1 (Laine & Aila, 2017)."""
  if rampup_steps <= 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
  return jnp.exp(-5.0 * jnp.square(1.0 - t))


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy against integer labels, smoothed by
  `label_smoothing` (the target is (1 - eps) one-hot + eps / classes)."""
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.losses.softmax_cross_entropy(logits, targets).mean()


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean."""
  t = temperature
  teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  per_example = optax.losses.kl_divergence_with_log_targets(
      student_log_probs, teacher_log_probs)
  return t * t * per_example.mean()


def attention_map(features: jax.Array, kind: str, eps: float = 1e-5) -> jax.Array:
  """(batch, H, W, C) features -> (batch, H*W) attention map.

  ``zscore_sum``: channel sum, standardised over each sample's positions.
  ``at_p2``: channel mean of squares, L2-normalised per sample.
  """
  x = features.astype(jnp.float32)
  if kind == 'zscore_sum':
    a = x.sum(axis=-1).reshape(x.shape[0], -1)
    mean = a.mean(axis=1, keepdims=True)
    var = a.var(axis=1, keepdims=True)
    return (a - mean) * jax.lax.rsqrt(var + eps)
  if kind == 'at_p2':
    a = jnp.square(x).mean(axis=-1).reshape(x.shape[0], -1)
    norm = jnp.linalg.norm(a, axis=1, keepdims=True)
    return a / jnp.maximum(norm, 1e-12)
  raise ValueError(f'unknown attention {kind!r}; choose one of {ATTENTION_KINDS}')


def attention_distance(student_features: jax.Array, teacher_features: jax.Array,
                       kind: str) -> jax.Array:
  """Mean squared difference of the two attention maps."""
  if student_features.shape[1:3] != teacher_features.shape[1:3]:
    raise ValueError(
        f'attention maps need equal spatial sizes, got {student_features.shape} '
        f'and {teacher_features.shape}')
  diff = attention_map(student_features, kind) - attention_map(teacher_features, kind)
  return jnp.mean(jnp.square(diff))


def ekd_loss(outputs: Sequence[models.DepthOutput], depths: Sequence[models.Depth],
             labels: jax.Array, teacher_depth: models.Depth,
             config: EKDConfig = EKDConfig(), kd_scale: jax.Array | float = 1.0,
             subnet_scale: jax.Array | float = 1.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EKD objective over the outputs of ``model.forward_depths(images, depths)``.

  Returns the total loss and a dict of every term (terms with a zero weight are
  reported but not added), keyed
  ``'<depth tag>/<term>'`` with terms ``ce``, ``kl``, ``at``, ``at_stage<s>``
  (stages from 1) and ``loss`` (the depth's weighted sum). The teacher has only
  ``ce`` and ``loss``; its ``ce`` is the plain cross-entropy also when the loss
  smooths its labels (then reported as ``ce_smoothed`` too). ``kd_scale``
  multiplies alpha and beta (the ramp-up's r(t)), ``subnet_scale`` each
  sub-net's whole loss (u(t); its ``loss`` term is reported scaled).
  """
  depths = [tuple(d) for d in depths]
  teacher_depth = tuple(teacher_depth)
  if len(outputs) != len(depths):
    raise ValueError(f'got {len(outputs)} outputs for {len(depths)} depths')
  if len(set(depths)) != len(depths):
    raise ValueError(f'depths must be distinct, got {depths}')
  if teacher_depth not in depths:
    raise ValueError(f'the teacher depth {teacher_depth} is not among {depths}')
  teacher = outputs[depths.index(teacher_depth)]
  teacher_logits, teacher_features = teacher.logits, teacher.features
  if config.stop_gradient:
    teacher_logits, teacher_features = jax.lax.stop_gradient(
        (teacher_logits, teacher_features))
  num_stages = len(teacher_features)
  stages = range(num_stages) if config.stages == 'all' else [num_stages - 1]

  terms = {}
  total = jnp.zeros((), jnp.float32)
  for depth, output in zip(depths, outputs):
    tag = models.depth_tag(depth)
    ce = cross_entropy(output.logits, labels)
    terms[f'{tag}/ce'] = ce
    weight = config.full_ce if depth == teacher_depth else config.student_ce
    if depth == teacher_depth and config.label_smoothing:
      ce = cross_entropy(output.logits, labels, config.label_smoothing)
      terms[f'{tag}/ce_smoothed'] = ce
    loss = ce if weight == 1.0 else weight * ce
    if depth != teacher_depth:
      kl = kl_divergence(teacher_logits, output.logits, config.temperature)
      at = jnp.zeros((), jnp.float32)
      for s in stages:
        distance = attention_distance(output.features[s], teacher_features[s],
                                      config.attention)
        terms[f'{tag}/at_stage{s + 1}'] = distance
        at = at + distance
      terms[f'{tag}/kl'] = kl
      terms[f'{tag}/at'] = at
      # A zero weight drops the term from the loss (it is still reported), so a
      # non-finite KD term cannot leak into a CE-only objective.
      if config.alpha:
        loss = loss + kd_scale * config.alpha * kl
      if config.beta:
        loss = loss + kd_scale * config.beta * at
      if not isinstance(subnet_scale, float) or subnet_scale != 1.0:
        loss = subnet_scale * loss
    terms[f'{tag}/loss'] = loss
    total = total + loss
  return total, terms
