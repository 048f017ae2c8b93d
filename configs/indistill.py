"""InDistill on the default setup: an auxiliary twice the student's width learns
from a trained teacher, is L1-pruned to the student's width, and the student
matches its stage outputs one stage at a time before distilling the teacher's
logits (ddnn_jax/methods/indistill.py).

  python -m ddnn_jax.main --config configs/indistill.py:teacher_workdir=/tmp/ddnn_default \\
      --workdir /tmp/ddnn_indistill

`teacher_workdir` is the --workdir of a finished run whose full net is the
teacher (here configs/default.py's EKD run), as for offline_kd. The student is cifar_resnet20 at width 0.5
cut to (1,1,1); 6 epochs of the auxiliary, 1, 1 and 1 epoch of the stage-1, -2
and -3 curriculum (METHODS.md's 3, 4, 5 scaled to this 15-epoch budget), then
6 epochs of distillation. The smoke variant needs a teacher too
(`:smoke,teacher_workdir=...`). Any config can run this method (`method=indistill`);
the fields are in configs/base.py. Time and accuracy: not measured yet.
"""

import ml_collections

from configs import base, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.method = 'indistill'
  config.num_epochs = 15.0
  config.indistill.student_depth = (1, 1, 1)
  config.indistill.aux_width = 2.0
  config.indistill.aux_epochs = 6.0
  config.indistill.stages = (1, 2, 3)
  config.indistill.stage_epochs = (1.0, 1.0, 1.0)
  smoke, _ = base.parse_arg(arg)
  if smoke:  # 9 steps of 44 per epoch: phases start at steps 0, 4, 5, 6 and 7
    config.indistill.aux_epochs = 0.1
    config.indistill.stage_epochs = (0.023, 0.023, 0.023)
  return base.variant(config, arg)
