"""Methods as plug-ins: the registry, and what the interface carries, shown by
plug-ins registered here (peers of two architectures trained together; a frozen
teacher restored from another workdir with a two-phase objective)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddnn_jax import checkpointing, experiment, losses, methods, models, train
from ddnn_jax import mesh as mesh_lib

NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32


def smoke(**fields):
  config = default.get_config('smoke')
  config.update(fields)
  return config


def batch(seed: int, mesh) -> dict:
  rng = np.random.default_rng(seed)
  return mesh_lib.global_batch({
      'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
      'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}, mesh)


def numpy_ce(logits, labels) -> float:
  logits = np.asarray(logits, np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                          keepdims=True)) - logits.max(-1, keepdims=True)
  return float(-log_p[np.arange(len(labels)), labels].mean())


def numpy_kl(teacher_logits, student_logits, temperature: float) -> float:
  """KL(softmax(t / T) || softmax(s / T)), mean over the batch, in float64."""
  def log_softmax(x):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  log_t, log_s = log_softmax(teacher_logits), log_softmax(student_logits)
  return float((np.exp(log_t) * (log_t - log_s)).sum(-1).mean())


def test_the_registry_builds_the_three_methods_and_names_them_on_error():
  assert {'ekd', 'joint_ce', 'individual'} <= set(methods.names())
  ekd = methods.create_method(smoke(), NUM_CLASSES, 10)
  assert ekd.depths == ((1, 1, 1), (2, 2, 2), (3, 3, 3))
  assert ekd.ekd.alpha == 1.0 and ekd.rampup_steps == 10  # 1 epoch of ramp-up
  joint = methods.create_method(smoke(method='joint_ce'), NUM_CLASSES, 10)
  assert joint.depths == ekd.depths and joint.ekd.alpha == joint.ekd.beta == 0.0
  alone = methods.create_method(smoke(method='individual', individual_depth=(2, 1, 1)),
                                NUM_CLASSES, 10)
  assert alone.depths == ((2, 1, 1),) and alone.model.stage_sizes == (2, 1, 1)
  with pytest.raises(ValueError, match=r"unknown method 'ekdd'.*'joint_ce'"):
    methods.create_method(smoke(method='ekdd'), NUM_CLASSES)
  with pytest.raises(ValueError, match='registered twice'):
    methods.register('ekd')(lambda *a: None)


# --------------------------------------------------- peers of two architectures


class Peers(nn.Module):
  """Two standalone nets of different depth and width, trained side by side;
  member (i,) is net i."""
  nets: tuple[models.DDNNResNet, ...]

  @property
  def full_depth(self) -> tuple[int]:
    return (len(self.nets) - 1,)

  def check_depth(self, member) -> tuple[int]:
    return tuple(member)

  def forward_depths(self, images, members, train: bool = False):
    return tuple(self.nets[i].forward_depths(images, (self.nets[i].full_depth,), train)[0]
                 for (i,) in members)


def peer_nets():
  return (models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125,
                              stage_sizes=(1, 1, 1)),
          models.create_model('cifar_resnet32', NUM_CLASSES, width_multiplier=0.25))


@methods.register('test_mutual_peers')
def build_peers(config, num_classes, steps_per_epoch=None):
  """Deep mutual learning: each peer's CE plus KL from the other (detached)."""
  del config, num_classes, steps_per_epoch

  def objective(outputs, labels, step, *, teacher_outputs=None):
    del step, teacher_outputs
    a, b = (o.logits for o in outputs)
    ce = [losses.cross_entropy(x, labels) for x in (a, b)]
    kl = [losses.kl_divergence(jax.lax.stop_gradient(t), s, 1.0) for t, s in ((b, a), (a, b))]
    return sum(ce) + sum(kl), {'ce_a': ce[0], 'ce_b': ce[1], 'kl_a': kl[0], 'kl_b': kl[1]}

  return methods.Method(Peers(peer_nets()), ((0,), (1,)), objective)


