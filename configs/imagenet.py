"""ImageNet: a bottleneck DDNN whose full depth (3,4,6,3) is ResNet-50, with EKD.

  python -m ddnn_jax.main --config configs/imagenet.py --workdir gs://BUCKET/r50_ekd
  (on a pod: launch/tpu_pod.sh --tpu NAME --accelerator-type v4-32 --workdir gs://...)

Sub-nets (1,1,1,1), (2,2,2,2) and (3,4,6,3). Global batch 1024 with lr 0.4
(0.1 per 256), 5 warm-up epochs, then step decay at 30/60/80 of 90 epochs;
bfloat16 compute. TFDS needs imagenet2012 prepared in data_dir (manual download).
Expected: full net about 76% top-1 (torchvision ResNet-50: 76.15). Compiled for
a v4-32 ahead of time (docs/SCALING.md): 3.9 GiB of HBM per chip, 41.4 GFLOP per
training image (1.72x the full net alone), about an hour of compute for 90
epochs at 30% of peak bf16, input pipeline and all-reduce not counted.
"""

import ml_collections

from configs import base, datasets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = 'resnet50'
  config.model.dtype = 'bfloat16'
  config.model.zero_init_residual = True
  config.depths = ((1, 1, 1, 1), (2, 2, 2, 2), (3, 4, 6, 3))
  config.individual_depth = (3, 4, 6, 3)
  config.data = datasets.data_config('imagenet2012')
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 90.0
  config.optim.learning_rate = 0.4
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'step'
  config.optim.warmup_epochs = 5.0
  config.optim.milestones = (30.0, 60.0, 80.0)
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 1.0
  return base.variant(config, arg)
