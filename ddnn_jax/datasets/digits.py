"""`ddnn_digits`: scikit-learn's 8x8 handwritten digits as a TFDS dataset.

The project's embedded default dataset: it ships inside scikit-learn
(`sklearn.datasets.load_digits`, 1,797 images, 10 classes), so training and the
tests run anywhere without a download, and preparing it takes about a second.

- image: uint8 (8, 8, 3); the 0..16 gray values scaled to 0..255
  (round(v * 255 / 16)) and repeated over 3 channels, so the ResNets' RGB stem
  applies unchanged.
- label: ClassLabel with the 10 names '0'..'9'.
- splits: a fixed stratified partition. Within each class, the examples (in
  scikit-learn's order) are permuted by `numpy.random.RandomState(0)` (whose
  stream numpy keeps stable across versions) and the first 36 go to `test`:
  360 test, 1,437 train. TFDS stores each split in its own fixed order (a
  hash of the example key, which is scikit-learn's index).

Prepared on first use into the TFDS data_dir by `download_and_prepare`, which
is a no-op once the dataset is there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TEST_PER_CLASS = 36  # 10 x 36 = 360 test images
NUM_CLASSES = 10


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices of the stratified partition described above."""
  rng = np.random.RandomState(0)
  test = []
  for label in range(NUM_CLASSES):
    members = np.flatnonzero(labels == label)
    test.append(members[rng.permutation(len(members))[:TEST_PER_CLASS]])
  test_indices = np.sort(np.concatenate(test))
  train_indices = np.setdiff1d(np.arange(len(labels)), test_indices)
  return train_indices, test_indices


def _load_sklearn() -> tuple[np.ndarray, np.ndarray]:
  # Imported here: scikit-learn is needed only while preparing.
  from sklearn.datasets import load_digits

  digits = load_digits()
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(gray[..., None], 3, axis=-1)
  return images, digits.target.astype(np.int64)


class DdnnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits, 3 channels, fixed stratified train/test split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # TFDS 4.9.10 finds a builder's source file through `importlib_resources`,
  # which it does not declare as a dependency on Python >= 3.9 (tensorflow/
  # datasets#11212); naming the file here keeps preparation off that import.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in range(NUM_CLASSES)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    images, labels = _load_sklearn()
    train, test = split_indices(labels)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in indices:
      # The key is scikit-learn's index: stable, unique across both splits.
      yield int(i), {'image': images[i], 'label': int(labels[i])}