def test_a_plugin_with_two_peer_architectures_trains_in_the_one_train_step():
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(smoke(method='test_mutual_peers'), mesh, DATA)
  state = exp.init_state()
  assert set(state.params['nets_0']) != set(state.params['nets_1'])  # two architectures
  step = train.make_train_step(exp)
  b = batch(0, mesh)
  # The loss against a reference built from each net on its own.
  nets = peer_nets()
  logits = [net.apply({'params': state.params[f'nets_{i}'],
                       'batch_stats': state.batch_stats[f'nets_{i}']},
                      b['image'], None, True, mutable=['batch_stats'])[0]
            for i, net in enumerate(nets)]
  params = jax.device_get(state.params)  # the step donates the state's buffers
  new_state, metrics = step(state, b)
  labels = np.asarray(b['label'])
  expected = (numpy_ce(logits[0], labels) + numpy_ce(logits[1], labels)
              + numpy_kl(logits[1], logits[0], 1.0) + numpy_kl(logits[0], logits[1], 1.0))
  np.testing.assert_allclose(float(metrics['train/loss']), expected, rtol=1e-4)
  for name in ('nets_0', 'nets_1'):
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()),
                                         params[name], new_state.params[name]))
    assert max(moved) > 0
  assert set(metrics) >= {'train/d0/accuracy', 'train/d1/accuracy', 'train/kl_b'}


# ------------------------------- a frozen teacher from another workdir, two phases

TEMPERATURE = 2.0
KD_FROM_STEP = 2


def teacher_workdir(tmp_path) -> str:
  """A workdir holding a (randomly initialised) DDNN's checkpoint at step 0,
  with shared norm layers, as the plug-in below builds its teacher."""
  config = smoke()
  config.model.bn_mode = 'shared'
  exp = experiment.build(config, mesh_lib.create_mesh(), DATA)
  manager = checkpointing.create_manager(str(tmp_path / 'teacher'), async_save=False)
  checkpointing.save(manager, 0, exp.init_state(jax.random.key(7)))
  manager.close()
  return str(tmp_path / 'teacher')


@methods.register('test_offline_kd')
def build_offline_kd(config, num_classes, steps_per_epoch=None):
  """Depth (1,1,1) alone, taught by the full depth of a DDNN restored from
  `config.teacher_workdir`: cross-entropy only for KD_FROM_STEP steps, then
  cross-entropy plus T^2 KL to the teacher."""
  del steps_per_epoch
  teacher_model = methods.create_model(config, num_classes)
  variables, _ = checkpointing.read_variables(config.teacher_workdir)
  teacher = methods.Teacher(teacher_model, variables, (teacher_model.full_depth,))
  student = methods.create_model(config, num_classes, stage_sizes=(1, 1, 1))

  def ce_only(outputs, labels, step, *, teacher_outputs):
    del step, teacher_outputs
    return losses.cross_entropy(outputs[0].logits, labels), {}

  def with_kd(outputs, labels, step, *, teacher_outputs):
    del step
    ce = losses.cross_entropy(outputs[0].logits, labels)
    kl = losses.kl_divergence(teacher_outputs[0].logits, outputs[0].logits, TEMPERATURE)
    return ce + kl, {'kl': kl}

  objective = methods.phased((0, ce_only), (KD_FROM_STEP, with_kd))
  return methods.Method(student, (student.full_depth,), objective, teacher=teacher)


def test_a_frozen_teacher_from_another_workdir_and_a_two_phase_objective(tmp_path):
  mesh = mesh_lib.create_mesh()
  config = smoke(method='test_offline_kd')
  with config.unlocked():
    config.teacher_workdir = teacher_workdir(tmp_path)
  exp = experiment.build(config, mesh, DATA)
  (teacher_variables,) = exp.step_args
  saved, _ = checkpointing.read_variables(config.teacher_workdir)
  step = train.make_train_step(exp)
  state = exp.init_state()
  # The teacher's variables are arguments of the program, not constants in it.
  lowered = step.lower(state, batch(0, mesh), *exp.step_args)
  assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(
      (state, batch(0, mesh), teacher_variables)))
  teacher = exp.method.teacher
  for i in range(4):
    b = batch(i, mesh)
    student_logits = exp.model.apply(state.variables, b['image'], None, True,
                                     mutable=['batch_stats'])[0]
    state, metrics = step(state, b, *exp.step_args)
    assert int(metrics['train/phase']) == int(i >= KD_FROM_STEP)
    teacher_logits = teacher.model.apply(saved, b['image'])
    labels = np.asarray(b['label'])
    expected = numpy_ce(student_logits, labels)
    if i >= KD_FROM_STEP:
      expected += TEMPERATURE**2 * numpy_kl(teacher_logits, student_logits, TEMPERATURE)
    else:
      assert float(metrics['train/kl']) == 0.0
    np.testing.assert_allclose(float(metrics['train/loss']), expected, rtol=1e-4)
  # The teacher was not trained (and its buffers were not donated).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_variables), saved)


