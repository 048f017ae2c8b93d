"""Gradient rules for the members of one DDNN (config.grads, GradientRule).

The train step normally differentiates the summed loss: every shared weight
gets g_f + g_s, the reference (full) net's gradient plus the sum of the
sub-nets'. A rule takes the two apart (one forward, two backward passes) and
combines them otherwise:

- projection (PCGrad, one-sided as in NASViT): within each group of
  parameters where g_s . g_f < 0, g_s loses its component along g_f, so the
  sub-nets never push the shared weights against the full net's descent;
- equilibrium (IMTA's gradient equilibrium): each parameter's gradient is
  divided by the number of members that use it, the mean over the exits
  below it instead of their sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax import models, subnets

SURGERIES = ('none', 'measure', 'project')
GROUPS = ('stage', 'global')
# The groups `groups='stage'` uses: a top-level parameter name's first word.
STAGE_GROUPS = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')


@dataclasses.dataclass(frozen=True)
class GradientRule:
  """How the train step combines the reference member's gradient g_f with the
  other members' g_s on the shared weights (config.grads), instead of g_f + g_s.

  Without `project` and `equilibrium` (surgery 'measure') the step applies
  g_f + g_s as usual and only logs their cosine per group.
  `project`: where g_s . g_f < 0 within a group of parameters, g_s loses its
  component along g_f (PCGrad's projection, one-sided: g_f is kept whole);
  `groups` 'stage' takes the stem, each stage and the head as groups, 'global'
  all parameters as one. `equilibrium`: each parameter's summed gradient is
  divided by the number of members that use it (the mean over the exits below
  it instead of their sum; gradient equilibrium)."""
  project: bool = False
  groups: str = 'stage'
  equilibrium: bool = False


def rule(config: ml_collections.ConfigDict) -> GradientRule | None:
  """The rule of `config.grads` (None: plain summed gradients)."""
  grads = config.get('grads')
  if grads is None:
    return None
  surgery = grads.get('surgery', 'none')
  if surgery not in SURGERIES:
    raise ValueError(f'grads.surgery={surgery!r} is not one of {SURGERIES}; pass '
                     "e.g. --config.grads.surgery=project")
  groups = grads.get('groups', 'stage')
  if groups not in GROUPS:
    raise ValueError(f'grads.groups={groups!r} is not one of {GROUPS}; pass '
                     "e.g. --config.grads.groups=stage")
  equilibrium = grads.get('equilibrium', False)
  if not isinstance(equilibrium, bool):
    raise ValueError(f'grads.equilibrium={equilibrium!r} must be True or False; pass '
                     'e.g. --config.grads.equilibrium=True')
  if surgery == 'none' and not equilibrium:
    return None  # 'measure' keeps a rule that changes nothing but logs
  return GradientRule(project=surgery == 'project', groups=groups, equilibrium=equilibrium)


def _keys(path) -> list[str]:
  return [str(getattr(k, 'key', k)) for k in path]


def group_of(path, groups: str) -> str:
  """The group of a parameter (its tree path): 'all', or the first word of
  its top-level name ('stage2' for stage2_block1/conv1/kernel)."""
  return 'all' if groups == 'global' else _keys(path)[0].split('_')[0]


def users(params, depths: Sequence[tuple[int, ...]]):
  """A tree like `params` of ints: how many of `depths` run each parameter (at
  least 1). A block runs in the depths that reach it; a per-depth norm layer
  in its own. Shared weights are those with a count above 1."""
  tags = {models.depth_tag(d): d for d in depths}

  def count(path, _):
    keys = _keys(path)
    runs = list(depths)
    block = subnets.BLOCK_NAME.match(keys[0])
    if block:
      s, b = int(block.group(1)) - 1, int(block.group(2))
      runs = [d for d in runs if d[s] > b]
    for key in keys[1:]:
      tagged = subnets.TAGGED_NAME.match(key)
      if tagged and tagged.group(2) in tags:
        runs = [d for d in runs if d == tags[tagged.group(2)]]
    return max(1, len(runs))

  return jax.tree_util.tree_map_with_path(count, params)


def _shared_groups(params, depths, groups: str) -> list[str | None]:
  """Per leaf of `params` (flattened order): its group, None where only one
  member uses it (a per-depth norm layer, a block only the full net runs)."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  counts = jax.tree_util.tree_leaves(users(params, depths))
  return [group_of(p, groups) if n > 1 else None for p, n in zip(paths, counts)]


def group_dots(g_full, g_sub, params, depths, groups: str = 'stage') -> dict:
  """{group: (g_sub . g_full, |g_full|^2, |g_sub|^2)} over the shared weights."""
  names = _shared_groups(params, depths, groups)
  flat_f, flat_s = jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_sub)
  out = {}
  for group in dict.fromkeys(n for n in names if n is not None):
    members = [i for i, n in enumerate(names) if n == group]
    out[group] = tuple(sum(jnp.vdot(a[i], b[i]) for i in members)
                       for a, b in ((flat_s, flat_f), (flat_f, flat_f), (flat_s, flat_s)))
  return out


def combine(rule: GradientRule, g_full, g_sub, params,
            depths: Sequence[tuple[int, ...]]):
  """(gradient to apply, metrics) from the reference member's gradient
  `g_full` and the other members' `g_sub` (trees like `params`). Only the
  shared weights are grouped and projected. Metrics: 'grads/cos_<group>'
  (cosine of g_sub with g_full over the group's shared weights) and, with
  projection, 'grads/projected_<group>' (1 where g_sub was projected)."""
  names = _shared_groups(params, depths, rule.groups)
  flat_f, treedef = jax.tree_util.tree_flatten(g_full)
  flat_s = jax.tree_util.tree_leaves(g_sub)
  metrics, coef = {}, {}
  for group, (dot, ff, ss) in group_dots(g_full, g_sub, params, depths, rule.groups).items():
    metrics[f'grads/cos_{group}'] = dot * jax.lax.rsqrt(jnp.maximum(ss * ff, 1e-30))
    if rule.project:
      conflict = dot < 0
      coef[group] = jnp.where(conflict, dot / jnp.maximum(ff, 1e-30), 0.0)
      metrics[f'grads/projected_{group}'] = conflict.astype(jnp.float32)
  combined = [f + (s - coef[n] * f if n in coef else s)
              for f, s, n in zip(flat_f, flat_s, names)]
  grads = jax.tree_util.tree_unflatten(treedef, combined)
  if rule.equilibrium:
    grads = jax.tree.map(lambda g, n: g / n, grads, users(params, depths))
  return grads, metrics


def differentiate(rule: GradientRule, depths: Sequence[tuple[int, ...]], loss_fn,
                  params, args):
  """(loss, terms, batch_stats, grads) of one train step under `rule`:
  `loss_fn(params, *args)` (train.make_loss_fn's) split into the reference
  member's loss (`depths[-1]`) and the others', differentiated apart (one
  forward, two backward passes), then combined by `combine`."""
  reference = models.depth_tag(depths[-1])

  def split(params):
    loss, aux = loss_fn(params, *args)
    key = f'{reference}/loss'
    if key not in aux[0]:
      raise ValueError(f'config.grads needs the objective to report {key!r}; method '
                       'ekd or joint_ce reports it')
    return (aux[0][key], loss - aux[0][key]), (loss, aux)

  _, pullback, (loss, (terms, batch_stats, _)) = jax.vjp(split, params, has_aux=True)
  one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
  (g_full,), (g_sub,) = pullback((one, zero)), pullback((zero, one))
  grads, stats = combine(rule, g_full, g_sub, params, depths)
  return loss, {**terms, **stats}, batch_stats, grads
