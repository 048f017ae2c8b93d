"""Two checks of what one train step of today's default computes, on real data.

  python experiments/objective_checks.py --root ../shared/datasets/cifar10-jpeg-train.tar

On one batch of the study's recipe (configs/cifar10_folder.py, width 0.5,
EKD, every depth), from the initial state, with the real train step:

  loss / sum of the depths' losses      1.0 when the per-depth losses are
                                        summed (1/3 if they were averaged)
  gradient / sum of the depths' grads   the same for the gradient
  weight-decay multiplier k             the update is -lr (g + k wd w) on the
                                        decayed kernels (first SGD step, no
                                        momentum yet); k = 1 when the decay is
                                        applied once per update, 3 if once per
                                        depth

Prints one JSON object; --json also writes it to a file.
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

from ddnn_jax import config_lib, experiment, input_pipeline, models, train  # noqa: E402
from ddnn_jax import mesh as mesh_lib  # noqa: E402


def check(exp: experiment.Experiment, batch: dict) -> dict:
  """The three numbers of the module docstring for `exp` on `batch`."""
  method, model = exp.method, exp.model
  state = exp.init_state()
  loss_fn = train.make_loss_fn(model, method.depths, method.objective, method.teacher,
                               method.solo_steps)
  args = (state.batch_stats, batch, state.step, None)
  (loss, (terms, _, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, *args)
  tags = [models.depth_tag(d) for d in method.depths]
  per_depth = [terms[f'{t}/loss'] for t in tags]

  def depth_loss(params, tag):
    return loss_fn(params, *args)[1][0][f'{tag}/loss']

  summed = jax.tree.map(lambda *g: sum(g), *[
      jax.grad(depth_loss)(state.params, t) for t in tags])
  flat_g, flat_sum = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
                      for t in (grads, summed))
  grad_ratio = float(jnp.vdot(flat_g, flat_sum) / jnp.vdot(flat_sum, flat_sum))
  old, grads = jax.device_get((state.params, grads))
  new = jax.device_get(train.make_train_step(exp)(state, batch)[0].params)  # donates state
  lr = float(exp.schedule(0))
  wd = float(exp.config.optim.weight_decay)
  num, den = 0.0, 0.0
  for path, w in jax.tree_util.tree_flatten_with_path(old)[0]:
    if w.ndim < 2:  # BatchNorm and biases: not decayed
      continue
    g = np.asarray(_at(grads, path), np.float64)
    delta = np.asarray(_at(new, path), np.float64) - np.asarray(w, np.float64)
    decay = -lr * wd * np.asarray(w, np.float64)
    num += float(((delta + lr * g) * decay).sum())
    den += float((decay * decay).sum())
  return {
      'depths': [list(d) for d in method.depths],
      'loss_over_sum_of_depth_losses': float(loss / sum(per_depth)),
      'grad_over_sum_of_depth_grads': grad_ratio,
      'weight_decay_multiplier': num / den,
      'learning_rate': lr, 'weight_decay': wd,
  }


def _at(tree, path):
  for key in path:
    tree = tree[getattr(key, 'key', key)]
  return tree


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', required=True, help='CIFAR-10 ImageFolder root or .tar')
  parser.add_argument('--json', help='also write the result here')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  args = parser.parse_args()
  config = config_lib.load('configs/cifar10_folder.py:width=0.5')
  config.data.root = os.path.abspath(args.root)
  config_lib.apply_overrides(config, args.set)
  runtime.configure_cpu_process(config.model.conv_impl)
  input_pipeline.hide_accelerators_from_tf()
  info = input_pipeline.get_info(config.data)
  mesh = mesh_lib.create_mesh()
  exp = experiment.build(config, mesh, experiment.DataSpec.from_info(info, config))
  batches = input_pipeline.train_batches(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed)
  result = check(exp, mesh_lib.global_batch(next(batches), mesh))
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
