"""Input pipeline: TFDS / ImageFolder datasets, augmentation, per-process batches.

Datasets that fit in memory (digits, cifar10, cifar100, image_folder) are read
as an indexable source: decoded uint8 arrays, or an image folder's file paths
(a file is read only when its example is used). Epoch e's order is the
permutation `np.random.default_rng([seed, e])` of the split; global batch t is
rows [t*B, (t+1)*B) of it (the remainder is dropped) and process i takes its
i-th slice of B/P rows. Augmentation is stateless, seeded by (seed, epoch,
example index). So the global batch at every step is the same whatever the
number of processes, and `start_step` resumes exactly.

imagenet2012 streams instead (`data.in_memory=False`): each process reads its
`tfds.even_splits` shard with file shuffling and a shuffle buffer seeded by
(seed, epoch). Resuming is exact for a fixed process count; the global batch
does depend on the process count.

Evaluation reads a whole split exactly once: the last global batch is padded,
`mask` is False on padding, and every process yields as many batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddnn_jax.datasets import digits, image_folder

# configs/datasets.py has a preset of `config.data` for each (its NAMES).
DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012', 'image_folder')
AUGMENTATIONS = ('none', 'crop_flip', 'inception')
_TFDS_NAMES = {'digits': 'ddnn_digits', 'cifar10': 'cifar10', 'cifar100': 'cifar100',
               'imagenet2012': 'imagenet2012'}


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off the GPUs/TPUs: JAX owns them, and TF only runs the
  CPU input pipeline. Entry points call it before TF starts (before the first
  pipeline or dataset is built); once TF has started it changes nothing."""
  for kind in ('GPU', 'TPU'):
    # RuntimeError: TF already initialised; ValueError: no such device kind.
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], kind)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know of a dataset before reading it."""
  num_classes: int
  image_size: int
  num_examples: dict[str, int]  # per usable split name (image_folder 'train': after the hold-out)
  class_names: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class _Split:
  labels: np.ndarray  # int32 (n,)
  images: np.ndarray | None = None  # uint8 (n, H, W, 3): TFDS datasets
  paths: np.ndarray | None = None  # str (n,): image folders


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{", ".join(DATASETS)}')


# ---------------------------------------------------------------- TFDS datasets


@functools.lru_cache(maxsize=8)
def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; prepares digits and downloads cifar if needed."""
  if name == 'digits':
    builder = digits.DdnnDigits(data_dir=data_dir)
  else:
    builder = tfds.builder(_TFDS_NAMES[name], data_dir=data_dir)
  if builder.is_prepared():
    return builder
  where = data_dir or str(builder.data_path.parents[1])
  fix = (f'run `tfds build {_TFDS_NAMES[name]} --data_dir {where}` or set '
         '--config.data.data_dir to where it is prepared')
  if name == 'imagenet2012':
    raise FileNotFoundError(
        f'imagenet2012 is not prepared in {where}; TFDS needs a manual download: '
        f'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{where}/downloads/manual and {fix}')
  try:
    builder.download_and_prepare()
  except Exception as e:
    if not builder.is_prepared():  # else another process prepared it meanwhile
      cause = (str(e).splitlines() or [''])[0][:200]
      raise FileNotFoundError(
          f'TFDS dataset {_TFDS_NAMES[name]} is not prepared in {where} and could '
          f'not be prepared ({type(e).__name__}: {cause}); {fix}') from e
  return builder


def _tfds_num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples  # also 'train[:90%]' and such
  except (KeyError, ValueError) as e:
    raise ValueError(f'TFDS dataset {builder.name} has no split {split!r}; '
                     f'available: {sorted(builder.info.splits)}') from e


@functools.lru_cache(maxsize=4)
def _tfds_split(name: str, data_dir: str | None, split: str) -> _Split:
  builder = _builder(name, data_dir)
  _tfds_num_examples(builder, split)
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return _Split(arrays['label'].astype(np.int32), images=arrays['image'])


