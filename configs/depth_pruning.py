"""Depth-level pruning on the default setup: train the full net, cut it to each
depth of config.depths, fine-tune every cut net (ddnn_jax/methods/depth_pruning.py).

  python -m ddnn_jax.main --config configs/depth_pruning.py --workdir /tmp/ddnn_pruning

configs/default.py's data and model (cifar_resnet20 at width 0.5 on the
embedded digits): 10 epochs of the full net, then 5 of fine-tuning for the cut
nets (1,1,1) and (2,2,2). One learning-rate schedule spans both phases, so its
decays sit inside the full net's 10 epochs (x0.1 at epochs 5 and 8): the full
net is annealed before the cut, and the cut nets fine-tune at the final, low
rate. To cut a full net trained elsewhere, e.g. by `method=individual`, and
only fine-tune (with this run's own schedule):

  python -m ddnn_jax.main --config configs/depth_pruning.py:init_from=/tmp/full,pruning.full_epochs=0,epochs=5 \\
      --workdir /tmp/ddnn_pruned

Any config can run this method (`--config configs/cifar10_folder.py:method=depth_pruning`);
the fields are in configs/base.py. Time and accuracy: not measured yet (every
net runs forward and backward in every step, frozen or not, so a step costs
about what an EKD step over the same depths costs).
"""

import ml_collections

from configs import base, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.method = 'depth_pruning'
  config.num_epochs = 15.0
  config.pruning.full_epochs = 10.0  # the cut nets fine-tune for the other 5
  config.optim.schedule = 'step'
  config.optim.milestones = (5.0, 8.0)  # inside the full net's phase
  smoke, _ = base.parse_arg(arg)
  if smoke:  # 9 steps: the full net for 4, the cut nets for 5
    config.pruning.full_epochs = 0.1
  return base.variant(config, arg)
