"""What each EKD term does to the shared weights in the first steps of training.

  python experiments/ekd_gradients.py --root ../shared/datasets/cifar10-jpeg-train.tar \\
      --out /tmp/ekd_grads/ekd.jsonl [--set ekd.beta=0 ...] [--steps 200] [--every 10]

Trains configs/cifar10_folder.py (the study's recipe, width 0.5 unless --set
says otherwise) with the real train step and input pipeline, and every
--every steps, on that step's batch and before its update, records:

  grad_norm[term][group]   norm of the gradient of one weighted loss term over
                           the parameters of one group (stem, stage1..3, head)
  cos_ce[term][group]      its cosine with the gradient of the summed
                           cross-entropy of every depth, over the same group
  ce[depth]                each depth's train cross-entropy on the batch
  dead[depth][stage]       fraction of exactly-zero stage outputs (ReLU) in
                           train mode
  block_change[block]      ||out - in|| / ||in|| of each full-net block whose
                           input and output shapes agree (how much it adds)
  cos_full_sub[group]      cosine of the sub-nets' whole gradient (ce_sub + kl
                           + at) with the full net's (ce_full) over the
                           weights more than one depth runs, per group
                           (gradients.group_dots): does the sub-nets' pull
                           oppose the full net's descent on what they share?

Terms: ce_full (the full net's CE), ce_sub (the sub-nets' CE, weighted by
ekd.student_ce), kl (alpha * kd_scale * every sub-net's KL), at_stage<s>
(beta * kd_scale * every sub-net's attention distance at stage s). One JSON
object per recorded step goes to --out, and a table of window means to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddnn_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddnn_jax import (  # noqa: E402
  config_lib,
  experiment,
  gradients,
  input_pipeline,
  losses,
  methods,
  models,
)
from ddnn_jax import mesh as mesh_lib  # noqa: E402
from ddnn_jax.train import make_train_step  # noqa: E402

GROUPS = ('stem', 'stage1', 'stage2', 'stage3', 'head')


def group_of(path: tuple) -> str:
  top = str(getattr(path[0], 'key', path[0]))
  return top.split('_')[0]


def group_norms_and_dots(tree, reference) -> dict[str, tuple[float, float, float]]:
  """{group: (|g|^2, <g, ref>, |ref|^2)} over the parameters of each group."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  ref = jax.tree_util.tree_leaves(reference)
  for (path, g), r in zip(flat, ref):
    name = group_of(path)
    sq, dot, rsq = out.get(name, (0.0, 0.0, 0.0))
    out[name] = (sq + jnp.vdot(g, g), dot + jnp.vdot(g, r), rsq + jnp.vdot(r, r))
  return out


