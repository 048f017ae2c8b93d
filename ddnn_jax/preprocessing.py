"""Preprocessing: TF ops that turn a decoded image into what the model sees,
and the tf.data settings every pipeline shares.

`preprocess` is stateless: its randomness (crop, flip) comes from an explicit
seed, which the input pipeline derives from (seed, epoch, example index), so an
example's augmentation does not depend on the order or place it is read in.
Augmentations (`config.data.augment`): 'none' (resize only when needed),
'crop_flip' (zero padding, random crop, optional flip: the CIFAR recipe) and
'inception' (random resized crop for training, centre crop for evaluation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

AUGMENTATIONS = ('none', 'crop_flip', 'inception')


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


def preprocess(image: tf.Tensor, data: ml_collections.ConfigDict, train: bool,
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


def pipeline_options() -> tf.data.Options:
  """Deterministic order, and threads that stay out of JAX's way."""
  options = tf.data.Options()
  options.deterministic = True
  # One thread per element op, a private pool: the pipeline leaves TF's global
  # pools (and the cores JAX computes on) alone.
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = min(os.cpu_count() or 1, 32)
  return options


def as_numpy_batches(ds: tf.data.Dataset, data: ml_collections.ConfigDict,
                     local_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Examples -> batches of `local_batch` (the remainder dropped), prefetched,
  as numpy."""
  ds = ds.batch(local_batch, drop_remainder=True)
  if data.prefetch:
    ds = ds.prefetch(data.prefetch)
  return iter(tfds.as_numpy(ds.with_options(pipeline_options())))
