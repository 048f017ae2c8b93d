"""Dataset registry: which datasets exist, their sizes and classes, and their
examples as indexable in-memory sources.

TFDS datasets (digits, cifar10, cifar100, imagenet2012) are prepared on first
use where TFDS can do it alone; image folders (`image_folder.py`) are listed,
their files read only when an example is used. `get_info` and `num_classes`
are what the trainer asks before reading; `in_memory_split` and the TFDS
builder are what `ddnn_jax.input_pipeline` reads examples from.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ddnn_jax.datasets import digits, image_folder

# configs/datasets.py has a preset of `config.data` for each (its NAMES).
DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012', 'image_folder')
_TFDS_NAMES = {'digits': 'ddnn_digits', 'cifar10': 'cifar10', 'cifar100': 'cifar100',
               'imagenet2012': 'imagenet2012'}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know of a dataset before reading it."""
  num_classes: int
  image_size: int
  num_examples: dict[str, int]  # per usable split name (image_folder 'train': after the hold-out)
  class_names: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Split:
  """One split as indexable arrays: example i is (images or paths)[i], labels[i]."""
  labels: np.ndarray  # int32 (n,)
  images: np.ndarray | None = None  # uint8 (n, H, W, 3): TFDS datasets
  paths: np.ndarray | None = None  # str (n,): image folders


def check_name(name: str) -> None:
  """Raises ValueError naming the known datasets unless `name` is one."""
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{", ".join(DATASETS)}')


# ---------------------------------------------------------------- TFDS datasets


@functools.lru_cache(maxsize=8)
def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
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


def tfds_num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """The size of `split`; ValueError naming the available splits if none such."""
  try:
    return builder.info.splits[split].num_examples  # also 'train[:90%]' and such
  except (KeyError, ValueError) as e:
    raise ValueError(f'TFDS dataset {builder.name} has no split {split!r}; '
                     f'available: {sorted(builder.info.splits)}') from e


@functools.lru_cache(maxsize=4)
def _tfds_split(name: str, data_dir: str | None, split: str) -> Split:
  builder = tfds_builder(name, data_dir)
  tfds_num_examples(builder, split)
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return Split(arrays['label'].astype(np.int32), images=arrays['image'])


# ---------------------------------------------------------------- image folders


def _image_folder_splits(data: ml_collections.ConfigDict,
                         root: str | None = None) -> tuple[tuple[str, ...], dict[str, Split]]:
  """Class names and splits of the training root, or of the scoring `root`."""
  class_names, splits = image_folder.splits(
      data.root, data.data_dir, scoring_root=root, validation_size=data.validation_size,
      validation_fraction=data.validation_fraction, validation_seed=data.validation_seed,
      class_names=data.get('class_names') or ())
  return class_names, {name: Split(labels, paths=paths)
                       for name, (paths, labels) in splits.items()}


def in_memory_split(data: ml_collections.ConfigDict, split: str,
                    root: str | None = None) -> Split:
  """Labels and images (or image paths) of an in-memory `split` (of `root`
  instead, for image_folder); TFDS splits are decoded once and cached."""
  if data.name == 'image_folder':
    splits = _image_folder_splits(data, root)[1]
    if split not in splits:
      raise ValueError(f'image_folder root {root or data.root} has no split {split!r}; '
                       f'available: {sorted(splits)}')
    source = splits[split]
    if data.get('decode_once', False):
      images = image_folder.decoded_images(source.paths, data.data_dir)
      if images is not None:  # same pixels as decoding each file when it is used
        return Split(source.labels, images=images)
    return source
  if data.name == 'imagenet2012':
    raise ValueError('imagenet2012 does not fit in memory; set --config.data.in_memory=False')
  return _tfds_split(data.name, data.data_dir, split)


def read_ahead(data: ml_collections.ConfigDict) -> None:
  """Reads now what training reads later and may fail on: with `decode_once`,
  every image of an image folder's training and evaluation splits (decoded
  into the cache, so the pipeline loads them later); a corrupt file raises
  ValueError naming it. TFDS datasets: nothing (TFDS checked them when it
  prepared them)."""
  if data.name == 'image_folder' and data.get('decode_once', False):
    for split in dict.fromkeys((data.train_split, data.eval_split)):
      in_memory_split(data, split)


def get_info(data: ml_collections.ConfigDict, root: str | None = None) -> DatasetInfo:
  """Classes, image size and split sizes (of `root` instead, for image_folder)."""
  check_name(data.name)
  if data.name == 'image_folder':
    class_names, splits = _image_folder_splits(data, root)
    num_examples = {name: len(s.labels) for name, s in splits.items()}
  else:
    if root is not None:
      raise ValueError(f'root= applies to image_folder only, not {data.name}')
    builder = tfds_builder(data.name, data.data_dir)
    class_names = tuple(builder.info.features['label'].names)
    named = {data.train_split, data.eval_split, *builder.info.splits}
    num_examples = {s: tfds_num_examples(builder, s) for s in named}
  return DatasetInfo(len(class_names), data.image_size, num_examples, class_names)


def num_classes(data: ml_collections.ConfigDict) -> int:
  """The dataset's class count without preparing or reading a TFDS dataset
  (an image folder is listed: its class folders are the classes)."""
  check_name(data.name)
  if data.name == 'image_folder':
    return get_info(data).num_classes
  if data.name == 'digits':
    builder = digits.DdnnDigits(data_dir=data.data_dir)
  else:
    builder = tfds.builder(_TFDS_NAMES[data.name], data_dir=data.data_dir)
  return builder.info.features['label'].num_classes
