"""Input pipeline: per-process training and evaluation batches (tf.data).

The datasets and their sources are `ddnn_jax.datasets.sources` (re-exported
here: `get_info`, `num_classes`, `DatasetInfo`, `DATASETS`); the image ops are
`ddnn_jax.preprocessing`. This module decides which example goes into which
batch of which process.

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

Entry points call `hide_accelerators_from_tf()` first, so TensorFlow leaves
the GPUs/TPUs to JAX; importing this module changes nothing in TF.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddnn_jax.datasets import image_folder, sources
from ddnn_jax.datasets.sources import (
  DATASETS,
  DatasetInfo,
  get_info,
  num_classes,
  read_ahead,
)
from ddnn_jax.preprocessing import AUGMENTATIONS, as_numpy_batches, preprocess

__all__ = ['AUGMENTATIONS', 'DATASETS', 'DatasetInfo', 'batch_spec', 'eval_batches',
           'get_info', 'hide_accelerators_from_tf', 'num_classes', 'read_ahead',
           'steps_per_epoch', 'train_batches']


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off the GPUs/TPUs: JAX owns them, and TF only runs the
  CPU input pipeline. Entry points call it before TF starts (before the first
  pipeline or dataset is built); once TF has started it changes nothing."""
  for kind in ('GPU', 'TPU'):
    # RuntimeError: TF already initialised; ValueError: no such device kind.
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], kind)


# ---------------------------------------------------------------- sizes and checks


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


def _check(data: ml_collections.ConfigDict, global_batch_size: int,
           process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
  """(process index, process count, local batch size) after validation."""
  sources.check_name(data.name)
  if data.augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {data.augment!r}; set --config.data.augment '
                     f'to one of {", ".join(AUGMENTATIONS)}')
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'process count {count}; use a positive multiple of {count}')
  return index, count, global_batch_size // count


# ---------------------------------------------------------------- public iterators


def _indexed_examples(source: sources.Split, data: ml_collections.ConfigDict, train: bool,
                      seed: int):
  """(index, epoch) -> {'image', 'label'} over an in-memory split."""
  labels = tf.constant(source.labels)
  table = tf.constant(source.images if source.paths is None else source.paths)
  num_examples = len(source.labels)

  def example(index: tf.Tensor, epoch: tf.Tensor) -> dict[str, tf.Tensor]:
    if source.paths is None:
      image = tf.gather(table, index)
    else:  # read only the files of this process's rows
      image = image_folder.decode(tf.gather(table, index))
    op_seed = tf.stack([tf.constant(seed, tf.int64), epoch * num_examples + index])
    return {'image': preprocess(image, data, train, op_seed),
            'label': tf.gather(labels, index)}

  return example


def _naming_bad_images(batches: Iterator[dict], source: sources.Split) -> Iterator[dict]:
  """`batches`, where an image file that does not decode raises ValueError
  naming it (files are read lazily, so this surfaces while training)."""
  if source.paths is None:
    return batches

  def named() -> Iterator[dict]:
    try:
      yield from batches
    except tf.errors.InvalidArgumentError as e:
      raise image_folder.undecodable_image_error(source.paths, e) from None

  return named()


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
  source = sources.in_memory_split(data, data.train_split)
  num_examples = len(source.labels)
  _train_steps(num_examples, global_batch_size, data.train_split)
  spec = tf.TensorSpec([local], tf.int64)
  ds = tf.data.Dataset.from_generator(
      lambda: _epoch_rows(num_examples, global_batch_size, seed, start_step, index, local),
      output_signature=(spec, spec))
  ds = ds.unbatch().map(_indexed_examples(source, data, True, seed),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _naming_bad_images(as_numpy_batches(ds, data, local), source)


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
  source = sources.in_memory_split(data, split, root)
  num_examples = len(source.labels)
  num_batches = -(-num_examples // global_batch_size)
  positions = np.arange(num_batches * global_batch_size).reshape(num_batches, -1)
  positions = positions[:, index * local:(index + 1) * local].reshape(-1)
  mask = positions < num_examples
  example = _indexed_examples(source, data, False, 0)
  ds = tf.data.Dataset.from_tensor_slices((np.where(mask, positions, 0), mask))
  ds = ds.map(lambda i, m: {**example(i, tf.constant(0, tf.int64)), 'mask': m},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _naming_bad_images(as_numpy_batches(ds, data, local), source)


# ---------------------------------------------------------------- streaming path


def _streaming_train(data: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                     start_step: int, index: int, count: int) -> Iterator[dict]:
  """Per-process file shards; exact resume for a fixed process count only."""
  builder = sources.tfds_builder(data.name, data.data_dir)
  num_examples = sources.tfds_num_examples(builder, data.train_split)
  steps = _train_steps(num_examples, global_batch_size, data.train_split)
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
      return {'image': preprocess(ex['image'], data, True, op_seed),
              'label': tf.cast(ex['label'], tf.int32)}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return as_numpy_batches(ds, data, local)

  def chain() -> Iterator[dict]:
    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
      yield from epoch_batches(epoch, skip)
      skip = 0

  return chain()


def _streaming_eval(data: ml_collections.ConfigDict, split: str, index: int, count: int,
                    local: int) -> Iterator[dict]:
  """This process's even split of `split`, padded to the largest shard's batches."""
  builder = sources.tfds_builder(data.name, data.data_dir)
  largest_shard = -(-sources.tfds_num_examples(builder, split) // count)
  num_batches = -(-largest_shard // local)
  shard = tfds.even_splits(split, n=count)[index]  # all examples, sizes differ by <= 1
  ds = builder.as_dataset(split=shard).map(
      lambda ex: {'image': preprocess(ex['image'], data, False, tf.zeros([2], tf.int64)),
                  'label': tf.cast(ex['label'], tf.int32), 'mask': True},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  size = data.image_size
  padding = tf.data.Dataset.from_tensors(
      {'image': tf.zeros([size, size, 3]), 'label': 0, 'mask': False}).repeat()
  return as_numpy_batches(ds.concatenate(padding).take(num_batches * local), data, local)
