"""Test-session settings and fixtures shared by every test module."""

import collections
import os
import pathlib
import shutil
import tarfile
import tempfile

# The tests run on the CPU. The test extra installs libtpu (for the TPU
# ahead-of-time compile tests), which would otherwise look for a TPU at start-up.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                 'ship', 'truck')

# The partitionable threefry PRNG (jax's default) makes XLA:CPU compile parameter
# initialisation about 3x slower (16 s instead of 6 s for CIFAR ResNet-20 on two
# cores). No test depends on the particular random stream, and every parameter
# here is replicated, so the tests use the faster-compiling variant.
jax.config.update('jax_threefry_partitionable', False)

from ddnn_jax import reporting, runtime  # noqa: E402

# Every report times each depth's forward for a second by default; the tests
# only need the img/s column filled (two timed runs), and timing belongs in
# bench/. Runs a test starts as a subprocess keep the default.
reporting.THROUGHPUT_MIN_SECONDS = 0.0

# Most runs a test makes compile programs that another run of the session has
# compiled already: a resume test trains one config two or three times, and the
# smoke configs recur across modules. One persistent compilation cache per test
# session (shared by the xdist workers, as `main` keeps one between runs) loads
# them instead. DDNN_TEST_COMPILATION_CACHE=0 compiles everything afresh.
_CACHE_ENV = 'DDNN_TEST_XLA_CACHE'


def pytest_configure(config):
  if os.environ.get('DDNN_TEST_COMPILATION_CACHE', '1') == '0':
    return
  if _CACHE_ENV not in os.environ and not hasattr(config, 'workerinput'):
    # The controller (or a run without xdist): workers inherit the variable.
    os.environ[_CACHE_ENV] = config.ddnn_xla_cache = tempfile.mkdtemp(prefix='ddnn_xla_')
  runtime.enable_compilation_cache(os.environ.get(_CACHE_ENV))


def pytest_unconfigure(config):
  if getattr(config, 'ddnn_xla_cache', None):
    shutil.rmtree(config.ddnn_xla_cache, ignore_errors=True)


def _module_fixture_groups(items) -> dict:
  """{item: group name}: the tests that share a module-scoped fixture of this
  suite (a training run most of them), joined over every fixture they share."""
  parent = {}

  def find(name):
    while parent.setdefault(name, name) != name:
      name = parent[name]
    return name

  shared = {}
  for item in items:
    info = getattr(item, '_fixtureinfo', None)
    names = [f'{item.module.__name__}::{name}' for name, defs in
             (info.name2fixturedefs.items() if info else ())
             if defs and defs[-1].scope == 'module']
    if names:
      shared[item] = names
      for name in names[1:]:
        parent[find(name)] = find(names[0])
  return {item: find(names[0]) for item, names in shared.items()}


# The modules that hold the suite's longest tests (multi-process and 8-device
# runs, TPU compiles, resumes of several runs: 20-90 s each), heaviest first.
# They run first so that the last tests a worker takes are short ones: xdist
# hands each worker up to three tests ahead, and three of these at the end
# left one worker busy for minutes while the other idled.
HEAVY_MODULES_FIRST = ('test_train.py', 'test_aot.py', 'test_launch.py',
                       'test_method_mcod.py', 'test_method_one.py', 'test_configs.py',
                       'test_any_depth.py', 'test_bad_input.py',
                       'test_method_depth_pruning.py', 'test_export.py', 'test_release.py')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  # pytest -n 2 (the README's command) runs with --dist loadgroup
  # (pyproject.toml): the tests that share a module-scoped fixture run on one
  # worker, so each such fixture (a training run, 20-70 s) is computed once,
  # not once a worker. xdist starts with the largest groups, then takes the
  # other tests in this order.
  heavy = {name: i for i, name in enumerate(HEAVY_MODULES_FIRST)}
  items.sort(key=lambda item: heavy.get(item.path.name, len(heavy)))
  for item, group in _module_fixture_groups(items).items():
    item.add_marker(pytest.mark.xdist_group(group))