# ---------------------------------------------------------------- image folders


def _image_folder(data: ml_collections.ConfigDict,
                  root: str | None = None) -> tuple[tuple[str, ...], dict[str, _Split]]:
  """Class names and splits of the training root, or of the scoring `root`."""
  class_names, splits = image_folder.splits(
      data.root, data.data_dir, scoring_root=root, validation_size=data.validation_size,
      validation_fraction=data.validation_fraction, validation_seed=data.validation_seed)
  return class_names, {name: _Split(labels, paths=paths)
                       for name, (paths, labels) in splits.items()}


def _in_memory_split(data: ml_collections.ConfigDict, split: str,
                     root: str | None = None) -> _Split:
  if data.name == 'image_folder':
    splits = _image_folder(data, root)[1]
    if split not in splits:
      raise ValueError(f'image_folder root {root or data.root} has no split {split!r}; '
                       f'available: {sorted(splits)}')
    source = splits[split]
    if data.get('decode_once', False):
      images = image_folder.decoded_images(source.paths, data.data_dir)
      if images is not None:  # same pixels as decoding each file when it is used
        return _Split(source.labels, images=images)
    return source
  if data.name == 'imagenet2012':
    raise ValueError('imagenet2012 does not fit in memory; set --config.data.in_memory=False')
  return _tfds_split(data.name, data.data_dir, split)


def get_info(data: ml_collections.ConfigDict, root: str | None = None) -> DatasetInfo:
  """Classes, image size and split sizes (of `root` instead, for image_folder)."""
  _check_name(data.name)
  if data.name == 'image_folder':
    class_names, splits = _image_folder(data, root)
    num_examples = {name: len(s.labels) for name, s in splits.items()}
  else:
    if root is not None:
      raise ValueError(f'root= applies to image_folder only, not {data.name}')
    builder = _builder(data.name, data.data_dir)
    class_names = tuple(builder.info.features['label'].names)
    named = {data.train_split, data.eval_split, *builder.info.splits}
    num_examples = {s: _tfds_num_examples(builder, s) for s in named}
  return DatasetInfo(len(class_names), data.image_size, num_examples, class_names)


def num_classes(data: ml_collections.ConfigDict) -> int:
  """The dataset's class count without preparing or reading a TFDS dataset
  (an image folder is listed: its class folders are the classes)."""
  _check_name(data.name)
  if data.name == 'image_folder':
    return get_info(data).num_classes
  if data.name == 'digits':
    builder = digits.DdnnDigits(data_dir=data.data_dir)
  else:
    builder = tfds.builder(_TFDS_NAMES[data.name], data_dir=data.data_dir)
  return builder.info.features['label'].num_classes


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps per epoch; training drops the last partial batch."""
  return num_examples // global_batch_size


def batch_spec(image_size: int, global_batch_size: int, *,
               train: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of the batches `train_batches` (train=True) or
  `eval_batches` yield: what a program compiled ahead of time receives."""
  spec = {'image': jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3),
                                        np.float32),
          'label': jax.ShapeDtypeStruct((global_batch_size,), np.int32)}
  if not train:
    spec['mask'] = jax.ShapeDtypeStruct((global_batch_size,), np.bool_)
  return spec


def _train_steps(num_examples: int, global_batch_size: int, split: str) -> int:
  steps = steps_per_epoch(num_examples, global_batch_size)
  if steps < 1:
    raise ValueError(f'global batch size {global_batch_size} exceeds the {num_examples} '
                     f'examples of split {split!r}; lower the batch size')
  return steps


# ---------------------------------------------------------------- preprocessing


def _to_size(image: tf.Tensor, size: int) -> tf.Tensor:
  """float32 (size, size, 3), resampled only when the image is another size."""
  same = tf.reduce_all(tf.shape(image)[:2] == size)
  image = tf.cond(same, lambda: tf.cast(image, tf.float32),
                  lambda: tf.image.resize(image, [size, size]))
  return tf.ensure_shape(image, [size, size, 3])


