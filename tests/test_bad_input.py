"""Bad input: every case is one line `error: ...`, a non-zero exit, no traceback,
nothing printed after it, and a workdir left as it was; docs/BAD_INPUT.md
shows each case's real message.

Each case runs `python -m ddnn_jax.main --config configs/default.py:smoke
--workdir WORKDIR ...` in a fresh process. To refresh the table in
docs/BAD_INPUT.md after changing a message, run this file as a script:

  JAX_PLATFORMS=cpu python tests/test_bad_input.py [CASE_ID ...]

which prints the table rows with the messages the cases produce now (or run
the tests with BAD_INPUT_ROWS=FILE, which appends each case's row to FILE).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'BAD_INPUT.md'
SMOKE = 'configs/default.py:smoke'
# Runs the trainer's entry point after the case's `prelude` (a monkeypatch).
RUN_MAIN = ('from absl import app\nfrom ddnn_jax import main\n'
            'app.run(main.main, flags_parser=main.parse_flags)\n')
# A full disk, mocked: every checkpoint save fails as Orbax's writes fail.
DISK_FULL = ('import errno, os\nimport orbax.checkpoint as ocp\n'
             'def _full(*args, **kwargs):\n'
             '  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n'
             'ocp.CheckpointManager.save = _full\n')
# An image folder the data cases share: 2 classes x 6 JPEGs of 8x8 pixels.
FOLDER = ('--config.data.name=image_folder', '--config.data.root={tmp}/root',
          '--config.data.data_dir={tmp}/cache', '--config.data.eval_split=validation',
          '--config.data.validation_size=4')
# Trains one step of the smoke config (about 20 s on two busy cores).
ONE_STEP = ('--config.num_epochs=0.03',)


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  what: str  # what the user did, for docs/BAD_INPUT.md
  args: tuple[str, ...]  # after --config/--workdir; {tmp} and {workdir} are filled in
  error: str  # a regex the error line must match
  code: int = 2  # 2: bad input (as a bad flag); 1: a run that failed
  setup: Callable[[pathlib.Path, pathlib.Path], None] | None = None  # (tmp, workdir)
  config: str | None = SMOKE  # None: no --config flag
  workdir: str | None = '{tmp}/workdir'  # None: no --workdir flag
  devices: int = 1
  prelude: str = ''  # Python run before main (a mocked failure)
  wrap: str = ''  # 'read_only' or 'tmpfs': how the command runs, see _command
  entry: str = 'main'  # the module run: ddnn_jax.main or ddnn_jax.evaluate
  # A regex of the part of the line that differs between runs (which array of
  # a damaged checkpoint TensorStore reads first); compared as '...'.
  varies: str = ''
  # Whether the run may write to the workdir before it fails (a failure that
  # only shows while training); else the workdir must be left as it was.
  writes: bool = False


def _images(directory: pathlib.Path, count: int, seed: int) -> None:
  """`count` real 8x8 JPEGs in `directory`."""
  from PIL import Image  # noqa: PLC0415 -- only the data cases need it

  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / f'{i}.jpg', quality=90)


def folder(tmp: pathlib.Path, workdir: pathlib.Path, splits=None) -> None:
  """TMP/root/<split>/<class>/<i>.jpg (default: train with cat and dog)."""
  del workdir
  for s, (split, classes) in enumerate((splits or {'train': ('cat', 'dog')}).items()):
    for c, name in enumerate(classes):
      _images(tmp / 'root' / split / name, 6, seed=10 * s + c)


def corrupt_folder(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  folder(tmp, workdir)
  (tmp / 'root' / 'train' / 'dog' / '3.jpg').write_bytes(b'not a jpeg, just bytes')


def other_classes(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  folder(tmp, workdir, {'train': ('cat', 'dog'), 'validation': ('cat', 'lorry')})


def truncated_tar(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  """TMP/data.tar: the image folder's tar, cut in the middle of a file."""
  import tarfile  # noqa: PLC0415

  folder(tmp, workdir)
  with tarfile.open(tmp / 'full.tar', 'w') as tar:
    tar.add(tmp / 'root' / 'train', arcname='train')
  content = (tmp / 'full.tar').read_bytes()
  (tmp / 'data.tar').write_bytes(content[:len(content) // 2])


def write(name: str, content: bytes) -> Callable[[pathlib.Path, pathlib.Path], None]:
  def setup(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
    del workdir
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_bytes(content)
  return setup


def workdir_file(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  workdir.write_text('notes\n')


def empty_workdir(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  workdir.mkdir()


@functools.cache
def trained_workdir() -> pathlib.Path:
  """A workdir holding one step of the smoke config (once per test process)."""
  import atexit  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  base = tempfile.mkdtemp(prefix='bad_input_trained_')
  atexit.register(shutil.rmtree, base, ignore_errors=True)
  workdir = pathlib.Path(base) / 'run'
  result = subprocess.run(_command(Case('train', '', ONE_STEP, ''), workdir, workdir),
                          cwd=ROOT, env=_env(1), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_of_trained_run(*, keep_config: bool = True, damage: bool = False):
  def setup(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
    del tmp
    shutil.copytree(trained_workdir(), workdir)
    if not keep_config:  # only the checkpoints tell which model they hold
      (workdir / 'config.json').unlink()
    if damage:  # every array file of every checkpoint overwritten
      for path in (workdir / 'checkpoints').glob('*/*/**/d/*'):
        path.write_bytes(b'\0garbage\0' * 64)
  return setup


@functools.cache
def trained_folder_workdir() -> pathlib.Path:
  """A workdir holding one step of the smoke config on the image folder of
  `folder` (classes cat and dog), which stays next to it as root/."""
  import atexit  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  base = pathlib.Path(tempfile.mkdtemp(prefix='bad_input_folder_'))
  atexit.register(shutil.rmtree, base, ignore_errors=True)
  folder(base, base / 'run')
  args = tuple(a.format(tmp=base) for a in (
      *FOLDER, *ONE_STEP, '--config.batch_size=4', '--config.eval_batch_size=4'))
  result = subprocess.run(_command(Case('train', '', args, ''), base, base / 'run'),
                          cwd=ROOT, env=_env(1), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return base


def folder_run_and_other_root(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  """WORKDIR: a run trained on an image folder of cat and dog, whose training
  root is copied to TMP/root; TMP/other/test holds cat and lorry."""
  folder(tmp, workdir, {'test': ('cat', 'lorry')})
  (tmp / 'root').rename(tmp / 'other')
  shutil.copytree(trained_folder_workdir() / 'run', workdir)
  shutil.copytree(trained_folder_workdir() / 'root', tmp / 'root')


CASES = [
    # Flags and config files: refused while parsing the flags.
    Case('config_field_misplaced', 'a config field at the wrong level',
         ('--config.learning_rate=0.1',),
         r'unknown config field --config\.learning_rate: did you mean '
         r'--config\.optim\.learning_rate\?'),
    Case('config_file_missing', 'a --config file that does not exist',
         ('--config=configs/nope.py',), r"could not load the --config file.*configs/nope\.py",
         config=None),
    Case('config_argument_unknown', 'an unknown key in the config argument',
         ('--config=configs/default.py:smoke,nosuch=1',), r"unknown config argument key 'nosuch'",
         config=None),
    Case('config_value_wrong_type', 'a value of the wrong type',
         ('--config.num_epochs=abc',), r"could not convert string to float: 'abc'"),
    Case('workdir_flag_missing', 'no --workdir', (), r'--workdir is required',
         workdir=None),
    # Names and ranges: refused by ddnn_jax/config_checks.py before anything else.
    Case('method_unknown', 'an unknown method', ('--config.method=distill',),
         r"unknown method 'distill'; set --config\.method to one of depth_pruning, ekd, "),
    Case('model_unknown', 'an unknown model preset', ('--config.model.name=resnet19',),
         r"unknown model\.name 'resnet19'; set --config\.model\.name to one of"),
    Case('bn_mode_unknown', 'an unknown BatchNorm mode', ('--config.model.bn_mode=private',),
         r"unknown model\.bn_mode 'private'"),
    Case('conv_impl_unknown', 'an unknown convolution kernel',
         ('--config.model.conv_impl=cudnn',), r"unknown model\.conv_impl 'cudnn'"),
    Case('schedule_unknown', 'an unknown learning-rate schedule',
         ('--config.optim.schedule=linear',), r"unknown optim\.schedule 'linear'"),
    Case('dataset_unknown', 'an unknown dataset', ('--config.data.name=mnist',),
         r"unknown data\.name 'mnist'"),
    Case('augment_unknown', 'an unknown augmentation', ('--config.data.augment=mixup',),
         r"unknown data\.augment 'mixup'"),
    Case('ekd_attention_unknown', 'an unknown EKD attention map',
         ('--config.ekd.attention=at_p3',), r"unknown ekd\.attention 'at_p3'"),
    Case('learning_rate_negative', 'a negative learning rate (trained until NaN before)',
         ('--config.optim.learning_rate=-0.1',),
         r'optim\.learning_rate=-0\.1 must be a number > 0; pass e\.g\. '
         r'--config\.optim\.learning_rate=0\.1'),
    Case('momentum_out_of_range', 'a momentum of 1 or more',
         ('--config.optim.momentum=1.5',), r'optim\.momentum=1\.5 must be a number in \[0, 1\)'),
    Case('num_epochs_zero', 'zero epochs (trained one step before)',
         ('--config.num_epochs=0',), r'num_epochs=0\.0 must be a number > 0'),
    Case('num_epochs_negative', 'a negative number of epochs',
         ('--config.num_epochs=-3',), r'num_epochs=-3\.0 must be a number > 0'),
    Case('batch_size_zero', 'a batch size of 0', ('--config.batch_size=0',),
         r'batch_size=0 must be a whole number >= 1'),
    Case('eval_batch_size_zero', 'an evaluation batch size of 0',
         ('--config.eval_batch_size=0',), r'eval_batch_size=0 must be a whole number >= 1'),
    Case('log_every_steps_zero', 'logging every 0 steps (divided by zero before)',
         ('--config.log_every_steps=0',), r'log_every_steps=0 must be a whole number >= 1'),
    Case('width_multiplier_zero', 'a width multiplier of 0',
         ('--config.model.width_multiplier=0',), r'model\.width_multiplier=0\.0 must be'),
    Case('depths_empty', 'an empty depth list', ('--config.depths=()',),
         r'depths=\(\) is empty; .*--config\.depths=\(\(1,1,1\),\(3,3,3\)\)'),
    Case('depths_not_tuples', 'one depth where a list of depths belongs',
         ('--config.depths=(1,1,1)',),
         r'depths=\(1,1,1\): depth 1 must be a sequence of 3 integers'),
    Case('depths_strings', 'depths written as strings',
         ('--config.depths=("1,1,1",)',), r"depth '1,1,1' must be a sequence of 3 integers"),
    Case('depth_too_deep', 'a depth with more blocks than the preset has',
         ('--config.depths=((1,1,1),(4,1,1))',), r'stage 1 has 4 blocks; allowed 1\.\.3'),
    Case('depth_stage_count', 'a depth with the wrong number of stages',
         ('--config.depths=((1,1,1,1),)',), r'has 4 entries but the model has 3 stages'),
    Case('individual_depth_invalid', "method 'individual' with an impossible depth",
         ('--config.method=individual', '--config.individual_depth=(2,5,2)'),
         r'individual_depth=\(2,5,2\): .*stage 2 has 5 blocks'),
    # A method's own settings: refused when the method is built, before any write.
    Case('method_setting_invalid', "a setting of method 'one' out of range",
         ('--config.method=one', '--config.one.branches=1'),
         r'one\.branches=1 must be a whole number >= 2'),
    Case('teacher_workdir_missing', "method 'offline_kd' without a teacher",
         ('--config.method=offline_kd',), r'needs a teacher: pass --config\.teacher_workdir'),
    Case('any_depth_method', 'any-depth training with a method that has no depths',
         ('--config.method=individual', '--config.any_depth.k=2'),
         r"any_depth\.k=2: method 'individual' does not train the depths of one DDNN"),
    Case('any_depth_too_many', 'more sampled depths per step than the pool holds',
         ('--config.any_depth.k=4', '--config.any_depth.max_programs=3'),
         r'any_depth\.k=4 exceeds the 3 depths it can draw from'),
    Case('any_depth_private_bn', 'any-depth training with per-depth BatchNorm',
         ('--config.any_depth.k=2', '--config.model.bn_mode=private_stats'),
         r'any_depth\.k=2 needs model\.bn_mode=shared'),
    # Sizes that depend on the devices or the data.
    Case('batch_size_not_divisible', 'a batch size the 8 devices cannot split',
         ('--config.batch_size=30',), r'batch_size=30 is not divisible by the 8 devices',
         devices=8),
    Case('batch_size_exceeds_dataset', 'a batch larger than the training split',
         ('--config.batch_size=3000',), r'exceeds the 1437 training examples'),
    Case('eval_split_missing', 'an evaluation split the dataset lacks',
         ('--config.data.eval_split=validation',), r"has no split 'validation'"),
    # Image folders.
    Case('image_folder_root_unset', 'image_folder without data.root',
         ('--config.data.name=image_folder',), r'image_folder needs a root'),
    Case('image_folder_root_missing', 'a data.root that does not exist',
         ('--config.data.name=image_folder', '--config.data.root={tmp}/nowhere'),
         r'root .*/nowhere does not exist'),
    Case('image_folder_root_not_a_folder', 'a data.root that is a plain file',
         ('--config.data.name=image_folder', '--config.data.root={tmp}/notes.txt'),
         r'is neither a folder nor a \.tar', setup=write('notes.txt', b'hello\n')),
    Case('image_folder_root_not_a_tar', 'a data.root .tar that is not a tar',
         ('--config.data.name=image_folder', '--config.data.root={tmp}/data.tar',
          '--config.data.data_dir={tmp}/cache'),
         r'data\.tar is not a tar archive', setup=write('data.tar', b'\x00garbage' * 200)),
    Case('image_folder_root_truncated_tar', 'a data.root .tar cut short',
         ('--config.data.name=image_folder', '--config.data.root={tmp}/data.tar',
          '--config.data.data_dir={tmp}/cache'),
         r'data\.tar is a damaged tar', setup=truncated_tar),
    Case('image_folder_no_splits', 'a data.root folder without split folders',
         FOLDER, r'has no split folders', setup=write('root/readme.txt', b'empty\n')),
    Case('image_folder_holdout_too_big', 'a validation hold-out as big as the folder',
         (*FOLDER, '--config.data.validation_size=100'), r'a hold-out of 100 leaves no',
         setup=folder),
    Case('image_folder_corrupt_jpeg', 'a corrupt JPEG inside the image folder',
         FOLDER, r'image .*/root/train/dog/3\.jpg does not decode', setup=corrupt_folder),
    Case('image_folder_corrupt_jpeg_lazy',
         'a corrupt JPEG, read lazily (data.decode_once=False): found while training',
         (*FOLDER, '--config.data.decode_once=False', '--config.batch_size=4',
          '--config.eval_batch_size=4', '--config.num_epochs=1'),
         r'image .*/root/train/dog/3\.jpg does not decode', setup=corrupt_folder,
         writes=True),
    Case('image_folder_split_classes_differ',
         'a validation folder with other classes than train',
         FOLDER, r"validation/ has other class folders than train/ \(missing \['dog'\], "
                 r"extra \['lorry'\]\)", setup=other_classes),
    # The workdir.
    Case('workdir_is_file', 'a --workdir that is a file', (), r'is a file \(Not a directory\)',
         setup=workdir_file),
    Case('workdir_parent_is_file', 'a --workdir below a file', (),
         r'/notes\.txt is a file \(Not a directory\)', setup=write('notes.txt', b'hello\n'),
         workdir='{tmp}/notes.txt/run'),
    Case('workdir_read_only', 'a read-only --workdir', (),
         r'is not writable \((Permission denied|Read-only file system)\)',
         setup=empty_workdir, wrap='read_only'),
    Case('workdir_other_config', 'a workdir with checkpoints of another config',
         ('--config.model.width_multiplier=0.25',),
         r'holds checkpoints of another config \(model\.width_multiplier 0\.125 -> 0\.25\)',
         setup=copy_of_trained_run()),
    Case('checkpoint_other_model', 'checkpoints of another model (and no config.json)',
         ('--config.model.width_multiplier=0.25',), r'checkpoints in .*/checkpoints hold another model \(checkpoint step 1 holds another model: batch_stats/',
         setup=copy_of_trained_run(keep_config=False)),
    Case('checkpoints_damaged', 'a workdir whose every checkpoint is damaged', (),
         r'no checkpoint in .*/checkpoints is readable \(steps \[1\]\)',
         setup=copy_of_trained_run(damage=True)),
    # python -m ddnn_jax.evaluate: the run's config.json is its config.
    Case('eval_workdir_missing', 'evaluate a --workdir that does not exist (a typo)', (),
         r'nowhere/config\.json does not exist', entry='evaluate', config=None,
         workdir='{tmp}/nowhere'),
    Case('eval_step_missing', 'evaluate a step that was never saved', ('--step=99',),
         r'no checkpoint for step 99', entry='evaluate', config=None,
         setup=copy_of_trained_run()),
    Case('eval_step_damaged', 'evaluate a damaged step', ('--step=1',),
         r'checkpoint step 1 in .*/checkpoints is unreadable .*; readable steps: none',
         entry='evaluate', config=None, setup=copy_of_trained_run(damage=True),
         varies=r'\(ValueError: .*\)(?=; readable)'),
    Case('eval_recalibrate_negative', 'evaluate with a negative BN re-calibration count',
         ('--recalibrate_bn=-1',), r'--recalibrate_bn=-1: -1 is not a non-negative integer',
         entry='evaluate', config=None, setup=copy_of_trained_run()),
    Case('eval_config_field_misplaced', 'evaluate with a config field at the wrong level',
         ('--config.learning_rate=0.1',), r'did you mean --config\.optim\.learning_rate\?',
         entry='evaluate', config=None, setup=copy_of_trained_run()),
    Case('eval_root_not_image_folder', 'evaluate another --root of a TFDS dataset',
         ('--root={tmp}', '--split=test'), r'root= applies to image_folder only, not digits',
         entry='evaluate', config=None, setup=copy_of_trained_run()),
    Case('eval_root_other_classes',
         'evaluate another --root whose class folders differ from the training root',
         ('--config.data.root={tmp}/root', '--config.data.data_dir={tmp}/cache',
          '--root={tmp}/other', '--split=test'),
         r"root .*/other has class folders \['cat', 'lorry'\] but the training root "
         r".*/root has \['cat', 'dog'\]", entry='evaluate', config=None,
         setup=folder_run_and_other_root),
    # Runs that fail midway (exit 1) say how to resume.
    Case('training_diverges', 'a learning rate so high that training diverges',
         ('--config.optim.learning_rate=1e38', '--config.num_epochs=0.05'),
         r'training diverged at step 2: .*no checkpoint exists', code=1, writes=True),
    Case('disk_full_save', 'a checkpoint save on a full disk (mocked write failure)',
         ONE_STEP, r'could not write a checkpoint to .*/checkpoints \(No space left on '
                   r'device\); free space', code=1, prelude=DISK_FULL, writes=True),
    Case('disk_full_tmpfs', 'a checkpoint save on a full disk (a 64 KiB tmpfs)',
         ONE_STEP, r'could not write a checkpoint to .*/checkpoints \(No space left on '
                   r'device\); free space', code=1, wrap='tmpfs', writes=True),
]


@functools.cache
def _can_mount() -> bool:
  """Whether this process may mount in a private namespace (root with unshare)."""
  if os.geteuid() != 0 or not shutil.which('unshare'):
    return False
  return subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode == 0


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_THREEFRY_PARTITIONABLE='0',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # as a user has it
  return env


def _workdir(case: Case, tmp: pathlib.Path) -> pathlib.Path:
  if case.wrap == 'tmpfs':  # the mount point is its parent
    return tmp / 'disk' / 'workdir'
  return pathlib.Path((case.workdir or '{tmp}/workdir').format(tmp=tmp))


def _command(case: Case, tmp: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  fill = lambda a: a.format(tmp=tmp, workdir=workdir)  # noqa: E731
  argv = [f'--config={case.config}'] if case.config else []
  argv += [f'--workdir={workdir}'] if case.workdir else []
  argv += [fill(a) for a in case.args]
  python = ([sys.executable, '-c', case.prelude + RUN_MAIN] if case.prelude
            else [sys.executable, '-m', f'ddnn_jax.{case.entry}'])
  if case.wrap == 'read_only' and os.geteuid() == 0:  # root ignores permissions
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ['unshare', '-m', 'sh', '-c', script, str(workdir), *python, *argv]
  if case.wrap == 'tmpfs':  # a disk of 64 KiB, gone when the process ends
    script = 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"'
    return ['unshare', '-m', 'sh', '-c', script, str(workdir.parent), *python, *argv]
  return [*python, *argv]


def _snapshot(path: pathlib.Path) -> dict[str, tuple]:
  """Every file and folder under `path` (or `path` itself): kind, mtime, content."""
  if not os.path.lexists(path):
    return {}
  entries = {}
  for item in [path, *sorted(path.rglob('*'))] if path.is_dir() else [path]:
    stat = item.lstat()
    digest = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else None
    entries[str(item.relative_to(path))] = (stat.st_mode, stat.st_mtime_ns, digest)
  return entries


def run_case(case: Case, tmp: pathlib.Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
  """(the finished process, workdir snapshots before and after) of `case`."""
  workdir = _workdir(case, tmp)
  if case.wrap == 'tmpfs':
    workdir.parent.mkdir()
  if case.wrap and not (case.wrap == 'read_only' and os.geteuid() != 0) and not _can_mount():
    pytest.skip(f'{case.id} needs root and `unshare -m` to mount')
  if case.setup:
    case.setup(tmp, workdir)
  read_only = case.wrap == 'read_only' and os.geteuid() != 0
  if read_only:
    workdir.chmod(0o555)
  before = _snapshot(workdir)
  try:
    result = subprocess.run(_command(case, tmp, workdir), cwd=ROOT, env=_env(case.devices),
                            capture_output=True, text=True, timeout=600)
  finally:
    if read_only:
      workdir.chmod(0o755)
  return result, before, _snapshot(workdir)


def error_line(result: subprocess.CompletedProcess) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return lines[-1] if lines else ''


def as_documented(line: str, case: Case, tmp: pathlib.Path) -> str:
  """The error line with this run's paths replaced by WORKDIR and TMP."""
  for path, name in ((_workdir(case, tmp), 'WORKDIR'), (tmp, 'TMP')):
    for form in dict.fromkeys((str(path), os.path.realpath(path))):
      line = line.replace(form, name)
  return line


def documented() -> dict[str, tuple[list[str], str]]:
  """{case id: (error lines, exit status)} of the table in docs/BAD_INPUT.md."""
  rows = {}
  for line in DOC.read_text().splitlines():
    cells = [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', line)[1:-1]]
    if len(cells) == 4 and cells[0].startswith('`'):  # each `error: ...` of the cell
      rows[cells[0].strip('`')] = (re.findall(r'`([^`]+)`', cells[2]), cells[3])
  return rows


def table_row(case: Case, line: str, code: int) -> str:
  """The row of docs/BAD_INPUT.md for `case`, whose error line (as documented)
  is `line` and exit status `code`."""
  args = case.args
  for common in (FOLDER, ONE_STEP):  # described once, above the table
    if args[:len(common)] == common:
      args = args[len(common):]
  args = ' '.join(a.format(tmp='TMP', workdir='WORKDIR') for a in args)
  what = f'{case.what}: `{args}`' if args else case.what
  escaped = line.replace('|', '\\|')  # a pipe would end the table cell
  return f'| `{case.id}` | {what} | `{escaped}` | {code} |'


def test_there_are_enough_cases_and_the_doc_lists_each_once():
  ids = [case.id for case in CASES]
  assert len(ids) >= 25 and len(set(ids)) == len(ids)
  assert sorted(documented()) == sorted(ids)


@pytest.mark.parametrize('case', CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_and_leaves_the_workdir(case, tmp_path):
  result, before, after = run_case(case, tmp_path)
  tail = result.stderr[-3000:]
  line = error_line(result)
  if os.environ.get('BAD_INPUT_ROWS'):  # collects the rows for docs/BAD_INPUT.md
    with open(os.environ['BAD_INPUT_ROWS'], 'a') as rows:
      rows.write(table_row(case, as_documented(line, case, tmp_path), result.returncode)
                 + '\n')
  assert result.returncode == case.code, tail
  assert line.startswith('error: ') and re.search(case.error, line), tail
  assert sum(s.startswith('error:') for s in result.stderr.splitlines()) == 1, tail
  assert 'Traceback' not in result.stderr + result.stdout, tail
  if not case.writes:
    assert after == before, f'the workdir changed: {sorted(set(after) ^ set(before))}'
  messages, code = documented()[case.id]
  line = as_documented(line, case, tmp_path)
  if case.varies:
    line = re.sub(case.varies, '...', line)
    messages = [re.sub(case.varies, '...', m) for m in messages]
  assert line in messages and code == str(case.code), (
      f'docs/BAD_INPUT.md row {case.id} does not hold this line:\n{line}')


def test_verbose_shows_the_traceback(tmp_path):
  case = Case('verbose', '', ('--config.optim.learning_rate=-0.1', '--verbose'), '')
  result, before, after = run_case(case, tmp_path)
  assert result.returncode != 0 and after == before == {}
  assert 'Traceback' in result.stderr
  assert 'ValueError: optim.learning_rate=-0.1 must be a number > 0' in result.stderr


@pytest.mark.parametrize('arg', ['', 'smoke'])
def test_every_shipped_config_passes_the_checks(arg):
  import importlib.util  # noqa: PLC0415

  from ddnn_jax import config_checks  # noqa: PLC0415

  sys.path.insert(0, str(ROOT))  # the configs import `configs.base`
  for path in sorted((ROOT / 'configs').glob('*.py')):
    if path.name in ('__init__.py', 'base.py', 'datasets.py'):
      continue
    spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for method in ('ekd', 'joint_ce', 'individual'):
      config = module.get_config(arg)
      config.method = method
      config_checks.validate(config)


if __name__ == '__main__':  # prints the rows of docs/BAD_INPUT.md
  import tempfile

  wanted = sys.argv[1:]
  for case in CASES:
    if wanted and case.id not in wanted:
      continue
    with tempfile.TemporaryDirectory() as name:
      tmp = pathlib.Path(name)
      try:
        result, _, _ = run_case(case, tmp)
      except pytest.skip.Exception as e:
        print(f'<!-- {case.id}: skipped ({e}) -->')
        continue
      print(table_row(case, as_documented(error_line(result), case, tmp),
                      result.returncode), flush=True)
