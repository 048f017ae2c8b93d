"""Every shipped config: the full version is valid, the smoke version trains."""

import glob
import os

import numpy as np
import pytest

from ddnn_jax import config_lib, methods, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith(('__init__.py', 'base.py')))


def load(name, arg=''):
  return config_lib.load(os.path.join(ROOT, 'configs', name) + (f':{arg}' if arg else ''))


def test_all_configs_are_listed():
  assert CONFIGS == ['cifar10.py', 'cifar100.py', 'cifar10_folder.py', 'default.py',
                     'imagenet.py', 'imagenet_r34.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_full_config_is_valid(name):
  config = load(name)
  with open(os.path.join(ROOT, 'configs', name)) as f:
    module_doc = f.read()
  assert 'python -m ddnn_jax.main --config configs/' + name in module_doc.replace('\\\n', '')
  num_classes = {'cifar100': 100, 'imagenet2012': 1000}.get(config.data.name, 10)
  method = methods.create_method(config, num_classes)
  assert method.depths[-1] == method.model.full_depth
  assert len(method.depths) >= 2
  config.method = 'individual'
  assert methods.create_method(config, num_classes).depths == (tuple(config.individual_depth),)


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match='only one is "smoke"'):
    load('cifar10.py', 'tiny')


@pytest.mark.parametrize('name', [c for c in CONFIGS if c != 'default.py'])  # in test_train
def test_smoke_variant_trains(name, tmp_path):
  config = load(name, 'smoke')
  full = load(name)
  assert config.method == full.method and config.model.name == full.model.name
  assert config.data.name == 'digits'
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics['count'] == 360
  top1 = [v for k, v in metrics.items() if k.endswith('/top1')]
  assert len(top1) == len(full.depths) and all(np.isfinite(top1))


def test_apply_overrides_literals_strings_and_nesting():
  config = load('cifar10_folder.py')
  config_lib.apply_overrides(config, ['model.width_multiplier=0.5', 'method=joint_ce',
                                    'depths=((1,1,1),(3,3,3))', 'ekd.rampup_epochs=2'])
  assert config.model.width_multiplier == 0.5 and config.method == 'joint_ce'
  assert tuple(map(tuple, config.depths)) == ((1, 1, 1), (3, 3, 3))
  assert config.ekd.rampup_epochs == 2
  with pytest.raises(ValueError, match='is not FIELD=VALUE'):
    config_lib.apply_overrides(config, ['model.width_multiplier'])


def test_load_and_saved_config_take_overrides_as_the_flags_do(tmp_path):
  config = config_lib.load(os.path.join(ROOT, 'configs', 'default.py:smoke'),
                           ['optim.learning_rate=0.3', 'depths=((1,1,1),(3,3,3))'])
  assert config.optim.learning_rate == 0.3 and config.depths == ((1, 1, 1), (3, 3, 3))
  train.save_config(config, str(tmp_path))
  saved = config_lib.load_saved(str(tmp_path))  # JSON lists are tuples again
  assert saved.depths == ((1, 1, 1), (3, 3, 3)) and saved.optim.learning_rate == 0.3
  config_lib.apply_overrides(saved, ['depths=((2,2,2),(3,3,3))'])
  assert saved.depths == ((2, 2, 2), (3, 3, 3))
  with pytest.raises(ValueError, match='not --config.learning_rate'):
    config_lib.apply_overrides(saved, ['learning_rate=0.1'])
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    config_lib.load_saved(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='nope.py does not exist'):
    config_lib.load(os.path.join(ROOT, 'configs', 'nope.py'))
