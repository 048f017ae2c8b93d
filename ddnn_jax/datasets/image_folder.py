"""ImageFolder roots: `ROOT/<split>/<class>/<image>.jpg|png`, or a tar of that.

`resolve_root` turns a configured root into a folder, extracting a
`.tar`/`.tar.gz` once into a cache folder; `read_root` lists a folder's splits
as file paths and labels, with the class names and label order of
`tfds.ImageFolder`; `splits` adds the validation hold-out of a training root or
checks a scoring root's classes. Images are read later, one file per example
used, or, for folders of equal-size images, decoded once into a cached uint8
array (`decoded_images`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # what tfds.ImageFolder lists
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
EXTRACTED_MARKER = '.ddnn_jax_extracted'
Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (file paths, int32 labels)
_LAYOUT = 'a folder laid out ROOT/train/<class>/<image> or a .tar of it'


def cache_dir(data_dir: str | None) -> str:
  """Where tars are extracted: DATA_DIR/image_folder, else ~/.cache/ddnn_jax."""
  if data_dir and '://' not in data_dir:  # a local TFDS data_dir
    return os.path.join(data_dir, 'image_folder')
  base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(base, 'ddnn_jax', 'image_folder')


def _plain_members(tar: tarfile.TarFile, path: str):
  """The tar's files and folders; refuses names that would land outside."""
  for member in tar:
    if member.name.startswith('/') or '..' in member.name.split('/'):
      raise ValueError(f'{path}: refusing to extract {member.name!r}, which points '
                       'outside the extraction folder')
    if member.isfile() or member.isdir():  # links and devices are skipped
      yield member


