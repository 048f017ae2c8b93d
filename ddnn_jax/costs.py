"""What a depth costs: parameters it uses and FLOPs of its compiled forward pass.

Everything here works on abstract shapes (``jax.eval_shape``): no parameter is
materialised, so the largest presets are measured in seconds on a laptop. FLOPs
come from XLA's cost analysis of the jitted inference program, the same numbers
that the compiler itself uses; one multiply-add counts as two FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ddnn_jax import models, subnets


@dataclasses.dataclass(frozen=True)
class DepthCost:
  depth: models.Depth
  params: int  # parameters the depth uses (standalone-net count)
  flops: float  # compiled inference FLOPs for `batch_size` images


def abstract_variables(model: models.DDNNResNet, image_size: int,
                       depths: Sequence[models.Depth] | None = None) -> dict:
  """Shapes and dtypes of the model's variables, without computing them."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      functools.partial(models.init_variables, model, depths=depths),
      jax.random.key(0), images)


def compiled_flops(model: models.DDNNResNet, variables: dict, depth: models.Depth,
                   image_size: int, batch_size: int = 1) -> float:
  """FLOPs of the compiled inference forward of one depth (XLA cost analysis)."""
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  # XLA's own convolutions: the cost analysis does not see into the oneDNN
  # custom calls (ddnn_jax.onednn_conv), and the maths is the same.
  model = model.clone(conv_impl='xla')
  forward = jax.jit(functools.partial(model.apply, depth=depth, train=False))
  analysis = forward.lower(variables, images).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
    analysis = analysis[0]
  return float(analysis['flops'])


def depth_costs(model: models.DDNNResNet, depths: Sequence[models.Depth],
                image_size: int, batch_size: int = 1) -> list[DepthCost]:
  depths = [model.check_depth(d) for d in depths]
  variables = abstract_variables(model, image_size)
  return [
      DepthCost(depth,
                models.count_params(subnets.extract_subnet(variables, depth)['params']),
                compiled_flops(model, variables, depth, image_size, batch_size))
      for depth in depths
  ]