def _random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.08, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.image.resize(tf.slice(image, begin, crop), [size, size])


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resize the shorter side to size / 0.875, then crop the centre square."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new_hw = tf.cast(tf.round(hw * (size / 0.875) / tf.reduce_min(hw)), tf.int32)
  image = tf.image.resize(image, new_hw)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def _preprocess(image: tf.Tensor, data: ml_collections.ConfigDict, train: bool,
                seed: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3) -> float32 (S, S, 3) normalised; `seed`: int64 (2,)."""
  size = data.image_size
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if data.augment == 'inception':
    image = (_random_resized_crop(image, size, crop_seed) if train
             else _center_crop(image, size))
    image = tf.ensure_shape(image, [size, size, 3])
  else:
    image = _to_size(image, size)
    pad = data.crop_padding
    if train and data.augment == 'crop_flip' and pad:
      # Zero padding (black in 0..255 units), as in the CIFAR ResNet recipe.
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
  if train and data.flip and data.augment != 'none':
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return (image - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)


def _check(data: ml_collections.ConfigDict, global_batch_size: int,
           process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
  """(process index, process count, local batch size) after validation."""
  _check_name(data.name)
  if data.augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {data.augment!r}; set --config.data.augment '
                     f'to one of {", ".join(AUGMENTATIONS)}')
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'process count {count}; use a positive multiple of {count}')
  return index, count, global_batch_size // count


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # One thread per element op, a private pool: the pipeline leaves TF's global
  # pools (and the cores JAX computes on) alone.
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = min(os.cpu_count() or 1, 32)
  return options


def _finish(ds: tf.data.Dataset, data: ml_collections.ConfigDict,
            local_batch: int) -> Iterator[dict[str, np.ndarray]]:
  ds = ds.batch(local_batch, drop_remainder=True)
  if data.prefetch:
    ds = ds.prefetch(data.prefetch)
  return iter(tfds.as_numpy(ds.with_options(_options())))


def _indexed_examples(source: _Split, data: ml_collections.ConfigDict, train: bool,
                      seed: int):
  """(index, epoch) -> {'image', 'label'} over an in-memory split."""
  labels = tf.constant(source.labels)
  table = tf.constant(source.images if source.paths is None else source.paths)
  num_examples = len(source.labels)

  def example(index: tf.Tensor, epoch: tf.Tensor) -> dict[str, tf.Tensor]:
    if source.paths is None:
      image = tf.gather(table, index)
    else:  # read only the files of this process's rows
      image = tf.io.decode_image(tf.io.read_file(tf.gather(table, index)), channels=3,
                                 expand_animations=False)
    op_seed = tf.stack([tf.constant(seed, tf.int64), epoch * num_examples + index])
    return {'image': _preprocess(image, data, train, op_seed),
            'label': tf.gather(labels, index)}

  return example


# ---------------------------------------------------------------- public iterators


def _epoch_rows(num_examples: int, global_batch_size: int, seed: int, start_step: int,
                process_index: int, local_batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's (example indices, epochs) of each global batch, from start_step."""
  steps = steps_per_epoch(num_examples, global_batch_size)
  first = process_index * local_batch
  first_epoch, step = divmod(start_step, steps)
  for epoch in itertools.count(first_epoch):
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    batches = order[:steps * global_batch_size].reshape(steps, global_batch_size)
    for rows in batches[step:, first:first + local_batch]:
      yield rows, np.full(local_batch, epoch)
    step = 0


