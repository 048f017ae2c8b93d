"""Depth-dynamic ResNets against the standalone nets they must equal."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax import costs, models, subnets

# torchvision's counts for the ImageNet nets (1000-class head).
REFERENCE_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
}

# (deep preset, its depth that equals the shallow preset, shallow preset, image size)
NESTED = [
    ('resnet34', (2, 2, 2, 2), 'resnet18', 224),
    ('resnet101', (3, 4, 6, 3), 'resnet50', 224),
    ('cifar_resnet56', (3, 3, 3), 'cifar_resnet20', 32),
]


def _conv_count(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('stablehlo.convolution')


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _logits(model, variables, images, depth=None, train=False):
  return model.apply(variables, images, depth, train)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _init(model, rng, images, depths=None):
  return models.init_variables(model, rng, images, depths)


def _num_classes(image_size):
  return 1000 if image_size == 224 else 10


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_counts_match_torchvision(name):
  variables = costs.abstract_variables(models.create_model(name, 1000), 224)
  assert models.count_params(variables['params']) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize('name,expected', [
    ('cifar_resnet20', 0.27e6), ('cifar_resnet32', 0.46e6),
    ('cifar_resnet44', 0.66e6), ('cifar_resnet56', 0.85e6)])
def test_cifar_param_counts_near_paper(name, expected):
  variables = costs.abstract_variables(models.create_model(name, 10), 32)
  assert models.count_params(variables['params']) == pytest.approx(expected, rel=0.02)


def test_every_preset_builds_with_its_stage_layout():
  expected = {
      'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3),
      'resnet101': (3, 4, 23, 3), 'resnet152': (3, 8, 36, 3),
      'cifar_resnet20': (3, 3, 3), 'cifar_resnet32': (5, 5, 5),
      'cifar_resnet44': (7, 7, 7), 'cifar_resnet56': (9, 9, 9),
      'cifar_resnet110': (18, 18, 18), 'cifar_resnet18': (2, 2, 2, 2),
      'cifar_resnet34': (3, 4, 6, 3)}
  assert set(expected) == set(models.PRESETS)
  for name, stage_sizes in expected.items():
    model = models.create_model(name, 10)
    assert model.full_depth == stage_sizes
    params = costs.abstract_variables(model, 32)['params']
    blocks = [k for k in params if k.startswith('stage')]
    assert len(blocks) == sum(stage_sizes), name


def test_width_multiplier_scales_channels():
  half = costs.abstract_variables(
      models.create_model('cifar_resnet20', 10, width_multiplier=0.5), 32)
  assert half['params']['stem']['conv']['kernel'].shape == (3, 3, 3, 8)
  assert half['params']['stage3_block0']['conv2']['kernel'].shape == (3, 3, 32, 32)


@pytest.mark.parametrize('deep,depth,shallow,image_size', NESTED)
def test_subnet_flops_equal_standalone(deep, depth, shallow, image_size):
  classes = _num_classes(image_size)
  [sub] = costs.depth_costs(models.create_model(deep, classes), [depth], image_size)
  [alone] = costs.depth_costs(models.create_model(shallow, classes), [None], image_size)
  assert sub.flops == alone.flops > 0
  assert sub.params == alone.params


@pytest.mark.parametrize('deep,depth,shallow,image_size', NESTED)
def test_extracted_subnet_is_the_standalone_net(deep, depth, shallow, image_size):
  classes = _num_classes(image_size)
  deep_model = models.create_model(deep, classes)
  shallow_model = models.create_model(shallow, classes)
  # The parameter tree is checked at the real resolution; logits at a smaller one
  # (the same program up to spatial size) to keep the test fast.
  size = min(image_size, 64)
  images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  deep_vars = _init(deep_model, jax.random.key(0), images)
  sub_vars = subnets.extract_subnet(deep_vars, depth)
  standalone = costs.abstract_variables(shallow_model, image_size)
  assert (jax.tree.structure(sub_vars) == jax.tree.structure(standalone))
  assert jax.tree.map(jnp.shape, sub_vars) == jax.tree.map(jnp.shape, standalone)
  deep_logits = _logits(deep_model, deep_vars, images, depth)
  shallow_logits = _logits(shallow_model, sub_vars, images)
  np.testing.assert_allclose(deep_logits, shallow_logits, atol=1e-5, rtol=0)
  # And it really is a different net from the full one.
  assert np.abs(_logits(deep_model, deep_vars, images) - deep_logits).max() > 1e-3


@pytest.mark.parametrize('depth,message', [
    ((2, 2, 2), 'has 3 entries but the model has 4 stages'),
    ((2, 2, 2, 2, 2), 'has 5 entries'),
    ((0, 2, 2, 2), 'stage 1 has 0 blocks; allowed 1..3'),
    ((3, 5, 6, 3), 'stage 2 has 5 blocks; allowed 1..4'),
    ((3, 4, -1, 3), 'stage 3 has -1 blocks; allowed 1..6'),
    ((3, 4, 6, 4), 'stage 4 has 4 blocks; allowed 1..3'),
    ((2.0, 2, 2, 2), 'stage 1 has 2.0, which is not an integer'),
    ((2, '2', 2, 2), "stage 2 has '2', which is not an integer"),
    ((2, 2, True, 2), 'stage 3 has True, which is not an integer'),
    ('2222', 'must be a sequence of 4 integers'),
    (3, 'must be a sequence of 4 integers'),
])
def test_invalid_depth_raises_naming_stage_and_range(depth, message):
  model = models.create_model('resnet34', 10)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    model.check_depth(depth)
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match='depth'):
    model.init(jax.random.key(0), images, depth)


def test_numpy_integer_depths_are_accepted():
  model = models.create_model('cifar_resnet20', 10)
  assert model.check_depth(np.array([1, 2, 3])) == (1, 2, 3)
  assert all(type(k) is int for k in model.check_depth(np.array([1, 2, 3])))


@pytest.mark.parametrize('kwargs,message', [
    (dict(name='resnet19'), "unknown model 'resnet19'"),
    (dict(bn_mode='private'), "unknown bn_mode 'private'"),
    (dict(width_multiplier=0.0), 'width_multiplier must be > 0'),
    (dict(num_classes=0), 'num_classes must be a positive integer'),
    (dict(head_grad='sub'), "unknown head_grad 'sub'"),
])
def test_create_model_rejects_bad_arguments(kwargs, message):
  args = dict(name='cifar_resnet20', num_classes=10) | kwargs
  with pytest.raises(ValueError, match=message):
    models.create_model(**args)


def test_each_depth_compiles_only_its_blocks():
  model = models.create_model('cifar_resnet56', 10)
  variables = costs.abstract_variables(model, 32)
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for depth in [(1, 1, 1), (4, 2, 9), (9, 9, 9)]:
    forward = functools.partial(model.apply, depth=depth)
    # Stem conv, 2 convs per block run, projections of stages 2 and 3.
    assert _conv_count(forward, variables, images) == 1 + 2 * sum(depth) + 2


# --- BatchNorm modes -------------------------------------------------------

DEPTHS = ((1, 1, 1), (2, 2, 2), (3, 3, 3))


def _bn_setup(bn_mode):
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.5,
                              bn_mode=bn_mode)
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3)) * 2 + 1
  variables = _init(model, jax.random.key(0), images, DEPTHS)
  return model, images, variables


def _train_forward(model, variables, images, depths):
  _, updates = jax.jit(functools.partial(
      model.apply, depths=tuple(depths), train=True, method=model.forward_depths,
      mutable=['batch_stats']))(variables, images)
  return {**variables, **updates}


def test_shared_bn_keeps_one_set_of_statistics():
  model, images, variables = _bn_setup('shared')
  stats = variables['batch_stats']
  assert set(stats['stem']) == {'bn'}
  assert set(stats['stage2_block0']) == {'bn1', 'bn2', 'proj_bn'}
  # Training the shallow depth alone moves the statistics the full net reads.
  updated = _train_forward(model, variables, images, [(1, 1, 1)])
  before = _logits(model, variables, images, (3, 3, 3))
  after = _logits(model, updated, images, (3, 3, 3))
  assert np.abs(before - after).max() > 1e-4


@pytest.mark.parametrize('bn_mode', ['private_stats', 'private_all'])
def test_private_bn_keeps_statistics_per_depth(bn_mode):
  model, images, variables = _bn_setup(bn_mode)
  stats = variables['batch_stats']
  assert set(stats['stem']) == {f'bn_{models.depth_tag(d)}' for d in DEPTHS}
  # Block 1 of a stage is used by depths (2,2,2) and (3,3,3) only.
  assert set(stats['stage1_block1']) == {
      f'{bn}_{models.depth_tag(d)}' for bn in ('bn1', 'bn2') for d in DEPTHS[1:]}
  affine_is_private = bn_mode == 'private_all'
  assert ('bn1' not in variables['params']['stage1_block1']) == affine_is_private

  updated = _train_forward(model, variables, images, [(1, 1, 1)])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables['batch_stats'],
                         updated['batch_stats'])
  for layer, entries in changed.items():
    for name, leaves in entries.items():
      moved = any(jax.tree.leaves(leaves))
      assert moved == name.endswith('_d1-1-1'), (layer, name)
  # Other depths compute exactly what they did before.
  for depth in DEPTHS[1:]:
    np.testing.assert_array_equal(_logits(model, variables, images, depth),
                                  _logits(model, updated, images, depth))
  assert np.abs(_logits(model, variables, images, (1, 1, 1)) -
                _logits(model, updated, images, (1, 1, 1))).max() > 1e-4


@pytest.mark.parametrize('bn_mode', models.BN_MODES)
def test_extract_subnet_from_every_bn_mode(bn_mode):
  model, images, variables = _bn_setup(bn_mode)
  variables = _train_forward(model, variables, images, DEPTHS)  # non-trivial stats
  standalone = models.create_model('cifar_resnet20', 10, width_multiplier=0.5,
                                   stage_sizes=(2, 2, 2))
  sub = subnets.extract_subnet(variables, (2, 2, 2))
  np.testing.assert_allclose(_logits(model, variables, images, (2, 2, 2)),
                             _logits(standalone, sub, images), atol=1e-5, rtol=0)


def test_extract_subnet_needs_the_depths_statistics():
  model, images, variables = _bn_setup('private_stats')
  with pytest.raises(ValueError, match='not for d1-2-3'):
    subnets.extract_subnet(variables, (1, 2, 3))


# --- the fused multi-depth forward ---------------------------------------



def test_fused_forward_matches_separate_forwards():
  model, images, variables = _bn_setup('shared')
  outputs = model.apply(variables, images, DEPTHS, method=model.forward_depths)
  for depth, output in zip(DEPTHS, outputs):
    np.testing.assert_allclose(output.logits, _logits(model, variables, images, depth),
                               atol=1e-5, rtol=0)
    assert [f.shape[1:3] for f in output.features] == [(32, 32), (16, 16), (8, 8)]


def test_fused_forward_runs_the_full_net_once():
  model, images, variables = _bn_setup('shared')
  fused = functools.partial(model.apply, method=model.forward_depths,
                            mutable=['batch_stats'])
  # CIFAR ResNet-20: stem conv + 2 convs per block + a projection conv in the
  # first block of stages 2 and 3.
  full_convs = 1 + 2 * 9 + 2
  assert _conv_count(lambda v, x: fused(v, x, [(3, 3, 3)], True), variables,
                     images) == full_convs
  # (1,1,1) shares the stem and stage1_block0 with the full net; its stage 2 and
  # 3 first blocks see different inputs: 2 x (2 convs + projection).
  assert _conv_count(lambda v, x: fused(v, x, [(1, 1, 1), (3, 3, 3)], True),
                     variables, images) == full_convs + 6
  # Asking for the full depth twice (as teacher and as a member) costs nothing.
  assert _conv_count(lambda v, x: fused(v, x, [(3, 3, 3), (3, 3, 3)], True),
                     variables, images) == full_convs


def _head_and_stem_grads(model, variables, images, depth):
  """|grad| of one depth's summed logits w.r.t. the head and the stem conv."""

  def total(params):
    outputs, _ = model.apply({**variables, 'params': params}, images, (depth,), True,
                             method=model.forward_depths, mutable=['batch_stats'])
    return outputs[0].logits.sum()

  grads = jax.jit(jax.grad(total))(variables['params'])
  return float(optax.global_norm(grads['head'])), float(optax.global_norm(grads['stem']))


