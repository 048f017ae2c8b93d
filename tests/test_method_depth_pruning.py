"""Method 'depth_pruning': the two phases' losses, which nets each phase
trains, the cut at the phase boundary (checked against the full net's sub-net
and a key filter written here), a smoke run that resumes bit-identically
across the boundary, a run started from another workdir, and the evaluation
report naming every cut depth."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from ddnn_jax import config_lib, experiment, methods, models, train
from ddnn_jax import mesh as mesh_lib
from ddnn_jax.methods import nets
from tests import method_runs as runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'depth_pruning.py') + ':smoke'
NUM_CLASSES = 10
DATA = experiment.DataSpec(NUM_CLASSES, 8, 320)  # 10 steps per epoch at batch 32
BOUNDARY = 2  # pruning.full_epochs = 0.2 below
CUTS = ((1, 1, 1), (2, 2, 2))
FULL = (3, 3, 3)


def smoke_config(**overrides):
  config = config_lib.load(SMOKE)
  config.update_from_flattened_dict(overrides)
  return config


def batch(seed: int, mesh) -> dict:
  rng = np.random.default_rng(seed)
  return mesh_lib.global_batch({
      'image': rng.standard_normal((32, 8, 8, 3), dtype=np.float32),
      'label': rng.integers(0, NUM_CLASSES, 32).astype(np.int32)}, mesh)


def full_net():
  return models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125)


def numpy_cut(full: dict, depth) -> dict:
  """Stem, head and the first depth[s] blocks of each stage, by key names."""
  def keep(name):
    block = re.fullmatch(r'stage(\d+)_block(\d+)', name)
    return block is None or int(block.group(2)) < depth[int(block.group(1)) - 1]
  return {name: tree for name, tree in full.items() if keep(name)}


def net(tree: dict, member) -> dict:
  return tree[nets.net_name(member)]


def momentum(state) -> dict:
  """The SGD momentum of every parameter (optax.sgd's TraceState)."""
  return jax.device_get(state.opt_state[1][0].trace)


def train_mode_logits(model, variables, images, member):
  return model.apply(variables, images, (member,), True, method=model.forward_depths,
                     mutable=['batch_stats'])[0][0].logits


def test_each_phase_trains_its_nets_and_the_cut_is_the_full_nets_subnet():
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(smoke_config(num_epochs=0.4, **{'pruning.full_epochs': 0.2}), mesh,
                         DATA)  # 4 steps
  method = exp.method
  assert method.depths == (*CUTS, FULL) and [t.step for t in method.transitions] == [BOUNDARY]
  step = train.make_train_step(exp)
  transition = jax.jit(lambda s: methods.apply_transitions(method, exp.tx, s))
  state = exp.init_state()
  for i in range(4):
    b = batch(i, mesh)
    labels = np.asarray(b['label'])
    if i == BOUNDARY:
      before = jax.device_get(state)
      cut = transition(state)
      variables = jax.device_get(cut.variables)
      for depth in CUTS:
        # The cut net holds the full net's leading blocks, bit for bit ...
        for collection in ('params', 'batch_stats'):
          runs.assert_trees_equal(net(variables[collection], depth),
                                numpy_cut(net(before.variables[collection], FULL), depth))
        # ... so before any fine-tuning it computes the full net's sub-net.
        full_variables = {c: net(t, FULL) for c, t in before.variables.items()}
        expected = full_net().apply(full_variables, b['image'], depth)
        np.testing.assert_allclose(exp.model.apply(variables, b['image'], depth),
                                   expected, rtol=1e-5, atol=1e-6)
        # Its optimizer state restarts; the full net's and the step count go on.
        assert all(not x.any() for x in jax.tree.leaves(net(momentum(cut), depth)))
      runs.assert_trees_equal(net(momentum(cut), FULL), net(momentum(before), FULL))
      assert any(x.any() for x in jax.tree.leaves(net(momentum(before), FULL)))
      assert int(cut.opt_state[1][1].count) == int(before.opt_state[1][1].count) == i
    seen = state if i != BOUNDARY else cut
    trained = (FULL,) if i < BOUNDARY else CUTS
    expected = sum(runs.ce(train_mode_logits(exp.model, seen.variables, b['image'], m),
                               labels) for m in trained)
    old = jax.device_get(seen)
    state, metrics = step(state, b)
    np.testing.assert_allclose(float(metrics['train/loss']), expected, rtol=1e-5)
    assert int(metrics['train/phase']) == int(i >= BOUNDARY)
    new = jax.device_get(state)
    for member in (*CUTS, FULL):
      # A frozen net keeps parameters, BN statistics and momentum: no weight
      # decay, no momentum step.
      frozen = member not in trained
      for what, a, b_ in (('params', new.params, old.params),
                          ('batch_stats', new.batch_stats, old.batch_stats),
                          ('momentum', momentum(new), momentum(old))):
        moved = any(not np.array_equal(x, y) for x, y in
                    zip(jax.tree.leaves(net(a, member)), jax.tree.leaves(net(b_, member))))
        assert moved != frozen, (i, member, what)


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """The smoke config: 9 steps, the full net for 4, the cut nets for 5."""
  workdir = str(tmp_path_factory.mktemp('pruning'))
  metrics = train.train_and_evaluate(smoke_config(log_every_steps=1), workdir)
  return workdir, metrics


def test_the_smoke_run_freezes_the_full_net_after_the_cut(smoke_run):
  workdir, metrics = smoke_run
  phases = runs.read_scalars(workdir, 'train/phase')
  assert phases == {s: float(s > 4) for s in range(1, 10)}
  at_cut, _ = runs.variables_at(workdir, 4)
  end, step = runs.variables_at(workdir)
  assert step == 9
  for collection in ('params', 'batch_stats'):
    runs.assert_trees_equal(net(end[collection], FULL), net(at_cut[collection], FULL))
  assert runs.read_scalars(workdir, 'train/d1-1-1/ce').keys() == set(range(1, 10))
  for tag in ('d1-1-1', 'd2-2-2', 'd3-3-3'):
    assert 0 <= metrics[f'{tag}/top1'] <= 1


def test_a_run_preempted_at_the_boundary_resumes_bit_identically(smoke_run, tmp_path):
  workdir = str(tmp_path)
  # Step 4 is the last of the full net: the resumed run's first step cuts.
  runs.interrupted_run(smoke_config(log_every_steps=1), workdir, 4)
  runs.assert_same_variables(workdir, smoke_run[0])


def test_evaluate_reports_every_cut_depth_and_the_full_net(smoke_run, capsys):
  workdir, metrics = smoke_run
  assert runs.evaluate_cli('--workdir', workdir) == 0
  printed = capsys.readouterr().out
  assert '(depth_pruning)' in printed and '| 1,1,1 |' in printed
  with open(os.path.join(workdir, 'eval_test.json')) as f:
    result = json.load(f)
  assert [r['depth'] for r in result['depths']] == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
  for row in result['depths']:
    standalone = models.create_model('cifar_resnet20', NUM_CLASSES, width_multiplier=0.125,
                                     stage_sizes=row['depth'])
    shapes = nets.abstract_variables(standalone)['params']
    assert row['params'] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    tag = models.depth_tag(row['depth'])
    assert row['top1'] == pytest.approx(metrics[f'{tag}/top1'], abs=1e-6)


def source_workdir(tmp_path, **overrides) -> str:
  """A workdir holding an EKD DDNN's (random) checkpoint and its config."""
  config = config_lib.load(os.path.join(ROOT, 'configs', 'default.py') + ':smoke')
  config.update_from_flattened_dict(overrides)
  return runs.save_run(str(tmp_path / 'source'), config, DATA)


def test_init_from_loads_another_runs_full_net_and_cuts_it_at_once(tmp_path):
  # A DDNN with private BN statistics: its full depth's norms become the net's.
  source = source_workdir(tmp_path, **{'model.bn_mode': 'private_stats'})
  config = smoke_config(init_from=source, num_epochs=0.05, **{'pruning.full_epochs': 0.0})
  train.train_and_evaluate(config, str(tmp_path / 'pruned'))
  saved, _ = runs.variables_at(source)
  tag = models.depth_tag(FULL)

  def plain(tree):  # 'bn1_d3-3-3' -> 'bn1', other depths' norms dropped
    out = {}
    for k, v in tree.items():
      base, _, suffix = k.rpartition('_')
      if re.fullmatch(r'd[\d-]+', suffix) and base:
        if suffix != tag:
          continue
        k = base
      out[k] = plain(v) if isinstance(v, dict) else v
    return out

  end, step = runs.variables_at(str(tmp_path / 'pruned'))
  assert step == 2
  for collection in ('params', 'batch_stats'):  # frozen from step 0
    runs.assert_trees_equal(net(end[collection], FULL), plain(saved[collection]))


@pytest.mark.parametrize('overrides, message', [
    ({'model.bn_mode': 'private_stats'}, r'pass --config.model.bn_mode=shared'),
    ({'depths': ((3, 3, 3),)}, r'no depth below the full one .* --config.depths=\(\(1,1,1\),\)'),
    ({'pruning.full_epochs': -1.0}, r'pruning.full_epochs=-1.0 must be a number >= 0'),
    ({'init_from': '/nonexistent/run'}, r'config.init_from=/nonexistent/run: .*finished run'),
])
def test_bad_fields_are_one_line_errors(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    methods.create_method(smoke_config(**overrides), NUM_CLASSES, 10)
  assert '\n' not in str(error.value)


def test_init_from_a_net_of_another_width_is_refused(tmp_path):
  source = source_workdir(tmp_path, **{'model.width_multiplier': 0.25})
  with pytest.raises(ValueError, match=r'holds another net \(\S+: \(4,\) there, '
                                       r'\(2,\) here\); set --config.model'):
    methods.create_method(smoke_config(init_from=source), NUM_CLASSES, 10)
