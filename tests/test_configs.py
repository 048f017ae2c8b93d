"""Every shipped config: the full version is valid, the smoke version trains."""

import ast
import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ddnn_jax import config_lib, methods, train
from ddnn_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith(('__init__.py', 'base.py', 'datasets.py')))


def load(name, arg=''):
  return config_lib.load(os.path.join(ROOT, 'configs', name) + (f':{arg}' if arg else ''))


def test_all_configs_are_listed():
  assert CONFIGS == ['cifar10.py', 'cifar100.py', 'cifar10_folder.py', 'default.py',
                     'depth_pruning.py', 'imagenet.py', 'imagenet_r34.py', 'indistill.py',
                     'mcod.py', 'offline_kd.py', 'one.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_full_config_is_valid(name):
  config = load(name)
  with open(os.path.join(ROOT, 'configs', name)) as f:
    module_doc = f.read()
  assert 'python -m ddnn_jax.main --config configs/' + name in module_doc.replace('\\\n', '')
  num_classes = {'cifar100': 100, 'imagenet2012': 1000}.get(config.data.name, 10)
  if config.method == 'offline_kd':  # a teacher run: tests/test_method_offline_kd.py
    with pytest.raises(ValueError, match='needs a teacher'):
      methods.create_method(config, num_classes)
    config.method = 'ekd'
  method = methods.create_method(config, num_classes)
  assert method.depths[-1] == method.model.full_depth
  assert len(method.depths) >= 2
  config.method = 'individual'
  assert methods.create_method(config, num_classes).depths == (tuple(config.individual_depth),)


@pytest.mark.parametrize('name', CONFIGS + ['base.py', 'datasets.py'])
def test_loading_a_config_imports_neither_tensorflow_nor_ddnn_jax(name):
  # A fresh process: this one has imported both long ago.
  script = textwrap.dedent(f"""
      import importlib.util, sys
      sys.path.insert(0, {ROOT!r})
      spec = importlib.util.spec_from_file_location('config', {os.path.join(ROOT, 'configs', name)!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      if hasattr(module, 'get_config'):
        module.get_config()
      loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'ddnn_jax'))
      assert not loaded, loaded
      """)
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_configs_import_only_ml_collections_configs_and_the_stdlib():
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or '']
      else:
        continue
      for module in names:
        top = module.split('.')[0]
        assert top in ('ml_collections', 'configs') or top in sys.stdlib_module_names, (
            f'{os.path.basename(path)} imports {module}')


def test_dataset_presets_cover_the_pipeline_datasets():
  from configs import datasets
  from ddnn_jax import input_pipeline

  assert datasets.NAMES == input_pipeline.DATASETS == tuple(datasets.PRESETS)
  for name in datasets.NAMES:
    data = datasets.data_config(name)
    assert data.augment in input_pipeline.AUGMENTATIONS
    assert data.name == name and all(data.num_examples.values())
  assert not datasets.data_config('image_folder').num_examples  # depends on the root


def test_config_argument_parses_smoke_aliases_and_paths():
  from configs import base

  assert base.parse_arg('') == base.parse_arg(None) == (False, [])
  assert base.parse_arg("smoke, width=0.5,depths=((1,1,1),(2,2,2)),root='a,b'") == (
      True, [('model.width_multiplier', '0.5'), ('depths', '((1,1,1),(2,2,2))'),
             ('data.root', "'a,b'")])
  assert base.parse_arg('model.bn_mode=private_stats,lr=0.2,batch=64,epochs=3') == (
      False, [('model.bn_mode', 'private_stats'), ('optim.learning_rate', '0.2'),
              ('batch_size', '64'), ('num_epochs', '3')])


def test_config_argument_sets_typed_fields():
  config = load('cifar10_folder.py', 'smoke,seed=3,width=0.5,epochs=2,method=joint_ce,'
                'model.bn_mode=private_stats,root=2024,depths=((1,1,1),(3,3,3))')
  assert config.data.name == 'digits'  # smoke first, then the items
  assert config.seed == 3 and config.model.width_multiplier == 0.5
  assert config.num_epochs == 2.0 and isinstance(config.num_epochs, float)  # int -> float
  assert config.method == 'joint_ce' and config.model.bn_mode == 'private_stats'
  assert config.data.root == '2024'  # a string field keeps the text
  assert tuple(map(tuple, config.depths)) == ((1, 1, 1), (3, 3, 3))
  # As `python -m ddnn_jax.main --config configs/default.py:smoke,seed=3` passes it.
  from configs import default

  assert default.get_config('smoke,seed=3').seed == 3
  assert default.get_config('smoke,seed=3').to_dict() == load('default.py', 'smoke,seed=3').to_dict()


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match='neither "smoke" nor KEY=VALUE.*width, epochs'):
    load('cifar10.py', 'tiny')
  with pytest.raises(ValueError, match="unknown config argument key 'depth'.*width "
                     r'\(model.width_multiplier\)'):
    load('cifar10.py', 'smoke,depth=2')
  with pytest.raises(ValueError, match="unknown config argument key 'model.widht'"):
    load('cifar10.py', 'model.widht=2')
  with pytest.raises(ValueError, match='seed=2.5.*cannot be casted'):
    load('cifar10.py', 'seed=2.5')


# Trained elsewhere, whole and evaluated: default.py in test_train;
# offline_kd.py and indistill.py (they need a teacher run), one.py, mcod.py and
# depth_pruning.py in their test_method_* modules.
TRAINED_ELSEWHERE = ('default.py', 'offline_kd.py', 'indistill.py', 'one.py', 'mcod.py',
                     'depth_pruning.py')


@pytest.mark.parametrize('name', [c for c in CONFIGS if c not in TRAINED_ELSEWHERE])
def test_smoke_variant_trains(name, tmp_path):
  config = load(name, 'smoke')
  full = load(name)
  assert config.method == full.method and config.model.name == full.model.name
  assert config.data.name == 'digits'
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics['count'] == 360
  # 'auto' is resolved into the run's config.json: private_all for EKD.
  assert config_lib.load_saved(str(tmp_path)).model.bn_mode == (
      'private_all' if config.method == 'ekd' else 'shared')
  top1 = [v for k, v in metrics.items() if k.endswith('/top1')]
  members = methods.create_method(config, 10, 1).depths  # depths, branches or peers
  assert len(top1) == len(members) and all(np.isfinite(top1))


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
  workdir_lib.save_config(config, str(tmp_path))
  saved = config_lib.load_saved(str(tmp_path))  # JSON lists are tuples again
  assert saved.depths == ((1, 1, 1), (3, 3, 3)) and saved.optim.learning_rate == 0.3
  config_lib.apply_overrides(saved, ['depths=((2,2,2),(3,3,3))'])
  assert saved.depths == ((2, 2, 2), (3, 3, 3))
  with pytest.raises(ValueError, match=r'did you mean --config\.optim\.learning_rate\?'):
    config_lib.apply_overrides(saved, ['learning_rate=0.1'])
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    config_lib.load_saved(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='nope.py does not exist'):
    config_lib.load(os.path.join(ROOT, 'configs', 'nope.py'))
