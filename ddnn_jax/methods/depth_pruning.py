"""Depth-level pruning (METHODS.md section 3): train the full net, cut it to
each configured depth by dropping the trailing blocks of each stage, and
fine-tune every cut net on its own.

One run, two phases, one net per member (methods/nets.py: member (1, 1, 1) is
a standalone net of that depth, the full depth is the full net):

- steps [0, B), B = `pruning.full_epochs` in steps: the full net trains with
  its cross-entropy; the cut nets are frozen (they are overwritten at B).
  With `config.init_from`, a transition at step 0 first loads the full net of
  that run (any method's: its full depth, in the shared-BN layout);
  `full_epochs = 0` then fine-tunes that net's cuts at once.
- at step B, a transition copies the full net's stem, head and the first k_s
  blocks of each stage s into the cut net of depth k: before any fine-tuning,
  each cut net computes exactly the full net's sub-net of that depth. The cut
  nets' optimizer state restarts (zero momentum).
- steps [B, num_epochs): every cut net fine-tunes with its own cross-entropy
  (all in the same step, on the same batches; their parameters are disjoint,
  so this is the same as fine-tuning each alone on that data order); the full
  net is frozen (no weight decay, no momentum, no BN update) and stays the
  net the cuts came from.

Choices where METHODS.md is silent: the fine-tuning length is what remains
of `num_epochs` after `pruning.full_epochs` (counted from the start, so a run
extended on resume fine-tunes longer instead of cutting again); the learning
rate follows the run's one schedule (`config.optim`) through both phases, so
put its decays inside the full-net phase (configs/depth_pruning.py: 'step'
with milestones before `full_epochs`) for a full net annealed before the cut
and fine-tuning at the low final rate, or train the full net in a run of its
own and pass `init_from` with `full_epochs = 0`; the nets use shared BatchNorm (each net has one depth, so the private modes mean
nothing here). Every step runs every net's forward and backward pass, frozen
ones included, so a step costs the full net plus all cut nets: the price of
one jitted program for both phases. Evaluation reports every cut depth and the
full net.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from absl import logging

from ddnn_jax import losses, models, optim, subnets
from ddnn_jax.methods import base, nets


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line ValueErrors for the fields this method reads."""
  base.setting(config, 'pruning.full_epochs', base.is_number(lambda v: v >= 0),
               'a number >= 0 (0 with --config.init_from)', '20')


def cut(full_variables: dict, depth: models.Depth) -> dict:
  """The variables of the net of `depth` cut from a full net's (shared BN):
  stem, head and the first depth[s] blocks of each stage s."""
  return subnets.extract_subnet(full_variables, depth)


def ce_objective(members: tuple[models.Depth, ...], trained: tuple[models.Depth, ...]):
  """The cross-entropy of each member in `trained`, summed; terms '<tag>/ce'."""
  def objective(outputs, labels, step, *, teacher_outputs=None):
    del step, teacher_outputs
    terms = {f'{models.depth_tag(m)}/ce': losses.cross_entropy(o.logits, labels)
             for m, o in zip(members, outputs) if m in trained}
    return sum(terms.values()), terms
  return objective


def _needs_steps(outputs, labels, step, **kwargs):
  raise ValueError("method 'depth_pruning' needs steps_per_epoch in create_method")


@base.register('depth_pruning', shared_bn_only='trains one net per depth')
def build(config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> base.Method:
  check_config(config)
  full = base.create_model(config, num_classes)
  depths = base.train_depths(config, full)
  cuts = depths[:-1]
  if not cuts:
    example = str(((1,) * len(full.full_depth),)).replace(' ', '')
    raise ValueError(f'depths={config.depths} hold no depth below the full one '
                     f'{full.full_depth} to cut to; pass e.g. --config.depths={example}')
  model = nets.Nets(depths, tuple(base.create_model(config, num_classes, d) for d in cuts)
                    + (full,), reference=full.full_depth)
  if steps_per_epoch is None:  # the model alone (evaluation builds it with the steps)
    return base.Method(model, depths, _needs_steps)

  boundary = optim.epochs_to_steps(config.pruning.full_epochs, steps_per_epoch)
  if optim.epochs_to_steps(config.num_epochs, steps_per_epoch) <= boundary:
    logging.warning('depth_pruning: num_epochs=%s ends before the cut (step %d); '
                    'resume with a larger num_epochs to fine-tune', config.num_epochs,
                    boundary)
  full_name = nets.net_name(full.full_depth)

  def cut_all(variables, *step_args):
    del step_args
    full_variables = {c: tree[full_name] for c, tree in variables.items()}
    written = {c: {} for c in variables}
    for depth in cuts:
      for c, tree in cut(full_variables, depth).items():
        written[c][nets.net_name(depth)] = tree
    return written

  transitions, teacher = [], None
  if config.init_from:
    restored = nets.restore_full_net(config, full, num_classes, steps_per_epoch)
    # A teacher that runs nothing: its variables reach the step as an argument.
    teacher = base.Teacher(full, restored, depths=())
    transitions.append(base.Transition(
        0, lambda variables, loaded: {c: {full_name: t} for c, t in loaded.items()}))
  transitions.append(base.Transition(boundary, cut_all))

  full_phase = ce_objective(depths, (full.full_depth,))
  cut_phase = ce_objective(depths, cuts)
  objective = (base.phased((0, cut_phase)) if boundary == 0
               else base.phased((0, full_phase), (boundary, cut_phase)))

  def trainable(step):
    fine_tuning = step >= boundary
    return {full_name: jnp.logical_not(fine_tuning),
            **{nets.net_name(d): fine_tuning for d in cuts}}

  return base.Method(model, depths, objective, teacher=teacher,
                     transitions=tuple(transitions), trainable=trainable)