def test_head_grad_full_stops_only_the_sub_nets_gradient_at_the_head():
  model, images, variables = _bn_setup('shared')
  frozen = model.clone(head_grad='full')
  # Same logits either way: the stop-gradient changes derivatives only.
  for depth in DEPTHS:
    np.testing.assert_array_equal(_logits(frozen, variables, images, depth),
                                  _logits(model, variables, images, depth))
  for depth in DEPTHS:
    head_all, stem_all = _head_and_stem_grads(model, variables, images, depth)
    head_full, stem_full = _head_and_stem_grads(frozen, variables, images, depth)
    assert head_all > 0 and stem_all > 0
    # The sub-net's gradient still reaches its blocks (the same gradient).
    np.testing.assert_allclose(stem_full, stem_all, rtol=1e-5)
    if depth == model.full_depth:
      np.testing.assert_allclose(head_full, head_all, rtol=1e-6)
    else:
      assert head_full == 0.0


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.create_model('cifar_resnet20', 10, width_multiplier=0.25,
                              dtype='bfloat16')
  images = jnp.ones((2, 32, 32, 3))
  variables = _init(model, jax.random.key(0), images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  outputs = model.apply(variables, images, [(1, 1, 1)], method=model.forward_depths)
  assert outputs[0].logits.dtype == jnp.float32
  assert outputs[0].features[0].dtype == jnp.bfloat16
