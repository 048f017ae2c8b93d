"""Input pipeline: sizes, exact evaluation, order independent of process count,
exact resume, image folders (real CIFAR-10 JPEGs), tar roots, bad inputs.

References come from outside the pipeline: scikit-learn's digits, TFDS read
directly, and image files decoded here.
"""

import collections
import io
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import CIFAR_CLASSES

from configs import datasets
from ddnn_jax import input_pipeline
from ddnn_jax.datasets import digits, image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  # A private TFDS data_dir: digits get prepared here (seconds), and parallel
  # test workers never prepare into the same folder.
  return str(tmp_path_factory.mktemp('tfds'))


def digits_config(data_dir, **overrides):
  data = datasets.data_config('digits')
  data.data_dir = data_dir
  data.update(overrides)
  return data


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def to_uint8(batch, data):
  """Undoes the normalisation: exact for unresampled images."""
  pixels = batch['image'] * np.asarray(data.std) + np.asarray(data.mean)
  return np.round(pixels).astype(np.uint8)


def example_counter(images, labels):
  return collections.Counter((image.tobytes(), int(label))
                             for image, label in zip(images, labels))


def eval_counter(data, **kwargs):
  """(examples, batches per process) of an evaluation pass of every process."""
  count = kwargs.get('process_count', 1)
  examples, num_batches = collections.Counter(), []
  for index in range(count):
    batches = list(input_pipeline.eval_batches(data, process_index=index, **kwargs))
    num_batches.append(len(batches))
    for batch in batches:
      mask = batch['mask']
      assert batch['image'].shape[0] == kwargs['global_batch_size'] // count
      examples += example_counter(to_uint8(batch, data)[mask], batch['label'][mask])
  return examples, num_batches


# ---------------------------------------------------------------- digits


def test_digits_info(data_dir):
  info = input_pipeline.get_info(digits_config(data_dir))
  assert info.num_classes == 10 and info.image_size == 8
  assert info.class_names == tuple(str(d) for d in range(10))
  assert info.num_examples['train'] + info.num_examples['test'] == 1797
  assert info.num_examples['test'] == 360
  # The preset's sizes (configs/datasets.py) are the real ones.
  assert info.num_examples == dict(datasets.data_config('digits').num_examples)


