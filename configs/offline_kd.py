"""Offline KD on CIFAR-10 JPEGs: a trained net's full depth teaches cifar_resnet20 at (1,1,1).

  python -m ddnn_jax.main --config configs/cifar10_folder.py \\
      --config.data.root=../shared/datasets/cifar10-jpeg-train.tar --workdir /tmp/c10_ekd
  python -m ddnn_jax.main --config configs/offline_kd.py \\
      --config.data.root=../shared/datasets/cifar10-jpeg-train.tar \\
      --config.teacher_workdir=/tmp/c10_ekd --workdir /tmp/c10_offline_kd

The first run (any method: ekd, individual at the full depth, ...) is the
teacher; its full net, frozen, teaches the standalone student of
`individual_depth` with the EKD terms of config.ekd (KL at T = 3, ramped up
over the first epoch; --config.ekd.beta=1 adds the attention term). The recipe
of configs/cifar10_folder.py (30 epochs, cosine, the same held-out split), so
that the student compares with method 'individual' at the same depth. A step
costs the student's training plus one teacher forward; accuracy not yet
measured. Evaluation reads the teacher's workdir too (to rebuild the method).
`:smoke` trains a few steps on the embedded digits (a teacher_workdir is still
needed) with a ramp-up of 0.1 epochs, which those steps cross.
"""

import ml_collections

from configs import base, cifar10_folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_folder.get_config()
  config.method = 'offline_kd'
  config.teacher_workdir = ''  # required: --config.teacher_workdir=DIR
  config.individual_depth = (1, 1, 1)  # the student
  config.ekd.alpha = 1.0
  config.ekd.beta = 0.0
  config.ekd.temperature = 3.0
  config.ekd.rampup_epochs = 1.0
  if base.parse_arg(arg)[0]:  # smoke: its few steps reach the end of the ramp-up
    config.ekd.rampup_epochs = 0.1
  return base.variant(config, arg)
