"""ImageNet: ResNet-34 holding ResNet-18 ((2,2,2,2)) and (1,1,1,1), with EKD.

  python -m ddnn_jax.main --config configs/imagenet_r34.py --workdir gs://BUCKET/r34_ekd

The imagenet.py recipe with basic blocks. Expected: full net about 73% top-1
(torchvision ResNet-34: 73.30), the (2,2,2,2) sub-net above an individually
trained ResNet-18 (69.76).
"""

import ml_collections

from configs import base, imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet.get_config()
  config.model.name = 'resnet34'
  config.model.zero_init_residual = False
  config.depths = ((1, 1, 1, 1), (2, 2, 2, 2), (3, 4, 6, 3))
  config.individual_depth = (2, 2, 2, 2)
  return base.variant(config, arg)
