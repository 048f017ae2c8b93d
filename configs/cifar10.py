"""CIFAR-10: cifar_resnet56 holding ResNet-20 and ResNet-32 (plus (1,1,1)), with EKD.

  python -m ddnn_jax.main --config configs/cifar10.py --workdir gs://BUCKET/cifar10_ekd

The usual CIFAR recipe of METHODS.md: SGD momentum 0.9, weight decay 5e-4
(on kernels), batch 128, lr 0.1, 300 epochs with x0.1 at 150 and 225, 4-pixel
pad + random crop and horizontal flip. TFDS downloads cifar10 on first use.
Expected: about 93-94% test top-1 for the full ResNet-56 (individually trained
reference 93.0%); each sub-net above its individually trained twin. Time: about
3 h on one modern GPU; far too slow for a CPU (use configs/cifar10_folder.py
with a small net and few epochs there).
"""

import ml_collections

from configs import base, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = 'cifar_resnet56'
  config.depths = ((1, 1, 1), (3, 3, 3), (5, 5, 5), (9, 9, 9))
  config.individual_depth = (9, 9, 9)
  config.data = datasets.data_config('cifar10')
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 300.0
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.optim.milestones = (150.0, 225.0)
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 1.0
  return base.variant(config, arg)
