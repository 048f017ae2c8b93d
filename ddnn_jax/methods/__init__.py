"""Training methods as plug-ins: `config.method` names an entry of the registry.

One module per method (ekd.py, joint_ce.py, individual.py, ...) registers a
builder `(config, num_classes, steps_per_epoch) -> Method` under its name with
`@register('name')`; `create_method(config, ...)` looks it up. base.py defines
the interface (`Method`, `Teacher`, objectives) and the helpers methods share.
A new method is a new file here plus its import below.
"""

from ddnn_jax.methods import (  # noqa: F401, E402 -- they register
    depth_pruning,
    ekd,
    indistill,
    individual,
    joint_ce,
    mcod,
    offline_kd,
    one,
)
from ddnn_jax.methods.base import (
    BN_AUTO,
    Builder,
    Method,
    Objective,
    Teacher,
    Trainable,
    Transition,
    apply_transitions,
    bn_mode,
    create_method,
    create_model,
    keep_frozen,
    names,
    phase_index,
    phased,
    register,
    resolve_bn_mode,
    train_depths,
)

__all__ = ['BN_AUTO', 'Builder', 'Method', 'Objective', 'Teacher', 'Trainable', 'Transition',
           'apply_transitions', 'bn_mode', 'create_method', 'create_model', 'keep_frozen',
           'names', 'phase_index', 'phased', 'register', 'resolve_bn_mode', 'train_depths']
