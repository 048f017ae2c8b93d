"""Several standalone nets side by side, one member each, and nets restored
from earlier runs: the pieces that methods training more than one net share
(depth_pruning: the full net and its cut nets; indistill: the student, the
auxiliary and its pruned copy).

A member is a depth tuple, (1, 1, 1), or a name tuple, ('student',); its
name (`member_name`, which evaluation and reports use through
models.member_name) is the depth tag or the name, 'd1-1-1' or 'student', and
its net's variables are the top-level entry `net_<name>`, so
`subnets.extract_subnet(variables, depth)` still picks a depth member's net
(as it picks a depth's private norms) and `member_variables` any member's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax import checkpointing, config_lib, models, subnets


def member_name(member: tuple) -> str:
  """('student',) -> 'student'; a depth (1, 1, 1) -> its tag 'd1-1-1'."""
  if member and all(isinstance(k, str) for k in member):
    return '-'.join(member)
  return models.depth_tag(member)


def net_name(member: tuple) -> str:
  """The top-level variable name of a member's net."""
  return f'net_{member_name(member)}'


class Nets(nn.Module):
  """Standalone nets (DDNNResNets run at their full depth), member i is net i.

  Members in `inference_only` always run in inference mode (running
  BatchNorm statistics, none updated): frozen targets such as a pruned copy.
  """

  members: tuple[tuple, ...]
  nets: tuple[models.DDNNResNet, ...]
  reference: tuple  # the member evaluation compares the others with
  inference_only: tuple[tuple, ...] = ()
  conv_impl: str | None = None  # overrides the nets' (costs.py clones with 'xla')

  @property
  def full_depth(self) -> tuple:
    return self.reference

  def check_depth(self, member: Any) -> tuple:
    member = self.reference if member is None else tuple(member)
    if member not in self.members:
      raise ValueError(f'{member} is not a member of this model; its members are '
                       f'{self.members}')
    return member

  def __call__(self, images, depth: Any = None, train: bool = False):
    """Logits of one member (the reference when `depth` is None)."""
    return self.forward_depths(images, (self.check_depth(depth),), train)[0].logits

  @nn.compact
  def forward_depths(self, images, members, train: bool = False):
    members = tuple(self.check_depth(m) for m in members)
    outputs = {}
    for member in dict.fromkeys(members):
      net = self.nets[self.members.index(member)]
      net = net.clone(parent=self, name=net_name(member),
                      **({'conv_impl': self.conv_impl} if self.conv_impl else {}))
      mode = train and member not in self.inference_only
      outputs[member] = net.forward_depths(images, (net.full_depth,), mode)[0]
    return tuple(outputs[m] for m in members)

  def member_name(self, member: Any) -> str:
    return member_name(self.check_depth(member))

  def member_variables(self, variables: dict, member: Any) -> dict:
    """The variables of one member's net, under its top-level name."""
    name = net_name(self.check_depth(member))
    return {collection: {name: tree[name]} for collection, tree in variables.items()
            if name in tree}


def abstract_variables(model: nn.Module, depths=None, image_size: int = 32) -> dict:
  """Shapes of `model`'s variables for `depths` (default: its reference);
  parameter shapes do not depend on the image size."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda rng, x: models.init_variables(model, rng, x, depths),
                        jax.random.key(0), images)


def _shapes(tree: dict) -> dict[str, tuple[int, ...]]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_shapes(expected: dict, variables: dict, what: str, fix: str) -> None:
  """ValueError naming the first array whose name or shape differs."""
  want, have = _shapes(expected), _shapes(variables)
  for name in sorted(want.keys() | have.keys()):
    if want.get(name) != have.get(name):
      raise ValueError(f'{what} holds another net ({name}: {have.get(name)} there, '
                       f'{want.get(name)} here); {fix}')


def read_run(workdir: str, num_classes: int, steps_per_epoch: int | None = None,
             conv_impl: str = 'xla'):
  """(method, variables on the host) of the latest checkpoint of the run in
  `workdir`, its model built from its saved config.json (with this machine's
  `conv_impl`); ValueError naming config.init_from when there is none."""
  from ddnn_jax import methods  # the registry, which imports this module

  where = f'config.init_from={workdir}'
  try:
    saved = config_lib.load_saved(workdir)
    variables, _ = checkpointing.read_variables(workdir)
  except (FileNotFoundError, checkpointing.UnreadableCheckpointError) as e:
    raise ValueError(f'{where}: {" ".join(str(e).split())}; pass the --workdir of a '
                     'finished run') from None
  saved.model.conv_impl = conv_impl  # the kernels are this machine's choice
  method = methods.create_method(saved, num_classes, steps_per_epoch)
  check_same_shapes(abstract_variables(method.model, method.depths), variables, where,
                    'its config.json does not describe its checkpoint')
  return method, variables


def full_net_variables(model: nn.Module, variables: dict) -> dict:
  """A run's reference net (its full depth) in the layout of a standalone net
  with shared BatchNorm, whatever the run's BN mode or method."""
  if isinstance(model, models.DDNNResNet):
    return subnets.extract_subnet(variables, model.full_depth)
  if isinstance(model, Nets):
    name = net_name(model.reference)
    return {collection: tree[name] for collection, tree in variables.items()
            if name in tree}
  raise ValueError(f'cannot take the full net out of a {type(model).__name__}')


def restore_full_net(config: ml_collections.ConfigDict, full: models.DDNNResNet,
                     num_classes: int, steps_per_epoch: int | None) -> dict:
  """The full net of the run in `config.init_from`, laid out as `full`."""
  method, variables = read_run(config.init_from, num_classes, steps_per_epoch,
                               config.model.get('conv_impl', 'xla'))
  variables = full_net_variables(method.model, variables)
  check_same_shapes(abstract_variables(full), variables,
                    f'config.init_from={config.init_from}',
                    'set --config.model.* as in its config.json')
  return variables