def test_digits_train_batch_matches_sklearn(data_dir):
  from sklearn.datasets import load_digits

  sk = load_digits()
  gray = np.round(sk.images * 255 / 16).astype(np.uint8)
  reference = {np.repeat(g[..., None], 3, -1).tobytes(): int(t)
               for g, t in zip(gray, sk.target)}
  data = digits_config(data_dir, augment='none')
  batch = next(input_pipeline.train_batches(
      data, global_batch_size=32, seed=0, process_index=0, process_count=1))
  assert batch['image'].shape == (32, 8, 8, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0 and batch['label'].max() < 10
  images = to_uint8(batch, data)
  np.testing.assert_allclose(images, batch['image'] * 96.0 + 78.0, atol=1e-3)
  assert [reference[image.tobytes()] for image in images] == batch['label'].tolist()


def test_global_batches_independent_of_process_count(data_dir):
  data = digits_config(data_dir, flip=True)  # crop_flip with flips
  by_count = {}
  for count in (1, 2, 4):
    streams = [take(input_pipeline.train_batches(
        data, global_batch_size=32, seed=3, start_step=42, process_index=i,
        process_count=count), 5) for i in range(count)]  # epoch 1 starts at step 44
    for stream in streams:
      assert stream[0]['image'].shape == (32 // count, 8, 8, 3)
    by_count[count] = [{k: np.concatenate([s[step][k] for s in streams])
                        for k in ('image', 'label')} for step in range(5)]
  for count in (2, 4):
    for ours, reference in zip(by_count[count], by_count[1]):
      np.testing.assert_array_equal(ours['image'], reference['image'])
      np.testing.assert_array_equal(ours['label'], reference['label'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_resume_is_exact(data_dir, process_count):
  data = digits_config(data_dir, flip=True)
  batch_size = 64
  steps = input_pipeline.steps_per_epoch(1437, batch_size)
  assert steps == 22

  def stream(start_step, n):
    return take(input_pipeline.train_batches(
        data, global_batch_size=batch_size, seed=1, start_step=start_step,
        process_index=process_count - 1, process_count=process_count), n)

  from_zero = stream(0, 26)
  for start in (3, 20, 22):  # inside epoch 0; across into epoch 1; at epoch 1's start
    for ours, reference in zip(stream(start, 26 - start), from_zero[start:]):
      np.testing.assert_array_equal(ours['image'], reference['image'])
      np.testing.assert_array_equal(ours['label'], reference['label'])
  # Augmentation is on: same order and labels as without it, other pixels.
  plain = next(input_pipeline.train_batches(
      digits_config(data_dir, augment='none'), global_batch_size=batch_size, seed=1,
      process_index=process_count - 1, process_count=process_count))
  np.testing.assert_array_equal(plain['label'], from_zero[0]['label'])
  assert not np.array_equal(plain['image'], from_zero[0]['image'])


def test_epochs_are_permutations(data_dir):
  data = digits_config(data_dir, augment='none')
  train = tfds.as_numpy(digits.DdnnDigits(data_dir=data_dir).as_dataset(
      split='train', batch_size=-1))
  train = example_counter(train['image'], train['label'])
  batches = take(input_pipeline.train_batches(
      data, global_batch_size=100, seed=0, process_index=0, process_count=1), 28)
  for epoch in (batches[:14], batches[14:]):  # 14 steps per epoch, 37 dropped
    seen = sum((example_counter(to_uint8(b, data), b['label']) for b in epoch),
               collections.Counter())
    assert sum(seen.values()) == 1400 and not seen - train  # no example twice
  assert not np.array_equal(batches[0]['label'], batches[14]['label'])


@pytest.mark.parametrize('global_batch_size,process_count',
                         [(64, 1), (7 * 8, 2), (100, 2), (360, 2), (500, 2), (12, 4)])
def test_eval_covers_the_split_exactly(data_dir, global_batch_size, process_count):
  data = digits_config(data_dir)
  builder = digits.DdnnDigits(data_dir=data_dir)
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  examples, num_batches = eval_counter(
      data, global_batch_size=global_batch_size, process_count=process_count)
  assert examples == example_counter(test['image'], test['label'])
  assert sum(examples.values()) == 360
  assert num_batches == [-(-360 // global_batch_size)] * process_count


def test_streaming_path(data_dir):
  data = digits_config(data_dir, in_memory=False, shuffle_buffer=256)
  for index in range(2):
    batches = take(input_pipeline.train_batches(
        data, global_batch_size=32, seed=0, start_step=40, process_index=index,
        process_count=2), 6)  # crosses the epoch boundary at step 44
    for batch in batches:
      assert batch['image'].shape == (16, 8, 8, 3) and batch['image'].dtype == np.float32
      assert batch['label'].dtype == np.int32
      assert batch['label'].min() >= 0 and batch['label'].max() < 10
  test = tfds.as_numpy(digits.DdnnDigits(data_dir=data_dir).as_dataset(
      split='test', batch_size=-1))
  examples, num_batches = eval_counter(data, global_batch_size=64, process_count=2)
  assert examples == example_counter(test['image'], test['label'])
  assert num_batches[0] == num_batches[1]


# ---------------------------------------------------------------- image folders


def decoded_files(root):
  """Counter of (decoded image, label) of every file under root/<split>/."""
  images, labels = [], []
  for path in sorted(root.glob('*/*/*.jpg')):
    images.append(tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy())
    labels.append(CIFAR_CLASSES.index(path.parent.name))
  return example_counter(images, labels)


def folder_config(root, **overrides):
  data = datasets.data_config('image_folder')
  data.update(dict(root=str(root), validation_size=50, augment='none'), **overrides)
  return data


def test_image_folder_holdout(cifar_roots):
  root, _ = cifar_roots
  data = folder_config(root)
  info = input_pipeline.get_info(data)
  assert info.class_names == CIFAR_CLASSES and info.num_classes == 10
  assert info.num_examples['train'] == 250 and info.num_examples['validation'] == 50
  train, _ = eval_counter(data, split='train', global_batch_size=64)
  validation, _ = eval_counter(data, split='validation', global_batch_size=64,
                               process_count=2)
  assert not train & validation and train + validation == decoded_files(root)
  assert eval_counter(data, split='validation', global_batch_size=20)[0] == validation
  other_seed, _ = eval_counter(folder_config(root, validation_seed=1),
                               split='validation', global_batch_size=64)
  assert other_seed != validation and sum(other_seed.values()) == 50


def test_image_folder_train_batches(cifar_roots):
  data = folder_config(cifar_roots[0], augment='crop_flip')
  whole = next(input_pipeline.train_batches(data, global_batch_size=32, seed=0,
                                            process_index=0, process_count=1))
  assert whole['image'].shape == (32, 32, 32, 3) and whole['image'].dtype == np.float32
  halves = [next(input_pipeline.train_batches(data, global_batch_size=32, seed=0,
                                              process_index=i, process_count=2))
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]),
                                whole['image'])


def test_decode_once_gives_the_pixels_of_per_file_decoding(cifar_roots, tmp_path):
  """Real CIFAR JPEGs: the cached uint8 array feeds the same batches, train and eval."""
  def batches(decode_once):
    data = folder_config(cifar_roots[0], augment='crop_flip', decode_once=decode_once,
                         data_dir=str(tmp_path / 'cache'))
    train = input_pipeline.train_batches(data, global_batch_size=32, seed=3, start_step=9)
    return ([next(train) for _ in range(3)],
            list(input_pipeline.eval_batches(data, global_batch_size=32)))

  lazy = batches(False)
  assert not (tmp_path / 'cache' / 'image_folder_decoded').exists()
  cold, warm = batches(True), batches(True)  # decodes, then loads the .npy
  assert len(list((tmp_path / 'cache' / 'image_folder_decoded').iterdir())) == 2
  for got in (cold, warm):
    for want_part, got_part in zip(lazy, got, strict=True):
      for want_batch, got_batch in zip(want_part, got_part, strict=True):
        for key in want_batch:
          np.testing.assert_array_equal(got_batch[key], want_batch[key])


def test_decode_once_leaves_mixed_sizes_to_per_file_decoding(tmp_path):
  rng = np.random.default_rng(0)
  for i, size in enumerate((6, 6, 7, 6)):
    path = tmp_path / 'root' / 'train' / ('cat' if i % 2 else 'dog') / f'{i}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).numpy())
  paths = np.asarray(sorted(str(p) for p in (tmp_path / 'root').rglob('*.png')))
  assert image_folder.decoded_images(paths, str(tmp_path / 'cache')) is None
  same = image_folder.decoded_images(paths[:3], str(tmp_path / 'cache'))
  assert same.shape == (3, 6, 6, 3) and same.dtype == np.uint8


def test_image_folder_scores_another_root(cifar_roots, tmp_path):
  root, other = cifar_roots
  data = folder_config(root)
  assert input_pipeline.get_info(data, root=str(other)).num_examples == {'test': 100}
  examples, _ = eval_counter(data, split='test', root=str(other), global_batch_size=48,
                             process_count=2)
  assert examples == decoded_files(other)
  bad = tmp_path / 'bad'
  for class_name in CIFAR_CLASSES[:9] + ('lorry',):
    (bad / 'test' / class_name).mkdir(parents=True)
  with pytest.raises(ValueError, match=r"class folders \[.*'lorry'.*\] but the training root .* has \[.*'truck'\]"):
    next(input_pipeline.eval_batches(data, split='test', root=str(bad),
                                     global_batch_size=8))


def test_tar_root_is_extracted_once(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  tar_path = tmp_path / 'tiny.tar'
  with tarfile.open(tar_path, 'w') as tar:
    for class_name in ('cat', 'dog'):
      for i in range(5):
        png = tf.io.encode_png(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).numpy()
        member = tarfile.TarInfo(f'train/{class_name}/{i}.png')
        member.size = len(png)
        tar.addfile(member, io.BytesIO(png))
  data = folder_config(tar_path, data_dir=str(tmp_path / 'tfds'), validation_size=2,
                       image_size=6)
  info = input_pipeline.get_info(data)
  assert info.class_names == ('cat', 'dog')
  assert info.num_examples == {'train': 8, 'validation': 2}
  extracted = list((tmp_path / 'tfds' / 'image_folder').iterdir())
  assert len(extracted) == 1 and (extracted[0] / 'train' / 'dog' / '4.png').is_file()

  opened = []
  real_open = tarfile.open
  monkeypatch.setattr(tarfile, 'open', lambda *a, **k: opened.append(a) or real_open(*a, **k))
  input_pipeline.get_info(data)
  batch = next(input_pipeline.eval_batches(data, global_batch_size=4))
  assert batch['image'].shape == (4, 6, 6, 3)
  assert not opened  # reused
  (extracted[0] / '.ddnn_jax_extracted').unlink()  # as if interrupted
  input_pipeline.get_info(data)
  assert len(opened) == 1 and (extracted[0] / '.ddnn_jax_extracted').is_file()
  assert list((tmp_path / 'tfds' / 'image_folder').iterdir()) == extracted


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs(data_dir, tmp_path):
  with pytest.raises(ValueError, match='unknown dataset .mnist.*cifar10'):
    datasets.data_config('mnist')
  data = digits_config(data_dir)
  data.name = 'mnist'
  with pytest.raises(ValueError, match='unknown dataset'):
    input_pipeline.get_info(data)
  with pytest.raises(FileNotFoundError, match='does not exist; set --config.data.root'):
    input_pipeline.get_info(folder_config(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='needs a root'):
    input_pipeline.get_info(datasets.data_config('image_folder'))
  data = digits_config(data_dir)
  with pytest.raises(ValueError, match='not divisible by the process count 4'):
    input_pipeline.train_batches(data, global_batch_size=30, seed=0, process_index=0,
                                 process_count=4)
  with pytest.raises(ValueError, match='not divisible by the process count 4'):
    input_pipeline.eval_batches(data, global_batch_size=30, process_index=0,
                                process_count=4)
  with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
    input_pipeline.eval_batches(data, split='validation', global_batch_size=8)
  imagenet = datasets.data_config('imagenet2012')
  imagenet.data_dir = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='manual download.*tfds build imagenet2012'):
    input_pipeline.get_info(imagenet)


# ---------------------------------------------------------------- TensorFlow's devices


def test_importing_the_pipeline_leaves_tf_devices_alone():
  # The entry points (main, evaluate, aot) hide them explicitly. A fresh process:
  # here TF has long started. Records the calls instead of making them.
  script = textwrap.dedent("""
      import tensorflow as tf
      calls = []
      tf.config.set_visible_devices = lambda devices, kind: calls.append((devices, kind))
      from ddnn_jax import input_pipeline
      assert calls == [], calls
      input_pipeline.hide_accelerators_from_tf()
      assert calls == [([], 'GPU'), ([], 'TPU')], calls
      """)
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