def train_batches(data: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of this process: {'image': float32 (B/P, S, S, 3),
  'label': int32 (B/P,)}, the same as from step 0 on from `start_step` on."""
  index, count, local = _check(data, global_batch_size, process_index, process_count)
  if not data.in_memory and data.name != 'image_folder':  # folders are read lazily anyway
    return _streaming_train(data, global_batch_size, seed, start_step, index, count)
  source = _in_memory_split(data, data.train_split)
  num_examples = len(source.labels)
  _train_steps(num_examples, global_batch_size, data.train_split)
  spec = tf.TensorSpec([local], tf.int64)
  ds = tf.data.Dataset.from_generator(
      lambda: _epoch_rows(num_examples, global_batch_size, seed, start_step, index, local),
      output_signature=(spec, spec))
  ds = ds.unbatch().map(_indexed_examples(source, data, True, seed),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, data, local)


def eval_batches(data: ml_collections.ConfigDict, *, split: str | None = None,
                 global_batch_size: int, root: str | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole `split` (default data.eval_split) of this process:
  {'image', 'label', 'mask'}; padding rows of the last global batch have mask
  False, and every process yields the same number of batches."""
  index, count, local = _check(data, global_batch_size, process_index, process_count)
  split = split or data.eval_split
  if root is not None and data.name != 'image_folder':
    raise ValueError(f'root= applies to image_folder only, not {data.name}')
  if not data.in_memory and data.name != 'image_folder':
    return _streaming_eval(data, split, index, count, local)
  source = _in_memory_split(data, split, root)
  num_examples = len(source.labels)
  num_batches = -(-num_examples // global_batch_size)
  positions = np.arange(num_batches * global_batch_size).reshape(num_batches, -1)
  positions = positions[:, index * local:(index + 1) * local].reshape(-1)
  mask = positions < num_examples
  example = _indexed_examples(source, data, False, 0)
  ds = tf.data.Dataset.from_tensor_slices((np.where(mask, positions, 0), mask))
  ds = ds.map(lambda i, m: {**example(i, tf.constant(0, tf.int64)), 'mask': m},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, data, local)


# ---------------------------------------------------------------- streaming path


def _streaming_train(data: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                     start_step: int, index: int, count: int) -> Iterator[dict]:
  """Per-process file shards; exact resume for a fixed process count only."""
  builder = _builder(data.name, data.data_dir)
  steps = _train_steps(_tfds_num_examples(builder, data.train_split), global_batch_size,
                       data.train_split)
  local = global_batch_size // count
  # Equal shards (remainder dropped): every process has the same steps per epoch.
  shard = tfds.even_splits(data.train_split, n=count, drop_remainder=True)[index]
  cached = builder.as_dataset(split=shard).cache() if data.cache else None

  def epoch_batches(epoch: int, skip: int) -> Iterator[dict]:
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)
    ds = cached if cached is not None else builder.as_dataset(
        split=shard, shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=epoch_seed))
    ds = ds.shuffle(data.shuffle_buffer, seed=epoch_seed).enumerate().skip(skip * local)
    stream = (epoch * count + index) * (1 << 32)  # distinct augmentation seeds

    def example(i, ex):
      op_seed = tf.stack([tf.constant(seed, tf.int64), stream + i])
      return {'image': _preprocess(ex['image'], data, True, op_seed),
              'label': tf.cast(ex['label'], tf.int32)}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, data, local)

  def chain() -> Iterator[dict]:
    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
      yield from epoch_batches(epoch, skip)
      skip = 0

  return chain()


def _streaming_eval(data: ml_collections.ConfigDict, split: str, index: int, count: int,
                    local: int) -> Iterator[dict]:
  builder = _builder(data.name, data.data_dir)
  largest_shard = -(-_tfds_num_examples(builder, split) // count)
  num_batches = -(-largest_shard // local)
  shard = tfds.even_splits(split, n=count)[index]  # all examples, sizes differ by <= 1
  ds = builder.as_dataset(split=shard).map(
      lambda ex: {'image': _preprocess(ex['image'], data, False, tf.zeros([2], tf.int64)),
                  'label': tf.cast(ex['label'], tf.int32), 'mask': True},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  size = data.image_size
  padding = tf.data.Dataset.from_tensors(
      {'image': tf.zeros([size, size, 3]), 'label': 0, 'mask': False}).repeat()
  return _finish(ds.concatenate(padding).take(num_batches * local), data, local)
