"""A member's variables in the layout of its standalone net.

A DDNN's variables hold every depth: blocks past a depth, and the per-depth
norm layers of the private BatchNorm modes (``bn1_d2-2-2``). What a depth
exports, deploys or starts another run from is the standalone ResNet of that
depth: its blocks only, its norm layers under the plain names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from ddnn_jax.models import depth_tag

BLOCK_NAME = re.compile(r'^stage(\d+)_block(\d+)$')
TAGGED_NAME = re.compile(r'^(.+)_(d\d+(?:-\d+)*)$')


def extract_subnet(variables: Mapping[str, Any], depth: Sequence[int]) -> dict:
  """The variables a depth uses, in the layout of the standalone net of that depth.

  Blocks past the depth are dropped, and per-depth norm layers of the private BN
  modes are renamed to the plain names (``bn1_d2-2-2`` -> ``bn1``), so the result
  loads into ``create_model(name, ..., stage_sizes=depth)`` with ``bn_mode='shared'``.
  """
  depth = tuple(int(k) for k in depth)
  tag = depth_tag(depth)
  found_tags = set()

  def keep(tree: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in tree.items():
      block = BLOCK_NAME.match(key)
      if block and int(block.group(2)) >= depth[int(block.group(1)) - 1]:
        continue
      tagged = TAGGED_NAME.match(key)
      if tagged:
        found_tags.add(tagged.group(2))
        if tagged.group(2) != tag:
          continue
        key = tagged.group(1)
      out[key] = keep(value) if isinstance(value, Mapping) else value
    return out

  result = {name: keep(collection) for name, collection in variables.items()}
  if found_tags and tag not in found_tags:
    raise ValueError(
        f'the variables hold per-depth BatchNorm layers for {sorted(found_tags)} but '
        f'not for {tag}; initialise or train the model with that depth')
  return result


def member_variables(model: nn.Module, variables: Mapping[str, Any], member: Any) -> dict:
  """The variables a member uses, as its standalone net holds them:
  `model.member_variables(variables, member)`, else `extract_subnet`."""
  extract = getattr(model, 'member_variables', None)
  return extract(variables, member) if callable(extract) else extract_subnet(variables, member)


def fill_from_standalone(variables: Mapping[str, Any], standalone: Mapping[str, Any]) -> dict:
  """`variables` of a DDNN (any BN mode) with every array taken from
  `standalone`, the variables of the standalone net of its full depth (shared
  BatchNorm, as extract_subnet lays them out): each per-depth norm layer
  (``bn1_d2-2-2``) gets a copy of the plain one (``bn1``). The inverse of
  extract_subnet at the full depth; ValueError naming the first array the
  standalone net lacks or holds in another shape."""

  def fill(tree: Mapping[str, Any], source: Mapping[str, Any], where: str) -> dict:
    out = {}
    for key, value in tree.items():
      tagged = TAGGED_NAME.match(key)
      name = tagged.group(1) if tagged else key
      if not isinstance(source, Mapping) or name not in source:
        raise ValueError(f'the standalone net has no {where}{name} for {where}{key}')
      if isinstance(value, Mapping):
        out[key] = fill(value, source[name], f'{where}{key}/')
      elif tuple(value.shape) != tuple(source[name].shape):
        raise ValueError(f'{where}{key} is {tuple(value.shape)} here but '
                         f'{tuple(source[name].shape)} in the standalone net')
      else:
        out[key] = source[name]
    return out

  return {c: fill(tree, standalone.get(c, {}), f'{c}/') for c, tree in variables.items()}
