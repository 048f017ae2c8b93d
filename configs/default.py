"""Default: a small CIFAR-style DDNN with EKD on the embedded digits dataset.

  python -m ddnn_jax.main --config configs/default.py --workdir /tmp/ddnn_default

Needs no download (scikit-learn's 8x8 digits, prepared as a TFDS dataset on first
use). cifar_resnet20 at width 0.5 holding depths (1,1,1), (2,2,2), (3,3,3),
15 epochs of 1,437 images: training and evaluation take about 1.5 minutes on
two CPU cores and print the per-depth table. Top-1 on the 360 test digits, as
a fresh install reproduces it (.ci/run checks README's table): 98.61% for
(1,1,1), 98.33% for (2,2,2) and for the full net, with EKD's default
per-depth BatchNorm (68.33 / 97.78 / 86.94 with --config.model.bn_mode=shared).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = 'cifar_resnet20'
  config.model.width_multiplier = 0.5
  config.depths = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 15.0
  config.optim.learning_rate = 0.05
  config.optim.warmup_epochs = 1.0
  config.log_every_steps = 20
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 5.0
  return base.variant(config, arg)