def make_diagnostics(method: methods.Method):
  model, depths, ekd = method.model, method.depths, method.ekd
  teacher = model.full_depth

  def weighted_terms(params, batch_stats, batch, step):
    outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                             batch['image'], depths, True, method=model.forward_depths,
                             mutable=['batch_stats'])
    scale = losses.sigmoid_rampup(step, method.rampup_steps)
    _, terms = losses.ekd_loss(outputs, depths, batch['label'], teacher, ekd, scale)
    tag_full = models.depth_tag(teacher)
    subs = [models.depth_tag(d) for d in depths if d != teacher]
    out = {'ce_full': terms[f'{tag_full}/ce'],
           'ce_sub': ekd.student_ce * sum(terms[f'{t}/ce'] for t in subs),
           'kl': ekd.alpha * scale * sum(terms[f'{t}/kl'] for t in subs)}
    stage_keys = sorted({k.split('/')[1] for k in terms if '/at_stage' in k})
    for key in stage_keys:
      out[key] = ekd.beta * scale * sum(terms[f'{t}/{key}'] for t in subs)
    ce = {models.depth_tag(d): terms[f'{models.depth_tag(d)}/ce'] for d in depths}
    dead = {models.depth_tag(d): [jnp.mean(f == 0) for f in o.features]
            for d, o in zip(depths, outputs)}
    return out, (ce, dead)

  def block_change(params, batch_stats, images):
    _, state = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                           (teacher,), True, method=model.forward_depths,
                           mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=lambda mdl, _: isinstance(
                               mdl, models.ResidualBlock))
    inter = state['intermediates']
    changes, prev = {}, None
    for s, n in enumerate(model.stage_sizes):
      for b in range(n):
        name = f'stage{s + 1}_block{b}'
        out = inter[name]['__call__'][0]
        if prev is not None and prev.shape == out.shape:
          changes[name] = jnp.linalg.norm(out - prev) / jnp.linalg.norm(prev)
        prev = out
    return changes

  @jax.jit
  def diagnose(params, batch_stats, batch, step):
    jac, (ce, dead) = jax.jacrev(weighted_terms, has_aux=True)(params, batch_stats,
                                                               batch, step)
    ce_grad = jax.tree_util.tree_map(lambda a, b: a + b, jac['ce_full'], jac['ce_sub'])
    stats = {term: group_norms_and_dots(g, ce_grad) for term, g in jac.items()}
    sub = jax.tree_util.tree_map(lambda *g: sum(g), *[g for t, g in jac.items()
                                                     if t != 'ce_full'])
    shared = gradients.group_dots(jac['ce_full'], sub, params, depths)
    return stats, shared, ce, dead, block_change(params, batch_stats, batch['image'])

  return diagnose


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', required=True, help='CIFAR-10 ImageFolder root or .tar')
  parser.add_argument('--out', required=True, help='JSON lines file to write')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--every', type=int, default=10)
  parser.add_argument('--window', type=int, default=50, help='steps per table row')
  args = parser.parse_args()
  config = config_lib.load('configs/cifar10_folder.py')
  config.data.root = os.path.abspath(args.root)
  config.model.width_multiplier = 0.5
  config_lib.apply_overrides(config, args.set)
  runtime.configure_cpu_process(config.model.conv_impl)
  input_pipeline.hide_accelerators_from_tf()

  info = input_pipeline.get_info(config.data)
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(config, mesh, experiment.DataSpec.from_info(info, config))
  method = exp.method
  state = exp.init_state()
  train_step = make_train_step(exp)
  diagnose = make_diagnostics(method)
  batches = input_pipeline.train_batches(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  records = []
  with open(args.out, 'w') as f:
    for step in range(args.steps + 1):
      batch = mesh_lib.global_batch(next(batches), mesh)
      if step % args.every == 0:
        stats, shared, ce, dead, change = jax.device_get(
            diagnose(state.params, state.batch_stats, batch, state.step))
        record = {'step': step, 'grad_norm': {}, 'cos_ce': {},
                  'cos_full_sub': {g: float(dot / max(np.sqrt(ff * ss), 1e-30))
                                   for g, (dot, ff, ss) in shared.items()},
                  'ce': {k: float(v) for k, v in ce.items()},
                  'dead': {k: [float(x) for x in v] for k, v in dead.items()},
                  'block_change': {k: float(v) for k, v in change.items()}}
        for term, groups in stats.items():
          record['grad_norm'][term] = {g: float(np.sqrt(sq)) for g, (sq, _, _) in groups.items()}
          record['cos_ce'][term] = {
              g: float(dot / max(np.sqrt(sq * rsq), 1e-30)) for g, (sq, dot, rsq) in groups.items()}
        f.write(json.dumps(record) + '\n')
        f.flush()
        records.append(record)
      state, _ = train_step(state, batch)
  print_table(records, args.window, ' '.join(args.set) or 'defaults')


def _mean(records: list[dict], *keys) -> float:
  values = []
  for r in records:
    for k in keys:
      r = r[k]
    values.append(r)
  return float(np.mean(values))


def print_table(records: list[dict], window: int, label: str) -> None:
  print(f'# {label}: window means over recorded steps')
  windows = {}
  for r in records:
    windows.setdefault(r['step'] // window, []).append(r)
  for w, rs in sorted(windows.items()):
    first = rs[0]
    print(f'steps {w * window}-{(w + 1) * window - 1}:')
    for group in GROUPS:
      cells = [f'{t} {_mean(rs, "grad_norm", t, group):.3f} '
               f'({_mean(rs, "cos_ce", t, group):+.2f})' for t in first['grad_norm']]
      print(f'  |grad| (cos with CE) {group:6s}: ' + ', '.join(cells))
    print('  cos(sub-nets, full) on shared weights: ' + ', '.join(
        f'{g} {_mean(rs, "cos_full_sub", g):+.3f}' for g in first['cos_full_sub']))
    print('  train CE: ' + ', '.join(f'{d} {_mean(rs, "ce", d):.3f}' for d in first['ce']))
    print('  dead fraction per stage: ' + '; '.join(
        f'{d} ' + '/'.join(f'{_mean(rs, "dead", d, s):.2f}' for s in range(len(v)))
        for d, v in first['dead'].items()))
    print('  block change: ' + ', '.join(f'{b} {_mean(rs, "block_change", b):.2f}'
                                         for b in first['block_change']))


if __name__ == '__main__':
  main()
