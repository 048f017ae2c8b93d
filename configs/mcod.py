"""MCOD on CIFAR-10 JPEGs: cifar_resnet20, cifar_resnet32 and a VGG-8 as peers.

  python -m ddnn_jax.main --config configs/mcod.py \\
      --config.data.root=../shared/datasets/cifar10-jpeg-train.tar --workdir /tmp/c10_mcod

The recipe of configs/cifar10_folder.py (30 epochs, cosine, the same held-out
split), so that MCOD's rows compare with the DDNN's. Distillation from the
peers' mean logits is off for the first 3 epochs of every 6-epoch period and
on for the other 3; its weight grows linearly from 0 to 1 over the 30 epochs.
Evaluation reports each peer (a standalone net) and the ensemble. A step costs
about what the three nets cost trained alone together; accuracy not yet
measured. `:smoke` trains a few steps on the embedded digits, with periods of
0.1 epochs so that those steps switch the distillation on and off.
"""

import ml_collections

from configs import base, cifar10_folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_folder.get_config()
  config.method = 'mcod'
  config.mcod.peers = ('cifar_resnet20', 'cifar_resnet32', 'vgg8')
  config.mcod.temperature = 3.0
  config.mcod.period_epochs = 6.0
  config.mcod.duty_cycle = 0.5
  config.mcod.on_first = False
  config.mcod.growth = 'linear'
  config.mcod.weight_start = 0.0
  config.mcod.weight_end = 1.0
  config.mcod.growth_epochs = config.num_epochs
  if base.parse_arg(arg)[0]:  # smoke: its few steps see both phases and the growth
    config.mcod.period_epochs = 0.1
    config.mcod.growth_epochs = 0.2
  return base.variant(config, arg)