def test_phases_must_start_at_zero_and_increase():
  objective = lambda outputs, labels, step: (0.0, {})  # noqa: E731
  with pytest.raises(ValueError, match='must begin at 0'):
    methods.phased((1, objective))
  with pytest.raises(ValueError, match='must begin at 0'):
    methods.phased((0, objective), (0, objective))


def test_a_method_record_is_frozen():
  method = methods.create_method(smoke(), NUM_CLASSES, 10)
  with pytest.raises(dataclasses.FrozenInstanceError):
    method.depths = ()


@pytest.mark.parametrize('method, fields, expected', [
    ('ekd', {}, 'private_all'),          # the 30-epoch study's best EKD setting
    ('ekd', {'any_depth.k': 2}, 'shared'),  # any-depth training needs shared norms
    ('joint_ce', {}, 'shared'),
    ('individual', {}, 'shared'),
    ('one', {}, 'shared'),
    ('mcod', {}, 'shared'),
    ('depth_pruning', {}, 'shared'),
    ('indistill', {}, 'shared'),
    ('offline_kd', {}, 'shared'),
    ('ekd', {'model.bn_mode': 'shared'}, 'shared'),  # an explicit mode wins
    ('joint_ce', {'model.bn_mode': 'private_stats'}, 'private_stats'),
])
def test_auto_bn_mode_is_each_methods_own(method, fields, expected):
  config = smoke(method=method)
  assert config.model.bn_mode == methods.BN_AUTO
  for field, value in fields.items():
    section, name = field.split('.')
    config[section][name] = value
  assert methods.bn_mode(config) == expected
  assert methods.create_model(config, NUM_CLASSES).bn_mode == expected
  methods.resolve_bn_mode(config)
  assert config.model.bn_mode == expected


def test_a_resumed_run_keeps_the_bn_mode_it_started_with():
  """'auto' may name another mode than when the run started (the default
  changed): the run's config.json decides."""
  config, saved = smoke(method='ekd'), smoke(method='ekd')
  saved.model.bn_mode = 'shared'
  methods.resolve_bn_mode(config, saved)
  assert config.model.bn_mode == 'shared'
  explicit = smoke(method='ekd')
  explicit.model.bn_mode = 'private_stats'   # asked for: checked against the run as before
  methods.resolve_bn_mode(explicit, saved)
  assert explicit.model.bn_mode == 'private_stats'


def test_a_method_registered_with_an_unknown_bn_mode_is_refused():
  with pytest.raises(ValueError, match="bn_mode 'private' is not one of"):
    methods.register('nowhere', bn_mode='private')


def test_a_shared_bn_only_method_refuses_every_per_depth_mode_with_its_reason():
  """register(shared_bn_only=WHY): create_method refuses the per-depth modes
  before the builder runs, in one line that says why and names the fix."""
  built = []

  @methods.register('shared_only_probe', shared_bn_only='trains one net per depth')
  def build(config, num_classes, steps_per_epoch=None):
    built.append(config.model.bn_mode)
    return methods.create_method(smoke(method='individual'), num_classes, steps_per_epoch)

  for mode in set(models.BN_MODES) - {'shared'}:
    config = smoke(method='shared_only_probe')
    config.model.bn_mode = mode
    with pytest.raises(ValueError, match=(
        rf"method 'shared_only_probe' trains one net per depth, so model.bn_mode='{mode}' "
        r'means nothing; pass --config.model.bn_mode=shared$')):
      methods.create_method(config, NUM_CLASSES, 10)
  assert not built
  for mode in ('shared', 'auto'):
    config = smoke(method='shared_only_probe')
    config.model.bn_mode = mode
    methods.create_method(config, NUM_CLASSES, 10)
  assert built == ['shared', 'auto']
  with pytest.raises(ValueError, match="takes shared BatchNorm only, so its bn_mode must be"):
    methods.register('nowhere', bn_mode='private_all', shared_bn_only='why')
