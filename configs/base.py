"""Fields shared by every config; the configs in this folder override a few.

Not a launchable config itself: import it with `from configs import base` and
call `base.get_config()`.
"""

import ast

import ml_collections

from configs import datasets


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # What a training step computes, a method registered in ddnn_jax/methods/:
  # 'ekd' (all depths, full net teaches the others), 'joint_ce' (all depths,
  # cross-entropy only) or 'individual' (one depth trained as a standalone net);
  # the comparison methods 'offline_kd', 'one', 'mcod', 'depth_pruning' and
  # 'indistill' (fields below).
  config.method = 'ekd'

  config.model = ml_collections.ConfigDict()
  config.model.name = 'cifar_resnet20'  # a preset of ddnn_jax.models.PRESETS
  config.model.width_multiplier = 1.0  # scales every channel count
  # BatchNorm across depths: 'shared', 'private_stats' (statistics per depth),
  # 'private_all' (scale, bias and statistics per depth), or 'auto': the
  # method's own, 'private_all' for ekd (docs/RESULTS.md, the 30-epoch study)
  # unless any_depth.k > 0, 'shared' for every other method. A run's
  # config.json records the mode it resolved to; a resumed run keeps it.
  config.model.bn_mode = 'auto'
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' on TPU
  config.model.zero_init_residual = False  # zero the last BN scale of each block
  # Convolution kernels: 'auto' (oneDNN when the program runs on a one-device
  # CPU process, XLA's on TPU/GPU and on several devices), 'xla' or 'onednn'.
  # Same maths; oneDNN is 2-3x faster on CPU for narrow layers (BENCHMARKS.md).
  config.model.conv_impl = 'auto'
  # Which depths' losses train the shared classifier head: 'all', or 'full'
  # (the full net's alone; the sub-nets' gradients stop at the head).
  config.model.head_grad = 'all'

  # Depth configs trained together (blocks per stage); the full depth is always
  # included and is the teacher.
  config.depths = ((1, 1, 1), (2, 2, 2), (3, 3, 3))
  # Any-depth training (methods ekd, joint_ce; ddnn_jax/any_depth.py): each
  # step also trains k depths drawn from the whole space (each stage 1..n
  # blocks), keyed on (seed, step), besides the full net and the smallest of
  # config.depths; 0: off. Each drawn depth compiles one program, drawn from a
  # pool of at most max_programs depths. Needs model.bn_mode='shared'.
  config.any_depth = ml_collections.ConfigDict()
  config.any_depth.k = 0
  config.any_depth.max_programs = 32
  # The one depth that method 'individual' trains as a standalone net.
  config.individual_depth = (3, 3, 3)

  # Method 'offline_kd': the student is `individual_depth`, taught with the
  # config.ekd terms by the frozen reference net of another run: the workdir
  # of a finished run (its config.json and latest checkpoint).
  config.teacher_workdir = ''

  # Method 'one' (METHODS.md section 4): a shared trunk, `branches` copies of
  # the last stage, a gated ensemble of them teaching each; branch 1 deploys.
  config.one = ml_collections.ConfigDict()
  config.one.branches = 3  # m, copies of the last stage (at least 2)
  config.one.temperature = 3.0
  config.one.kd_weight = 1.0  # weight of the T^2 KL terms after the ramp-up
  config.one.rampup_epochs = 80.0  # sigmoid ramp-up of kd_weight (0: none)

  # Method 'mcod' (METHODS.md section 4): peers of different architectures,
  # the mean of their logits teaching each, on and off in periods, with a
  # weight lambda that grows from weight_start to weight_end.
  config.mcod = ml_collections.ConfigDict()
  # A ResNet preset of ddnn_jax.models.PRESETS or a VGG-style 'vgg8', 'vgg11'.
  config.mcod.peers = ('cifar_resnet20', 'cifar_resnet32', 'vgg8')
  config.mcod.temperature = 3.0
  config.mcod.period_epochs = 10.0  # one off/on cycle of the distillation
  config.mcod.duty_cycle = 0.5  # fraction of each period with distillation on
  config.mcod.on_first = False  # False: each period begins with distillation off
  config.mcod.growth = 'linear'  # lambda over training: 'linear' or 'step'
  config.mcod.weight_start = 0.0  # lambda at step 0
  config.mcod.weight_end = 1.0  # lambda from growth_epochs on
  config.mcod.growth_epochs = 30.0
  config.mcod.growth_levels = 4  # 'step': lambda takes this many equal steps

  # Method 'depth_pruning' (ddnn_jax/methods/depth_pruning.py): the full net
  # trains for full_epochs, then is cut to each of config.depths, and the cut
  # nets fine-tune for the rest of num_epochs. init_from: the workdir of a
  # finished run whose full net the run starts from ('': a fresh one);
  # full_epochs = 0 then cuts that net at once. Methods ekd and joint_ce
  # start every depth from that full net (a warm start, methods/warm_start.py).
  config.init_from = ''
  config.pruning = ml_collections.ConfigDict()
  config.pruning.full_epochs = 20.0

  # Method 'indistill' (ddnn_jax/methods/indistill.py): an auxiliary net
  # aux_width times as wide as the student learns from the teacher in
  # teacher_workdir (as offline_kd's) for aux_epochs, is L1-pruned to the
  # student's width, the student matches its stage outputs one stage at a time
  # (stages, stage_epochs each), then learns from the teacher's logits
  # (CE + ekd.alpha * T^2 KL) for the rest of num_epochs.
  config.indistill = ml_collections.ConfigDict()
  config.indistill.student_depth = (1, 1, 1)  # blocks per stage of the student
  config.indistill.aux_width = 2.0  # the auxiliary's width / the student's
  config.indistill.aux_epochs = 10.0
  config.indistill.stages = (1, 2, 3)  # the curriculum's layers (stage outputs), shallow first
  config.indistill.stage_epochs = (3.0, 4.0, 5.0)  # epochs of each stage's phase

  # EKD as docs/RESULTS.md found it to work: the KL term, ramped up over the
  # first epoch, and no attention term (with METHODS.md's beta = 1 every
  # attention variant collapsed the DDNN; the ablation 'ekd_paper' restores it).
  config.ekd = ml_collections.ConfigDict()
  config.ekd.alpha = 1.0  # weight of T^2 * KL(full || sub-net)
  config.ekd.beta = 0.0  # weight of the attention-map distance (METHODS.md: 1.0)
  config.ekd.temperature = 3.0
  config.ekd.attention = 'zscore_sum'  # or 'at_p2'
  config.ekd.stages = 'all'  # or 'last'
  config.ekd.stop_gradient = True  # the teacher learns from cross-entropy only
  config.ekd.student_ce = 1.0  # weight of the sub-nets' own cross-entropy
  config.ekd.full_ce = 1.0  # weight of the full net's cross-entropy
  config.ekd.rampup_epochs = 1.0  # sigmoid ramp-up of alpha and beta (0: none)
  config.ekd.label_smoothing = 0.0  # of the full net's labels, its CE only (BigNAS: 0.1)
  # Delayed sub-nets (progressive shrinking, DpS): only the full net trains (and
  # runs) before this epoch; then each sub-net's whole loss ramps in over
  # rampup_epochs. 0: every depth from step 0.
  config.ekd.subnet_start_epochs = 0.0

  # How the step combines the full net's gradient g_f with the sub-nets' g_s on
  # the shared weights (methods ekd, joint_ce; ddnn_jax/gradients.py):
  # surgery 'project' drops the part of g_s that opposes g_f within each group
  # ('stage': stem, each stage, head; 'global': all weights), PCGrad-style;
  # equilibrium divides each weight's gradient by the number of depths using it;
  # 'measure' changes nothing and logs the per-group cosine of g_s with g_f
  # (train/grads/cos_<group>), as every rule does.
  config.grads = ml_collections.ConfigDict()
  config.grads.surgery = 'none'  # 'none', 'measure' or 'project'
  config.grads.groups = 'stage'  # 'stage' or 'global'
  config.grads.equilibrium = False

  config.data = datasets.data_config('digits')

  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 256  # global
  config.num_epochs = 30.0  # may be fractional

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.1  # peak learning rate at batch_size
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 5e-4  # L2 added to the gradient (torch-style SGD)
  config.optim.decay_bn_and_bias = False  # False: no decay on BN and bias
  config.optim.schedule = 'cosine'  # 'cosine', 'step' or 'constant'
  config.optim.warmup_epochs = 0.0  # linear warm-up from 0 before the schedule
  config.optim.min_lr_ratio = 0.0  # 'cosine': the floor, a fraction of the peak (BigNAS: 0.05)
  config.optim.milestones = (150.0, 225.0)  # 'step': epochs of each decay
  config.optim.decay_factor = 0.1  # 'step': multiplier at each milestone

  config.seed = 0  # parameters and data order
  config.log_every_steps = 50
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0  # a checkpoint is also saved at the end
  config.keep_checkpoints = 3
  # A step whose loss, gradients, parameters or BN statistics are not finite:
  # False stops training (nothing of it is saved); True keeps the previous state
  # for that step and counts it (train/nonfinite).
  config.skip_nonfinite_steps = False
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `smoke` variant: same method and model family, embedded data, seconds."""
  config.data = datasets.data_config('digits')
  config.model.width_multiplier = min(config.model.width_multiplier, 0.125)
  config.model.dtype = 'float32'
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 0.2  # 9 steps of the digits train split
  config.optim.warmup_epochs = 0.0
  config.optim.milestones = (0.1,)
  config.log_every_steps = 2
  config.eval_every_epochs = 0.2
  config.checkpoint_every_epochs = 0.1
  return config


# Short names for config arguments (`--config file.py:width=0.5,epochs=30`);
# any field path (`model.bn_mode=private_stats`, `eval_batch_size=64`) works too.
ALIASES = {
    'width': 'model.width_multiplier',
    'epochs': 'num_epochs',
    'seed': 'seed',
    'lr': 'optim.learning_rate',
    'batch': 'batch_size',
    'method': 'method',
    'root': 'data.root',
}


def _split_items(arg: str) -> list[str]:
  """Splits on the commas outside brackets and quotes: `depths=((1,1,1),(2,2,2))`
  is one item."""
  items, current, depth, quote = [], [], 0, None
  for char in arg:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      items.append(''.join(current))
      current = []
      continue
    current.append(char)
  items.append(''.join(current))
  return [item.strip() for item in items if item.strip()]


def parse_arg(arg: str | None) -> tuple[bool, list[tuple[str, str]]]:
  """(smoke, [(field path, value text)]) of a config argument such as
  'smoke,seed=2' or 'width=0.5,model.bn_mode=private_stats' (big_vision style)."""
  smoke, fields = False, []
  for item in _split_items(arg or ''):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep and key == 'smoke':
      smoke = True
    elif sep and key:
      fields.append((ALIASES.get(key, key), value.strip()))
    else:
      raise ValueError(f'config argument {item!r} is neither "smoke" nor KEY=VALUE; '
                       f'KEY is an alias ({", ".join(ALIASES)}) or a field path '
                       '(e.g. model.bn_mode)')
  return smoke, fields


def set_field(config: ml_collections.ConfigDict, path: str, text: str) -> None:
  """Sets the existing field `path` to `text` read as a Python literal, else as
  the string itself (also when the field is a string, e.g. root=2024)."""
  *parents, leaf = path.split('.')
  target = config
  for name in [*parents, leaf]:
    if not isinstance(target, ml_collections.ConfigDict) or name not in target:
      raise ValueError(f'unknown config argument key {path!r}: not a field of the config '
                       f'nor one of the aliases {", ".join(f"{k} ({v})" for k, v in ALIASES.items())}')
    parent, target = target, target[name]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if parent.get_type(leaf) is str and value is not None and not isinstance(value, str):
    value = text
  try:
    parent[leaf] = value  # ml_collections casts what it safely can (int -> float)
  except TypeError as e:
    raise ValueError(f'config argument {path}={text}: {e}') from e


def variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config argument (`--config file.py:ARG`); '' or None: as is.

  ARG is a comma-separated list: `smoke` (apply_smoke) and KEY=VALUE items, KEY
  an alias of ALIASES or a field path, VALUE a Python literal or else a string.
  `smoke` applies first, then the items in order, so `smoke,width=0.5` keeps 0.5.
  """
  smoke, fields = parse_arg(arg)
  if smoke:
    apply_smoke(config)
  for path, text in fields:
    set_field(config, path, text)
  return config