def extract_tar(path: str, target_parent: str) -> str:
  """Extracts `path` once into a folder under `target_parent`; returns it.

  The folder's name hashes the tar's path, size and mtime, so a changed tar is
  extracted anew. Extraction goes to a temporary sibling that is renamed into
  place with a completion marker inside: an interrupted extraction is never
  taken for a complete one (a folder without the marker is redone), and
  processes extracting at once do not clobber each other.
  """
  stat = os.stat(path)
  key = hashlib.sha256(f'{path}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()
  name = f'{os.path.basename(path).split(".")[0]}-{key[:16]}'
  target = os.path.join(target_parent, name)
  is_complete = lambda: os.path.exists(os.path.join(target, EXTRACTED_MARKER))  # noqa: E731
  if is_complete():
    return target
  try:
    tar = tarfile.open(path)  # noqa: SIM115 -- closed by `with tar` below
  except tarfile.ReadError:
    raise ValueError(f'image_folder root {path} is not a tar archive; set '
                     f'--config.data.root to {_LAYOUT}') from None
  os.makedirs(target_parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=f'.{name}.partial-', dir=target_parent)
  try:
    try:
      with tar:
        # Members are checked by _plain_members; tarfile's own 'data' filter
        # would do the same at twice the cost (11 s vs 5 s for 50,000 JPEGs).
        extra = {'filter': 'fully_trusted'} if hasattr(tarfile, 'data_filter') else {}
        tar.extractall(partial, members=_plain_members(tar, path), **extra)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # cut short or damaged
      raise ValueError(f'image_folder root {path} is a damaged tar ({e}); set '
                       f'--config.data.root to {_LAYOUT}') from None
    open(os.path.join(partial, EXTRACTED_MARKER), 'w').close()
    os.chmod(partial, 0o755)  # mkdtemp's 0700 would hide it from other users
    if os.path.isdir(target) and not is_complete():
      shutil.rmtree(target)  # left by an interrupted extraction: redo
    try:
      os.rename(partial, target)
    except OSError:
      if not is_complete():
        raise  # nobody else completed it either
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return target


def resolve_root(root: str | None, data_dir: str | None) -> str:
  """The folder behind a configured root (a tar is extracted, see above)."""
  if not root:
    raise ValueError(f'image_folder needs a root; set --config.data.root to {_LAYOUT}')
  path = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(path):
    raise FileNotFoundError(f'image_folder root {path} does not exist; set '
                            f'--config.data.root to {_LAYOUT}')
  if os.path.isdir(path):
    return os.path.realpath(path)
  if path.endswith(TAR_SUFFIXES):
    return extract_tar(path, cache_dir(data_dir))
  raise ValueError(f'image_folder root {path} is neither a folder nor a .tar/.tar.gz; '
                   f'set --config.data.root to {_LAYOUT}')


@functools.lru_cache(maxsize=8)
def read_root(root_dir: str) -> tuple[tuple[str, ...], Splits]:
  """(class names, {split: (file paths, int32 labels)}) of a folder.

  tfds.ImageFolder gives the class names (sorted, over all splits), the label
  of each name and each split's size. Its public API does not expose the file
  paths (as_dataset reads every file), so they are listed here by its rules
  (sorted, .jpg/.jpeg/.png) and checked against its counts. Cached per folder
  for the life of the process.
  """
  folder = tfds.ImageFolder(root_dir)
  label = folder.info.features['label']
  splits, classes = {}, {}
  for split, info in folder.info.splits.items():
    paths, labels = [], []
    split_dir = os.path.join(root_dir, split)
    classes[split] = set()
    for class_name in sorted(os.listdir(split_dir)):
      class_dir = os.path.join(split_dir, class_name)
      if os.path.isdir(class_dir):
        classes[split].add(class_name)
        files = sorted(f for f in os.listdir(class_dir)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label.str2int(class_name)] * len(files)
    if len(paths) != info.num_examples:
      raise RuntimeError(f'listed {len(paths)} images in {split_dir} but '
                         f'tfds.ImageFolder counts {info.num_examples}')
    splits[split] = (np.asarray(paths), np.asarray(labels, np.int32))
  if not splits:
    raise ValueError(f'image_folder root {root_dir} has no split folders; set '
                     f'--config.data.root to {_LAYOUT}')
  _check_same_classes(root_dir, classes)
  return tuple(label.names), splits


def _check_same_classes(root_dir: str, classes: dict[str, set[str]]) -> None:
  """Labels are indices into the class folders of all splits together, so a
  split with other class folders than 'train' would train or score classes
  that the other never saw: ValueError naming the difference."""
  reference = 'train' if 'train' in classes else min(classes)
  for split, names in sorted(classes.items()):
    if names != classes[reference]:
      missing = sorted(classes[reference] - names)
      extra = sorted(names - classes[reference])
      raise ValueError(
          f'image_folder root {root_dir}: {split}/ has other class folders than '
          f'{reference}/ (missing {missing}, extra {extra}); give every split the '
          'same class folders')


def _with_holdout(splits: Splits, size: int, fraction: float, seed: int) -> Splits:
  """'validation': `size` (else fraction x) examples of 'train', 'train' the rest."""
  if 'validation' in splits or 'train' not in splits:
    return splits  # a real ROOT/validation folder wins
  paths, labels = splits['train']
  size = size or round((fraction or 0) * len(paths))
  if not size:
    return splits
  if not 0 < size < len(paths):
    raise ValueError(f'a hold-out of {size} leaves no training images of the '
                     f'{len(paths)} in ROOT/train; lower --config.data.validation_size')
  order = np.random.default_rng(seed).permutation(len(paths))
  train, validation = np.sort(order[size:]), np.sort(order[:size])
  return {**splits, 'train': (paths[train], labels[train]),
          'validation': (paths[validation], labels[validation])}


def splits(root: str | None, data_dir: str | None, *, scoring_root: str | None = None,
           validation_size: int = 0, validation_fraction: float = 0.0,
           validation_seed: int = 0,
           class_names: Sequence[str] = ()) -> tuple[tuple[str, ...], Splits]:
  """(class names, splits) of the training `root`, with the validation hold-out
  (see `_with_holdout`), or, given `scoring_root`, the whole folder splits of
  that root, which must have the training root's class folders. Given
  `class_names`, every root must have those, and a `scoring_root` needs no
  training root."""
  class_names = tuple(class_names)
  if scoring_root is not None and not root and class_names:  # a released model
    other_dir, train_dir, root = resolve_root(scoring_root, data_dir), None, 'of the model'
  else:
    train_dir = resolve_root(root, data_dir)
    names, train_splits = read_root(train_dir)
    if class_names and names != class_names:
      raise ValueError(f'image_folder root {root} has class folders {list(names)} but the '
                       f'config names {list(class_names)} (data.class_names); train on a '
                       'root with those folders or clear --config.data.class_names')
    class_names = names
    other_dir = train_dir if scoring_root is None else resolve_root(scoring_root, data_dir)
  if other_dir == train_dir:
    return class_names, _with_holdout(train_splits, validation_size, validation_fraction,
                                      validation_seed)
  other_names, other_splits = read_root(other_dir)
  if other_names != class_names:
    raise ValueError(f'image_folder root {scoring_root} has class folders '
                     f'{list(other_names)} but the training root {root} has '
                     f'{list(class_names)}; a model can only score a root with the same '
                     'class folders')
  return class_names, other_splits


def decode(path: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3) of one image file (JPEG, PNG; GIF and BMP also decode)."""
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def undecodable_image_error(paths: np.ndarray, error: Exception) -> Exception:
  """After `error` while decoding some of `paths`: a ValueError naming the
  first file that does not decode and how to fix it (each file is decoded
  again, one at a time: an error path only), else `error` itself."""
  for path in paths:
    try:
      decode(tf.constant(path))
    except tf.errors.OpError as e:
      reason = (e.message.strip().splitlines() or [''])[0].split(' [Op:')[0]
      reason = re.sub(r'\{\{[^}]*\}\}\s*', '', reason)  # TF's name of the op
      return ValueError(f'image {path} does not decode ({reason}); replace or delete it, '
                        'or move it out of the image folder')
  return error


def _decode_all(paths: np.ndarray) -> np.ndarray | None:
  """uint8 (n, H, W, 3) of every image, or None when their sizes differ."""
  ds = tf.data.Dataset.from_tensor_slices(paths).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images, shape = [], None
  try:
    for image in ds.as_numpy_iterator():
      if shape is None:
        shape = image.shape
      elif image.shape != shape:
        return None
      images.append(image)
  except tf.errors.OpError as e:
    raise undecodable_image_error(paths, e) from None
  return np.stack(images) if images else None


def decoded_images(paths: np.ndarray, data_dir: str | None,
                   max_bytes: int = 4 << 30) -> np.ndarray | None:
  """The decoded pixels of `paths` when they all have one size, else None.

  Decoding a small-image folder once (CIFAR-10: 50,000 JPEGs, 150 MB of uint8)
  takes the JPEG decoder out of every epoch. The array is kept as a .npy in the
  cache folder, keyed by every file's path, size and mtime, so a rerun loads it
  in a second. Folders whose decoded pixels would pass `max_bytes` are read
  lazily instead (None).
  """
  if not len(paths):
    return None
  key = hashlib.sha256()
  for path in paths:
    stat = os.stat(path)
    key.update(f'{path}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
  target = os.path.join(f'{cache_dir(data_dir)}_decoded', f'{key.hexdigest()[:24]}.npy')
  if os.path.exists(target):
    return np.load(target, mmap_mode='r')
  first = _decode_all(paths[:1])
  if first is None or first[0].nbytes * len(paths) > max_bytes:
    return None
  images = _decode_all(paths)
  if images is None:
    return None
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f'{target}.{os.getpid()}.partial.npy'
  np.save(partial, images)
  os.replace(partial, target)  # atomic: concurrent processes never read half a file
  return images
