"""CIFAR-100: the CIFAR-10 recipe with 100 classes.

  python -m ddnn_jax.main --config configs/cifar100.py --workdir gs://BUCKET/cifar100_ekd

cifar_resnet56 holding (1,1,1), ResNet-20 and ResNet-32; 300 epochs, step
decay at 150/225. Expected: about 72% test top-1 for the full net (individual
ResNet-56 reference ~71-72%). About 3 h on one modern GPU.
"""

import ml_collections

from configs import base, cifar10, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10.get_config()
  config.data = datasets.data_config('cifar100')
  return base.variant(config, arg)
