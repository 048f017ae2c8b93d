"""Any-depth training (ddnn_jax/any_depth.py): the sampler keyed on (seed,
step), the sandwich step against one program over the same depths, an exact
resume, and the bounded number of compiled programs."""

import json

import jax
import method_runs as runs
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import default
from ddnn_jax import any_depth, config_lib, experiment, export, losses, release, train
from ddnn_jax import mesh as mesh_lib

NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32
FULL20 = (3, 3, 3)


def rule(full=FULL20, depths=((1, 1, 1), FULL20), k=2, max_programs=32, seed=0):
  return any_depth.build(full, depths, k, max_programs, seed, objective_for=None)


def test_the_space_holds_every_depth_of_each_stage():
  space = any_depth.depth_space((3, 4, 6, 3))
  assert len(space) == len(set(space)) == 3 * 4 * 6 * 3
  assert (1, 1, 1, 1) in space and (3, 4, 6, 3) in space
  assert all(1 <= b <= n for d in space for b, n in zip(d, (3, 4, 6, 3)))


def test_the_base_is_the_full_net_and_the_smallest_configured_depth():
  assert rule(depths=((2, 2, 2), (1, 2, 1), FULL20)).base_depths == ((1, 2, 1), FULL20)
  alone = rule(depths=(FULL20,))
  assert alone.base_depths == (FULL20,) and len(alone.pool) == 26


def test_the_sampler_is_a_function_of_seed_and_step_alone():
  a, b = rule(k=3), rule(k=3)
  assert len(a.pool) == 25 and set(a.pool).isdisjoint(a.base_depths)  # 27 minus 2
  draws = [a.sample(step) for step in range(300)]
  assert draws == [b.sample(step) for step in range(300)]  # another process, a resume
  assert all(len(set(d)) == 3 and set(d) <= set(a.pool) for d in draws)
  assert len(set(draws)) > 250  # steps draw differently ...
  assert set().union(*draws) == set(a.pool)  # ... and cover the pool
  assert [rule(k=3, seed=1).sample(s) for s in range(300)] != draws


def test_a_space_larger_than_the_cap_is_pooled_once_from_the_seed():
  r34 = dict(full=(3, 4, 6, 3), depths=((1, 1, 1, 1), (3, 4, 6, 3)), max_programs=10)
  pooled = rule(**r34)
  assert len(pooled.pool) == pooled.max_programs == 10 and pooled.space_size == 216
  assert pooled.pool == rule(**r34).pool != rule(**r34, seed=1).pool
  assert set().union(*(pooled.sample(s) for s in range(500))) == set(pooled.pool)


def test_k_larger_than_the_pool_is_refused_with_the_fix():
  with pytest.raises(ValueError, match=r'any_depth\.k=4 exceeds the 3 depths .* raise '
                     r'--config\.any_depth\.max_programs'):
    rule(k=4, max_programs=3)


def _batch(mesh):
  rng = np.random.default_rng(0)
  return mesh_lib.global_batch({
      'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
      'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}, mesh)


@pytest.mark.parametrize('method, beta', [('ekd', 0.5), ('joint_ce', 0.0)])
def test_one_sandwich_step_is_the_update_of_one_program_over_the_same_depths(method, beta):
  config = default.get_config('smoke')
  # Width 0.5, not the smoke width: at 2 channels a stage's BatchNorm can see
  # a near-constant channel, and its gradient then amplifies rounding (even a
  # jitted and an eager gradient of the same loss differ by 10%).
  config.update_from_flattened_dict({'method': method, 'ekd.beta': beta,
                                     'any_depth.k': 2, 'optim.warmup_epochs': 0.0,
                                     'model.width_multiplier': 0.5})
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(config, mesh, DATA)
  sandwich, state, batch = train.make_train_step(exp), exp.init_state(), _batch(mesh)
  assert isinstance(sandwich, any_depth.SandwichStep)
  # The reference: the EKD loss of every depth the step trains, in one program.
  smallest, full = exp.method.any_depth.base_depths
  depths = (smallest, *exp.method.any_depth.sample(0), full)
  ekd, kd_scale = exp.method.ekd, losses.sigmoid_rampup(0, exp.method.rampup_steps)

  def loss(params):
    outputs, _ = exp.model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], depths, True,
        method=exp.model.forward_depths, mutable=['batch_stats'])
    return losses.ekd_loss(outputs, depths, batch['label'], full, ekd, kd_scale)[0]

  ref_loss, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  updates, _ = exp.tx.update(grads, state.opt_state, state.params)
  expected = jax.device_get(optax.apply_updates(state.params, updates))
  new, metrics = sandwich(state, batch)
  np.testing.assert_allclose(float(metrics['train/loss']), float(ref_loss), rtol=1e-5)
  got = traverse_util.flatten_dict(jax.device_get(new.params), sep='/')
  for name, want in traverse_util.flatten_dict(expected, sep='/').items():
    np.testing.assert_allclose(got[name], want, atol=1e-5, err_msg=name)
  assert int(new.step) == 1 and metrics['train/any_depth_programs'] == 2
  assert metrics['train/sampled_blocks'] == np.mean([sum(d) for d in depths[1:-1]])


def _smoke_any_depth():
  config = default.get_config('smoke')
  config.update_from_flattened_dict({'any_depth.k': 2, 'any_depth.max_programs': 3})
  return config


@pytest.fixture(scope='module')
def any_depth_run(tmp_path_factory):
  """The smoke config trained with any-depth training: its workdir."""
  workdir = str(tmp_path_factory.mktemp('any_depth') / 'run')
  train.train_and_evaluate(_smoke_any_depth(), workdir)
  return workdir


def test_an_interrupted_run_resumes_exactly_with_a_bounded_program_count(any_depth_run,
                                                                         tmp_path):
  full_run = any_depth_run
  runs.interrupted_run(_smoke_any_depth(), str(tmp_path / 'resumed'), stop_at=4)
  runs.assert_same_variables(full_run, str(tmp_path / 'resumed'))
  # The programs compiled: the distinct depths drawn, never more than the pool.
  programs = runs.read_scalars(full_run, 'train/any_depth_programs')
  last = max(programs)
  drawn = {d for s in range(last) for d in rule(max_programs=3).sample(s)}
  assert programs[last] == len(drawn) <= 3
  assert all(v <= 3 for v in programs.values())
  with open(f'{full_run}/eval_test.json') as f:
    assert json.load(f)['any_depth'] == {
        'k': 2, 'base': [[1, 1, 1], [3, 3, 3]], 'pool': 3, 'space': 27, 'max_programs': 3,
        'programs_compiled_by_this_process': len(drawn)}


def test_a_release_and_an_export_of_the_run_evaluate_without_the_rule(any_depth_run, tmp_path):
  # Neither trains: their configs switch any-depth training off, so evaluate
  # builds them (a release's per-depth BatchNorm would otherwise be refused).
  released, exported = str(tmp_path / 'release'), str(tmp_path / 'export')
  release.release(any_depth_run, released, recalibrate_bn=2)
  assert runs.run_cli(export, '--workdir', any_depth_run, '--depth', '2,3,1', '--format',
                      'checkpoint', '--out', exported, '--recalibrate_bn', '2') == 0
  for workdir in (released, exported):
    assert config_lib.load_saved(workdir).any_depth.k == 0
    assert runs.evaluate_cli('--workdir', workdir) == 0
