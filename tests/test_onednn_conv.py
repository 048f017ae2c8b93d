"""oneDNN convolutions against XLA's: outputs and both gradients, then whole models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddnn_jax import costs, losses, models, onednn_conv

pytestmark = pytest.mark.skipif(not onednn_conv.available(),
                                reason='oneDNN convolution could not be built here')

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(impl, x, w, strides, padding):
  fn = onednn_conv.conv_general_dilated(impl)
  return fn(x, w, strides, padding, dimension_numbers=NHWC)


# (input NHWC, kernel HWIO, strides, padding): every kind of convolution the
# ResNet presets use (3x3 / 1x1, stride 1 / 2, the 7x7/2 ImageNet stem, the
# 3-channel CIFAR stem), odd sizes and uneven padding.
CASES = [
    ((4, 32, 32, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1))),
    ((4, 16, 16, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    ((4, 16, 16, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
    ((4, 16, 16, 8), (1, 1, 8, 16), (2, 2), 'VALID'),
    ((2, 23, 19, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ((3, 9, 11, 5), (3, 2, 5, 7), (1, 2), ((2, 0), (0, 1))),
    ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), 'SAME'),
]


@pytest.mark.parametrize('x_shape,w_shape,strides,padding', CASES)
def test_matches_xla_forward_and_gradients(x_shape, w_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
  w = jnp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
  # A non-uniform cotangent, so the gradients depend on every output position.
  def loss(impl, x, w):
    y = _conv(impl, x, w, strides, padding)
    return jnp.sum(jnp.sin(y))

  want = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  got = jax.jit(functools.partial(_conv, 'onednn'), static_argnums=(2, 3))(
      x, w, strides, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  want_grads = jax.grad(functools.partial(loss, 'xla'), (0, 1))(x, w)
  got_grads = jax.jit(jax.grad(functools.partial(loss, 'onednn'), (0, 1)))(x, w)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


def test_vmap_and_jacrev_match_xla():
  # jax.jacrev vmaps the backward pass over its cotangents; the custom call
  # then runs once per mapped element.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6), dtype=np.float32))
  pad = ((1, 1), (1, 1))

  def outputs(impl, w, x):
    y = _conv(impl, x, w, (1, 1), pad)
    return jnp.stack([jnp.sum(jnp.sin(y)), jnp.sum(y * y)])

  want = jax.vmap(lambda xi: _conv('xla', xi, w, (1, 1), pad))(x)
  got = jax.jit(jax.vmap(lambda xi: _conv('onednn', xi, w, (1, 1), pad)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  want_jac = jax.jacrev(functools.partial(outputs, 'xla'))(w, x[0])
  got_jac = jax.jit(jax.jacrev(functools.partial(outputs, 'onednn')))(w, x[0])
  np.testing.assert_allclose(got_jac, want_jac, rtol=1e-4,
                             atol=1e-3 * float(jnp.abs(want_jac).max()))


def test_unsupported_convolutions_fall_back_to_xla():
  x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  fn = onednn_conv.conv_general_dilated('onednn')
  hlo = jax.jit(lambda x, w: fn(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)).lower(
      x, w).as_text()
  assert 'ddnn_conv' not in hlo and 'convolution' in hlo
  grouped = jax.jit(lambda x, w: fn(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                    feature_group_count=2)).lower(
      jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 4))).as_text()
  assert 'ddnn_conv' not in grouped


def test_onednn_program_calls_the_kernels_and_xla_program_does_not():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  texts = {impl: jax.jit(jax.value_and_grad(lambda x, w, impl=impl: _conv(
      impl, x, w, (1, 1), 'SAME').sum(), (0, 1))).lower(x, w).as_text()
           for impl in ('onednn', 'xla')}
  for target in ('forward', 'input_grad', 'kernel_grad'):
    assert f'ddnn_conv_{target}' in texts['onednn']
  assert 'ddnn_conv' not in texts['xla']


def test_unknown_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown conv_impl 'cudnn'"):
    models.create_model('cifar_resnet20', 10, conv_impl='cudnn')


def test_ekd_loss_and_gradients_of_a_whole_ddnn_match_xla():
  """The EKD objective of cifar_resnet20 (stem, strided and projection convs)."""
  depths = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.standard_normal((16, 32, 32, 3), dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
  results = {}
  for impl in ('xla', 'onednn'):
    model = models.create_model('cifar_resnet20', 10, width_multiplier=0.5,
                                conv_impl=impl)
    variables = models.init_variables(model, jax.random.key(0), images[:1], depths)

    def loss_fn(params, model=model, variables=variables):
      outputs, _ = model.apply({**variables, 'params': params}, images, depths, True,
                               method=model.forward_depths, mutable=['batch_stats'])
      return losses.ekd_loss(outputs, depths, labels, depths[-1])[0]

    results[impl] = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  (loss_x, grads_x), (loss_o, grads_o) = results['xla'], results['onednn']
  np.testing.assert_allclose(loss_o, loss_x, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * float(jnp.abs(r).max()) + 1e-6)


def test_flop_counts_see_the_convolutions_whatever_the_impl():
  """XLA's cost analysis cannot see into the custom calls; costs.py must not care."""
  flops = {}
  for impl in ('xla', 'onednn'):
    model = models.create_model('cifar_resnet20', 10, width_multiplier=0.5,
                                conv_impl=impl)
    variables = costs.abstract_variables(model, 32)
    flops[impl] = costs.compiled_flops(model, variables, (2, 2, 2), 32)
  assert flops['onednn'] == flops['xla'] > 1e6
