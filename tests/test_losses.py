"""Tests of the EKD objective (ddnn_jax.losses) against an independent NumPy reference."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax import losses, models

RTOL = 1e-5
ATOL = 1e-6

# ---------------------------------------------------------------------------
# Independent NumPy reference (float64, numpy only).
# ---------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  shifted = z - m
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels):
  logp = np_log_softmax(logits)
  labels = np.asarray(labels)
  return float(-logp[np.arange(logp.shape[0]), labels].mean())


def np_kl(teacher_logits, student_logits, t):
  log_p = np_log_softmax(np.asarray(teacher_logits, np.float64) / t)
  log_q = np_log_softmax(np.asarray(student_logits, np.float64) / t)
  per_example = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
  return float(t * t * per_example.mean())


def np_attention_map(features, kind):
  x = np.asarray(features, np.float64)
  b = x.shape[0]
  if kind == 'zscore_sum':
    a = x.sum(axis=-1).reshape(b, -1)
    mean = a.mean(axis=1, keepdims=True)
    var = ((a - mean) ** 2).mean(axis=1, keepdims=True)  # population variance
    return (a - mean) / np.sqrt(var + 1e-5)
  if kind == 'at_p2':
    a = (x ** 2).mean(axis=-1).reshape(b, -1)
    norm = np.sqrt((a ** 2).sum(axis=1, keepdims=True))
    return a / np.maximum(norm, 1e-12)
  raise AssertionError(kind)


def np_attention_distance(student, teacher, kind):
  d = np_attention_map(student, kind) - np_attention_map(teacher, kind)
  return float((d ** 2).mean())


def np_ekd(outputs, depths, labels, teacher_depth, alpha, beta, t, kind, stages,
           student_ce=1.0, kd_scale=1.0, full_ce=1.0):
  """Reference total and terms, written from METHODS.md section 2."""
  depths = [tuple(d) for d in depths]
  teacher = outputs[depths.index(tuple(teacher_depth))]
  num_stages = len(teacher.features)
  stage_ids = list(range(num_stages)) if stages == 'all' else [num_stages - 1]
  terms, total = {}, 0.0
  for depth, out in zip(depths, outputs):
    tag = 'd' + '-'.join(str(k) for k in depth)
    ce = np_cross_entropy(out.logits, labels)
    terms[f'{tag}/ce'] = ce
    loss = full_ce * ce
    if depth != tuple(teacher_depth):
      kl = np_kl(teacher.logits, out.logits, t)
      at = 0.0
      for s in stage_ids:
        dist = np_attention_distance(out.features[s], teacher.features[s], kind)
        terms[f'{tag}/at_stage{s + 1}'] = dist
        at += dist
      terms[f'{tag}/kl'] = kl
      terms[f'{tag}/at'] = at
      loss = student_ce * ce + kd_scale * (alpha * kl + beta * at)
    terms[f'{tag}/loss'] = loss
    total += loss
  return total, terms


def _f32(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------
# Elementwise pieces vs the reference.
# ---------------------------------------------------------------------------

# Few distinct shapes, reused across tests: every new shape costs XLA compiles.
SHAPES_LOGITS = [(4, 10), (1, 10), (32, 100)]


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('shape', SHAPES_LOGITS)
def test_cross_entropy_matches_reference(seed, shape):
  rng = np.random.default_rng(seed)
  logits = _f32(rng, shape, scale=3.0)
  labels = rng.integers(0, shape[1], size=shape[0]).astype(np.int32)
  got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  want = np_cross_entropy(logits, labels)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_cross_entropy_known_values():
  # Uniform logits over C classes: CE = log C exactly.
  logits = jnp.zeros((4, 10), jnp.float32)
  labels = jnp.arange(4, dtype=jnp.int32)
  np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)),
                             math.log(10), rtol=1e-6)
  # Ten classes, the labelled one at logit log 3: p(label) = 3 / 12 = 1/4.
  logits = np.zeros((4, 10), np.float32)
  logits[np.arange(4), [0, 3, 5, 9]] = math.log(3.0)
  labels = jnp.asarray([0, 3, 5, 9], jnp.int32)
  np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(logits), labels)),
                             math.log(4.0), rtol=1e-6)
  # Labelled with a different class: p(label) = 1 / 12.
  labels = jnp.asarray([1, 3, 3, 4], jnp.int32)  # rows 0, 2, 3 miss; row 1 hits
  np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(logits), labels)),
                             0.75 * math.log(12.0) + 0.25 * math.log(4.0), rtol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 3.0, 4.5])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('shape', SHAPES_LOGITS)
def test_kl_matches_reference(temperature, seed, shape):
  rng = np.random.default_rng(seed)
  teacher = _f32(rng, shape, scale=4.0)
  student = _f32(rng, shape, scale=4.0)
  got = float(losses.kl_divergence(jnp.asarray(teacher), jnp.asarray(student),
                                   temperature))
  want = np_kl(teacher, student, temperature)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_kl_known_value():
  # Ten classes at T=1: p uniform (1/10 each); q puts 3/12 on class 0, 1/12 elsewhere.
  teacher = jnp.zeros((1, 10), jnp.float32)
  student = np.zeros((1, 10), np.float32)
  student[0, 0] = math.log(3.0)
  want = 0.1 * math.log(0.1 / 0.25) + 0.9 * math.log(0.1 / (1.0 / 12.0))
  np.testing.assert_allclose(
      float(losses.kl_divergence(teacher, jnp.asarray(student), 1.0)), want,
      rtol=1e-5)
  # At T=2 the logits are halved and the result scaled by 4.
  np.testing.assert_allclose(
      float(losses.kl_divergence(teacher, jnp.asarray(2.0 * student), 2.0)),
      4.0 * want, rtol=1e-5)


def test_kl_is_batch_mean_not_sum():
  rng = np.random.default_rng(7)
  teacher, student = _f32(rng, (4, 10), 2.0), _f32(rng, (4, 10), 2.0)
  per_row = [np_kl(teacher[i:i + 1], student[i:i + 1], 3.0) for i in range(4)]
  for i in range(4):
    got_row = float(losses.kl_divergence(jnp.asarray(teacher[i:i + 1]),
                                         jnp.asarray(student[i:i + 1]), 3.0))
    np.testing.assert_allclose(got_row, per_row[i], rtol=RTOL, atol=ATOL)
  got = float(losses.kl_divergence(jnp.asarray(teacher), jnp.asarray(student), 3.0))
  np.testing.assert_allclose(got, np.mean(per_row), rtol=RTOL, atol=ATOL)
  assert not np.isclose(got, np.sum(per_row), rtol=1e-3)


@pytest.mark.parametrize('temperature', [1.0, 3.0, 4.5])
def test_kl_gradient_wrt_student_matches_closed_form(temperature):
  # d/dz_s [T^2 * KL(p || q)] / batch = T * (q - p) / B.
  rng = np.random.default_rng(3)
  b, c = 4, 10
  teacher, student = _f32(rng, (b, c), 3.0), _f32(rng, (b, c), 3.0)
  grad = jax.grad(losses.kl_divergence, argnums=1)(
      jnp.asarray(teacher), jnp.asarray(student), temperature)
  p = np.exp(np_log_softmax(teacher / temperature))
  q = np.exp(np_log_softmax(student / temperature))
  want = temperature * (q - p) / b
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 3.0, 4.5])
@pytest.mark.parametrize('seed', range(4))
def test_kl_zero_for_identical_logits(temperature, seed):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(_f32(rng, (4, 10), scale=5.0))
  kl = float(losses.kl_divergence(logits, logits, temperature))
  assert abs(kl) < 1e-6
  # Shifting logits by a per-row constant leaves the softmax unchanged.
  shifted = logits + jnp.asarray(_f32(rng, (4, 1), scale=10.0))
  assert abs(float(losses.kl_divergence(logits, shifted, temperature))) < 1e-5


@pytest.mark.parametrize('temperature', [1.0, 3.0, 4.5])
def test_kl_nonnegative_on_random_inputs(temperature):
  rng = np.random.default_rng(11)
  for i in range(12):
    scale = float(rng.uniform(0.1, 6.0))
    shape = SHAPES_LOGITS[i % len(SHAPES_LOGITS)]
    teacher, student = _f32(rng, shape, scale), _f32(rng, shape, scale)
    kl = float(losses.kl_divergence(jnp.asarray(teacher), jnp.asarray(student),
                                    temperature))
    assert kl >= 0.0
    assert kl > 0.0  # random distinct inputs: strictly positive


FEATURE_SHAPES = [(4, 8, 8, 4), (4, 4, 4, 8), (4, 2, 2, 16), (1, 7, 5, 3)]


@pytest.mark.parametrize('kind', losses.ATTENTION_KINDS)
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('shape', FEATURE_SHAPES)
@pytest.mark.parametrize('scale', [2.0, 1e-3])  # at 1e-3 the 1e-5 eps matters
def test_attention_map_matches_reference(kind, seed, shape, scale):
  rng = np.random.default_rng(seed)
  feats = _f32(rng, shape, scale=scale) + np.float32(scale / 4)
  got = np.asarray(losses.attention_map(jnp.asarray(feats), kind))
  want = np_attention_map(feats, kind)
  assert got.shape == (shape[0], shape[1] * shape[2])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_attention_map_properties():
  rng = np.random.default_rng(5)
  feats = jnp.asarray(_f32(rng, (4, 8, 8, 4), 2.0))
  z = np.asarray(losses.attention_map(feats, 'zscore_sum'), np.float64)
  np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=1), 1.0, atol=1e-3)  # eps shrinks it slightly
  a = np.asarray(losses.attention_map(feats, 'at_p2'), np.float64)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
  assert (a >= 0).all()
  # All-zero features: no NaN, a zero map.
  zeros = jnp.zeros((4, 4, 4, 8), jnp.float32)
  for kind in losses.ATTENTION_KINDS:
    m = np.asarray(losses.attention_map(zeros, kind))
    assert np.isfinite(m).all()
    np.testing.assert_array_equal(m, 0.0)


def test_attention_map_unknown_kind():
  with pytest.raises(ValueError):
    losses.attention_map(jnp.ones((4, 2, 2, 16)), 'nope')


@pytest.mark.parametrize('kind', losses.ATTENTION_KINDS)
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('shape,teacher_channels', [
    ((4, 8, 8, 4), 4), ((4, 4, 4, 8), 8), ((4, 2, 2, 16), 16), ((1, 7, 5, 3), 6)])
def test_attention_distance_matches_reference(kind, seed, shape, teacher_channels):
  rng = np.random.default_rng(seed)
  student = _f32(rng, shape, 2.0)
  teacher = _f32(rng, shape[:3] + (teacher_channels,), 2.0)
  got = float(losses.attention_distance(jnp.asarray(student), jnp.asarray(teacher),
                                        kind))
  want = np_attention_distance(student, teacher, kind)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # A map compared with itself is at distance 0.
  assert float(losses.attention_distance(jnp.asarray(student), jnp.asarray(student),
                                         kind)) == 0.0


def test_attention_distance_rejects_spatial_mismatch():
  with pytest.raises(ValueError):
    losses.attention_distance(jnp.ones((4, 4, 4, 8)), jnp.ones((4, 2, 2, 16)),
                              'zscore_sum')


# ---------------------------------------------------------------------------
# Full EKD objective vs the reference.
# ---------------------------------------------------------------------------

DEPTHS = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
TEACHER = (3, 3, 3)
STAGE_SHAPES = [(8, 8, 4), (4, 4, 8), (2, 2, 16)]
NUM_CLASSES = 10


def _random_outputs(seed, batch=4):
  rng = np.random.default_rng(seed)
  outputs = []
  for _ in DEPTHS:
    logits = _f32(rng, (batch, NUM_CLASSES), 3.0)
    feats = tuple(np.maximum(_f32(rng, (batch,) + s, 1.5), 0.0) + np.float32(0.01)
                  for s in STAGE_SHAPES)
    outputs.append(models.DepthOutput(logits, feats))
  labels = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)
  return outputs, labels


def _to_jax(outputs):
  return [models.DepthOutput(jnp.asarray(o.logits),
                             tuple(jnp.asarray(f) for f in o.features))
          for o in outputs]


@pytest.mark.parametrize('stages', losses.STAGE_SETS)
@pytest.mark.parametrize('kind', losses.ATTENTION_KINDS)
@pytest.mark.parametrize('alpha,beta', [(1.0, 1.0), (0.5, 2.0), (0.0, 0.0)])
@pytest.mark.parametrize('seed,batch,temperature', [(0, 4, 3.0), (1, 4, 4.5)])
def test_ekd_loss_matches_reference(stages, kind, alpha, beta, seed, batch,
                                    temperature):
  outputs, labels = _random_outputs(seed, batch)
  config = losses.EKDConfig(alpha=alpha, beta=beta, temperature=temperature,
                            attention=kind, stages=stages)
  total, terms = losses.ekd_loss(_to_jax(outputs), DEPTHS, jnp.asarray(labels),
                                 TEACHER, config)
  want_total, want_terms = np_ekd(outputs, DEPTHS, labels, TEACHER, alpha, beta,
                                  temperature, kind, stages)

  expected_keys = {'d3-3-3/ce', 'd3-3-3/loss'}
  for tag in ('d1-1-1', 'd2-2-2'):
    expected_keys |= {f'{tag}/{t}' for t in ('ce', 'kl', 'at', 'loss')}
    if stages == 'all':
      expected_keys |= {f'{tag}/at_stage{s}' for s in (1, 2, 3)}
    else:
      expected_keys.add(f'{tag}/at_stage3')
  assert set(terms) == expected_keys
  assert set(want_terms) == expected_keys  # the reference agrees on the layout

  for key, want in want_terms.items():
    assert terms[key].shape == ()
    assert terms[key].dtype == jnp.float32
    np.testing.assert_allclose(float(terms[key]), want, rtol=RTOL, atol=ATOL,
                               err_msg=key)
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)
  assert total.dtype == jnp.float32 and total.shape == ()

  # Non-degenerate: the KD terms are genuinely positive on random inputs.
  for tag in ('d1-1-1', 'd2-2-2'):
    assert want_terms[f'{tag}/kl'] > 1e-3
    assert want_terms[f'{tag}/at'] > 1e-3
  if alpha == beta == 0.0:
    ce_sum = sum(v for k, v in want_terms.items() if k.endswith('/ce'))
    np.testing.assert_allclose(float(total), ce_sum, rtol=RTOL, atol=ATOL)


def test_ekd_loss_last_stage_only_keys():
  outputs, labels = _random_outputs(4)
  _, terms = losses.ekd_loss(_to_jax(outputs), DEPTHS, jnp.asarray(labels), TEACHER,
                             losses.EKDConfig(stages='last'))
  for tag in ('d1-1-1', 'd2-2-2'):
    stage_keys = sorted(k for k in terms if k.startswith(f'{tag}/at_stage'))
    assert stage_keys == [f'{tag}/at_stage3']
    np.testing.assert_allclose(float(terms[f'{tag}/at']),
                               float(terms[f'{tag}/at_stage3']), rtol=0, atol=0)
  assert sorted(k for k in terms if k.startswith('d3-3-3/')) == ['d3-3-3/ce',
                                                                 'd3-3-3/loss']


def test_ekd_loss_teacher_not_last_and_list_depths():
  # The teacher may sit anywhere in the list; depths may be given as lists.
  outputs, labels = _random_outputs(6)
  order = [2, 0, 1]
  depths = [list(DEPTHS[i]) for i in order]
  outs = [outputs[i] for i in order]
  total, terms = losses.ekd_loss(_to_jax(outs), depths, jnp.asarray(labels), [3, 3, 3],
                                 losses.EKDConfig(attention='at_p2'))
  want_total, want_terms = np_ekd(outputs, DEPTHS, labels, TEACHER, 1.0, 1.0, 3.0,
                                  'at_p2', 'all')
  assert set(terms) == set(want_terms)
  for key, want in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), want, rtol=RTOL, atol=ATOL,
                               err_msg=key)
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)


def test_ekd_loss_is_jittable():
  outputs, labels = _random_outputs(8)
  config = losses.EKDConfig(alpha=0.5, beta=2.0, attention='zscore_sum')
  fn = jax.jit(lambda o, y: losses.ekd_loss(o, DEPTHS, y, TEACHER, config))
  total, terms = fn(_to_jax(outputs), jnp.asarray(labels))
  want_total, want_terms = np_ekd(outputs, DEPTHS, labels, TEACHER, 0.5, 2.0, 3.0,
                                  'zscore_sum', 'all')
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)
  for key, want in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), want, rtol=RTOL, atol=ATOL,
                               err_msg=key)


# ---------------------------------------------------------------------------
# Gradients through a real model.
# ---------------------------------------------------------------------------

MODEL_DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
STUDENT_TAGS = ('d1-1-1', 'd2-2-2')
FULL_ONLY_BLOCKS = ('stage1_block2', 'stage2_block2', 'stage3_block2')


def _fast_compile(fn, *args):
  """jit-compiles ``fn``; on CPU with XLA's cheap optimisation level.

  The default level spends ~50 s compiling the init's PRNG and the three backward
  passes on a 2-core CPU, the cheap one under half of that. The gradient tests
  assert exact zeros, non-zeros and finiteness, none of which depends on how XLA
  optimises (exact zeros come from JAX's symbolic zero cotangents).
  """
  options = {}
  if jax.default_backend() == 'cpu':
    options = {'xla_backend_optimization_level': 0,
               'xla_llvm_disable_expensive_passes': True}
  return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


@functools.cache
def _model_grads():
  """Gradients of the KD part (stop_gradient on/off) and of the total loss."""
  model = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.5)
  rng = np.random.default_rng(0)
  images = jnp.asarray(_f32(rng, (4, 32, 32, 3)))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=4).astype(np.int32))
  variables = _fast_compile(
      lambda key, x: models.init_variables(model, key, x, list(MODEL_DEPTHS)),
      jax.random.key(0), images)
  params = variables['params']
  others = {k: v for k, v in variables.items() if k != 'params'}

  def terms_of(p, config):
    outputs, _ = model.apply({'params': p, **others}, images, MODEL_DEPTHS, True,
                             method=model.forward_depths, mutable=['batch_stats'])
    return losses.ekd_loss(outputs, MODEL_DEPTHS, labels, (3, 3, 3), config)

  def kd_part(p, config):
    _, terms = terms_of(p, config)
    return sum(config.alpha * terms[f'{t}/kl'] + config.beta * terms[f'{t}/at']
               for t in STUDENT_TAGS)

  def total_loss(p, config):
    return terms_of(p, config)[0]

  sg = losses.EKDConfig(alpha=1.0, beta=1.0, attention='zscore_sum',
                        stop_gradient=True)
  nosg = dataclasses.replace(sg, stop_gradient=False)

  def all_grads(p):
    return {
        'kd_sg': jax.value_and_grad(kd_part)(p, sg),
        'kd_nosg': jax.value_and_grad(kd_part)(p, nosg),
        'total_sg': jax.value_and_grad(total_loss)(p, sg),
    }

  return jax.device_get(params), jax.device_get(_fast_compile(all_grads, params))


def _leaves_with_paths(tree):
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_model_param_layout_has_full_only_blocks():
  params, _ = _model_grads()
  for block in FULL_ONLY_BLOCKS:
    assert block in params
  for s in (1, 2, 3):
    for b in (0, 1):
      assert f'stage{s}_block{b}' in params


def test_kd_grad_zero_on_full_only_params_with_stop_gradient():
  _, grads = _model_grads()
  for name in ('kd_sg',):
    value, grad = grads[name]
    assert np.isfinite(value) and value > 0  # the KD part is active
    for block in FULL_ONLY_BLOCKS:
      leaves = _leaves_with_paths(grad[block])
      assert leaves
      for path, leaf in leaves:
        assert np.all(leaf == 0.0), f'{name}: {block}{path} has gradient ' \
                                    f'{np.abs(leaf).max()}'
    # Shared (sub-net) parameters do get a KD gradient.
    shared = np.concatenate([leaf.ravel() for _, leaf in _leaves_with_paths(
        {k: v for k, v in grad.items() if k not in FULL_ONLY_BLOCKS})])
    assert np.isfinite(shared).all()
    assert np.abs(shared).max() > 0


def test_kd_grad_reaches_full_only_params_without_stop_gradient():
  _, grads = _model_grads()
  value_sg = grads['kd_sg'][0]
  value, grad = grads['kd_nosg']
  # stop_gradient changes gradients only, not values.
  np.testing.assert_allclose(value, value_sg, rtol=1e-6)
  for block in FULL_ONLY_BLOCKS:
    leaves = np.concatenate([leaf.ravel() for _, leaf in _leaves_with_paths(grad[block])])
    assert np.isfinite(leaves).all()
    assert np.abs(leaves).max() > 0, f'no KD gradient reaches {block}'


def test_total_loss_grad_finite_and_reaches_full_only_params():
  params, grads = _model_grads()
  value, grad = grads['total_sg']
  assert np.isfinite(value) and value > 0
  assert jax.tree.structure(grad) == jax.tree.structure(params)
  for path, leaf in _leaves_with_paths(grad):
    assert np.isfinite(leaf).all(), path
  for block in FULL_ONLY_BLOCKS:
    leaves = np.concatenate([leaf.ravel() for _, leaf in _leaves_with_paths(grad[block])])
    assert np.abs(leaves).max() > 0, f'no CE gradient reaches {block}'
  # With stop_gradient, the total's gradient on full-net-only params equals the
  # teacher CE's gradient: total - KD part has the same gradient there.
  kd_grad = grads['kd_sg'][1]
  for block in FULL_ONLY_BLOCKS:
    for (path, g_total), (_, g_kd) in zip(_leaves_with_paths(grad[block]),
                                          _leaves_with_paths(kd_grad[block])):
      np.testing.assert_array_equal(g_kd, 0.0)
      assert np.abs(g_total).max() > 0 or g_total.size == 0, path


@pytest.mark.parametrize('student_ce,kd_scale', [(0.0, 1.0), (0.5, 0.3), (1.0, 0.0067)])
def test_ekd_loss_student_ce_and_kd_scale_match_reference(student_ce, kd_scale):
  outputs, labels = _random_outputs(3)
  config = losses.EKDConfig(alpha=0.7, beta=1.3, temperature=1.0, student_ce=student_ce)
  total, terms = losses.ekd_loss(_to_jax(outputs), DEPTHS, jnp.asarray(labels), TEACHER,
                                 config, kd_scale=kd_scale)
  want_total, want_terms = np_ekd(outputs, DEPTHS, labels, TEACHER, 0.7, 1.3, 1.0,
                                  'zscore_sum', 'all', student_ce, kd_scale)
  for key, want in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), want, rtol=RTOL, atol=ATOL, err_msg=key)
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)
  # The teacher keeps its full cross-entropy whatever the sub-nets' weight.
  np.testing.assert_allclose(float(terms['d3-3-3/loss']), want_terms['d3-3-3/ce'],
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('full_ce', [0.0, 2.0])
def test_ekd_loss_full_ce_weights_only_the_full_net_as_the_reference(full_ce):
  outputs, labels = _random_outputs(3)
  config = losses.EKDConfig(alpha=0.7, beta=1.3, temperature=2.0, full_ce=full_ce)
  total, terms = losses.ekd_loss(_to_jax(outputs), DEPTHS, jnp.asarray(labels), TEACHER,
                                 config, kd_scale=0.5)
  want_total, want_terms = np_ekd(outputs, DEPTHS, labels, TEACHER, 0.7, 1.3, 2.0,
                                  'zscore_sum', 'all', 1.0, 0.5, full_ce)
  for key, want in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), want, rtol=RTOL, atol=ATOL, err_msg=key)
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(terms['d3-3-3/loss']), full_ce * want_terms['d3-3-3/ce'],
                             rtol=RTOL, atol=ATOL)


def test_sigmoid_rampup_values():
  steps = jnp.array([0, 25, 50, 100, 150])
  got = np.asarray(jax.vmap(lambda s: losses.sigmoid_rampup(s, 100))(steps))
  t = np.array([0.0, 0.25, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(got, np.exp(-5.0 * (1.0 - t) ** 2), rtol=1e-6)
  assert float(losses.sigmoid_rampup(jnp.int32(7), 0)) == 1.0  # no ramp-up


def test_method_ramps_kd_terms_with_the_step():
  from configs import cifar10_folder
  from ddnn_jax import methods

  config = cifar10_folder.get_config()
  config.ekd.rampup_epochs = 2.0
  outputs, labels = _random_outputs(4)
  unramped = methods.create_method(config, NUM_CLASSES)  # enough to evaluate
  with pytest.raises(ValueError, match='steps_per_epoch'):
    unramped.objective(_to_jax(outputs), jnp.asarray(labels), jnp.int32(0))
  method = methods.create_method(config, NUM_CLASSES, steps_per_epoch=10)
  scales = []
  for step in (0, 10, 20, 30):
    _, terms = method.objective(_to_jax(outputs), jnp.asarray(labels), jnp.int32(step))
    scales.append(float(terms['kd_scale']))
  np.testing.assert_allclose(scales, np.exp(-5.0 * (1.0 - np.array([0, .5, 1, 1])) ** 2),
                             rtol=1e-6)
  config.method = 'joint_ce'  # no KD terms, nothing to ramp
  _, terms = methods.create_method(config, NUM_CLASSES).objective(
      _to_jax(outputs), jnp.asarray(labels), jnp.int32(0))
  assert 'kd_scale' not in terms


# ---------------------------------------------------------------------------
# Bad configurations.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs', [
    dict(attention='nope'), dict(attention='ZSCORE_SUM'), dict(stages='x'),
    dict(stages='first'), dict(temperature=0), dict(temperature=0.0),
    dict(temperature=-1.0), dict(temperature=float('nan')), dict(alpha=-0.1),
    dict(beta=float('nan')), dict(alpha=float('inf')), dict(student_ce=-1.0), dict(full_ce=-0.5),
    dict(rampup_epochs=-2.0), dict(rampup_epochs=float('nan'))])
def test_bad_config_raises(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    losses.EKDConfig(**kwargs)


def test_good_configs_accepted():
  for kind in losses.ATTENTION_KINDS:
    for stages in losses.STAGE_SETS:
      cfg = losses.EKDConfig(attention=kind, stages=stages, temperature=0.5)
      assert cfg.attention == kind and cfg.stages == stages
  cfg = losses.EKDConfig()
  assert (cfg.alpha, cfg.beta, cfg.temperature, cfg.attention, cfg.stages,
          cfg.stop_gradient) == (1.0, 1.0, 3.0, 'zscore_sum', 'all', True)


def test_teacher_not_in_depths_raises():
  outputs, labels = _random_outputs(0)
  with pytest.raises(ValueError):
    losses.ekd_loss(_to_jax(outputs), DEPTHS, jnp.asarray(labels), (3, 3, 2))
  with pytest.raises(ValueError):
    losses.ekd_loss(_to_jax(outputs[:2]), DEPTHS[:2], jnp.asarray(labels), TEACHER)


def test_duplicate_depths_raise():
  outputs, labels = _random_outputs(0)
  with pytest.raises(ValueError):
    losses.ekd_loss(_to_jax(outputs), [(1, 1, 1), (1, 1, 1), (3, 3, 3)],
                    jnp.asarray(labels), TEACHER)
  with pytest.raises(ValueError):  # list and tuple spellings are the same depth
    losses.ekd_loss(_to_jax(outputs), [[3, 3, 3], (1, 1, 1), (3, 3, 3)],
                    jnp.asarray(labels), TEACHER)


def test_outputs_and_depths_must_pair_up():
  outputs, labels = _random_outputs(0)
  with pytest.raises(ValueError, match='2 outputs for 3 depths'):
    losses.ekd_loss(_to_jax(outputs[:2]), DEPTHS, jnp.asarray(labels), TEACHER)


def test_zero_weight_keeps_a_non_finite_term_out_of_the_loss():
  outputs, labels = _random_outputs(0)
  outputs = _to_jax(outputs)
  student = outputs[0]
  bad = models.DepthOutput(student.logits, tuple(
      jnp.full_like(f, jnp.nan) for f in student.features))
  cfg = losses.EKDConfig(alpha=1.0, beta=0.0)
  total, terms = losses.ekd_loss((bad, *outputs[1:]), DEPTHS, jnp.asarray(labels),
                                 TEACHER, cfg)
  assert np.isnan(float(terms['d1-1-1/at']))  # reported ...
  assert np.isfinite(float(total))  # ... but not added
  expected = sum(float(terms[f'{models.depth_tag(d)}/ce']) for d in DEPTHS) + sum(
      float(terms[f'{models.depth_tag(d)}/kl']) for d in DEPTHS if d != TEACHER)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