# The CIFAR-10 JPEG tar for the real-data tests: $DDNN_CIFAR10_TAR, else the
# shared datasets folder beside the repository when it is there.
DEFAULT_CIFAR10_TAR = REPO.parent / 'shared' / 'datasets' / 'cifar10-jpeg-train.tar'


def cifar10_tar() -> pathlib.Path | None:
  name = os.environ.get('DDNN_CIFAR10_TAR')
  if name:
    return REPO / name
  return DEFAULT_CIFAR10_TAR if DEFAULT_CIFAR10_TAR.is_file() else None


def pytest_report_header(config):
  path = cifar10_tar()
  if path is None:
    return (f'real-data tests: SKIPPED, no CIFAR-10 tar at {DEFAULT_CIFAR10_TAR}; '
            'set DDNN_CIFAR10_TAR to run them')
  return f'real-data tests: {path}'


@pytest.fixture(scope='session')
def cifar_roots(tmp_path_factory):
  """ROOT/train with 30 real CIFAR-10 JPEGs per class, OTHER/test with 10 more."""
  path = cifar10_tar()
  if path is None:
    pytest.skip(f'no CIFAR-10 tar at {DEFAULT_CIFAR10_TAR}; set DDNN_CIFAR10_TAR')
  if not path.is_file():
    pytest.fail(f'DDNN_CIFAR10_TAR={os.environ["DDNN_CIFAR10_TAR"]}: {path} does not exist')
  base = tmp_path_factory.mktemp('cifar')
  taken = collections.Counter()
  with tarfile.open(path) as tar:
    for member in tar:
      parts = member.name.split('/')
      if not member.isfile() or len(parts) != 3 or taken[parts[1]] >= 40:
        continue
      split_dir = ('ROOT', 'train') if taken[parts[1]] < 30 else ('OTHER', 'test')
      target = base.joinpath(*split_dir, parts[1], parts[2])
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(tar.extractfile(member).read())
      taken[parts[1]] += 1
  assert sorted(taken) == list(CIFAR_CLASSES) and set(taken.values()) == {40}
  return base / 'ROOT', base / 'OTHER'


def run_cli(module, *args: str) -> int:
  """Exit status of `python -m ddnn_jax.<module> ARGS`'s flag parsing and
  main (evaluate, export, search, release), run in this process on fresh
  flags (without the process settings)."""
  from absl import flags  # noqa: PLC0415

  values = flags.FlagValues()
  name = module.__name__.rsplit('.', 1)[-1]
  try:
    module.main(module.parse_flags([name, *args], values), values)
  except SystemExit as e:
    return e.code
  return 0


def evaluate_cli(*args: str) -> int:
  """Exit status of `python -m ddnn_jax.evaluate ARGS` (run_cli)."""
  from ddnn_jax import evaluate  # noqa: PLC0415

  return run_cli(evaluate, *args)


def train_tiny_folder_run(root, workdir: str, bn_mode: str = 'shared') -> str:
  """One epoch of cifar10_folder (EKD) at width 1/8 on `root` (cifar_roots'
  ROOT: 250 training JPEGs, 50 held out as validation) in `workdir`, about
  30 s on two busy cores: a trained run for export and search to read. With
  shared norm layers unless `bn_mode` says otherwise ('auto': EKD's default,
  per-depth ones), since re-calibrating each depth is what those read it for."""
  from ddnn_jax import config_lib, train  # noqa: PLC0415

  config = config_lib.load(str(REPO / 'configs' / 'cifar10_folder.py'))
  config.model.bn_mode = bn_mode
  config.data.root = str(root)
  config.data.validation_size = 50
  config.data.data_dir = f'{workdir}_tfds'
  config.model.width_multiplier = 0.125
  config.update(dict(batch_size=50, eval_batch_size=50, num_epochs=1.0,
                     log_every_steps=1, eval_every_epochs=1.0))
  train.train_and_evaluate(config, workdir)
  return workdir
