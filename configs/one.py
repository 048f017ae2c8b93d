"""ONE on CIFAR-10 JPEGs: three branches of cifar_resnet20's last stage and a gate.

  python -m ddnn_jax.main --config configs/one.py \\
      --config.data.root=../shared/datasets/cifar10-jpeg-train.tar --workdir /tmp/c10_one

The recipe of configs/cifar10_folder.py (30 epochs, cosine, the same held-out
split), so that ONE's row compares with the DDNN's. The KD ramp-up is METHODS.md's
80 of 300 epochs scaled to the 30-epoch run (8 epochs). Evaluation reports each
branch and the gated ensemble; branch 1 (with the trunk) is the deployed net,
a standalone cifar_resnet20. A step costs about 5/3 of an individual
cifar_resnet20 step (the trunk runs once, the last stage, a third of the FLOPs,
three times); accuracy not yet measured. `:smoke` trains a few steps on the
embedded digits with a ramp-up of 0.1 epochs, which those steps cross.
"""

import ml_collections

from configs import base, cifar10_folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_folder.get_config()
  config.method = 'one'
  config.one.branches = 3
  config.one.temperature = 3.0
  config.one.kd_weight = 1.0
  config.one.rampup_epochs = 8.0
  if base.parse_arg(arg)[0]:  # smoke: its few steps reach the end of the ramp-up
    config.one.rampup_epochs = 0.1
  return base.variant(config, arg)
