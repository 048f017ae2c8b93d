"""CIFAR-10 JPEGs from an ImageFolder root (or a .tar of one), with a held-out split.

  python -m ddnn_jax.main --config configs/cifar10_folder.py \\
      --config.data.root=../shared/datasets/cifar10-jpeg-train.tar --workdir /tmp/c10

`data.root` is a folder laid out ROOT/train/<class>/<image>.jpg (or a .tar of
it). 5,000 images chosen with a fixed seed are held out as the 'validation'
split; the other 45,000 train. cifar_resnet20 holding (1,1,1) and (2,2,2), 30
epochs, cosine schedule. On two CPU cores an epoch costs several minutes (see
docs/RESULTS.md for measured times); on a GPU about 10 s.
"""

import ml_collections

from configs import base, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = 'cifar_resnet20'
  config.depths = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
  config.individual_depth = (3, 3, 3)
  config.data = datasets.data_config('image_folder')
  config.data.root = ''  # required: --config.data.root=PATH
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 30.0
  config.optim.learning_rate = 0.1
  config.optim.schedule = 'cosine'
  config.log_every_steps = 50
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 1.0
  return base.variant(config, arg)
