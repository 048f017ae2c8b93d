"""Dataset presets: `config.data` for each dataset the input pipeline reads.

Plain data, importing only ml_collections, so that loading a config imports
neither TensorFlow nor ddnn_jax. `ddnn_jax.input_pipeline` validates the names
itself (its DATASETS; tests/test_configs.py checks that the two lists agree).

  config.data = datasets.data_config('cifar10')  # then override fields
"""

import ml_collections

# The datasets `ddnn_jax.input_pipeline` reads (its DATASETS).
NAMES = ('digits', 'cifar10', 'cifar100', 'imagenet2012', 'image_folder')

_CIFAR = dict(image_size=32, augment='crop_flip', crop_padding=4, flip=True,
              train_split='train', eval_split='test',
              num_examples={'train': 50_000, 'test': 10_000})

# The fields of `data_config` that depend on the dataset. `num_examples` is each
# split's size where it is known without the data (e.g. for ahead-of-time
# projections); the input pipeline itself always counts the real examples.
PRESETS = {
    # Digits are not mirror-symmetric: 1-pixel shifts only. Mean/std: the train
    # split's pixels (gray, so every channel alike). Splits: datasets/digits.py.
    'digits': dict(image_size=8, augment='crop_flip', crop_padding=1, flip=False,
                   train_split='train', eval_split='test',
                   mean=(78.0, 78.0, 78.0), std=(96.0, 96.0, 96.0),
                   num_examples={'train': 1_437, 'test': 360}),
    'cifar10': dict(_CIFAR, mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7)),
    'cifar100': dict(_CIFAR, mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4)),
    'imagenet2012': dict(image_size=224, augment='inception', crop_padding=0, flip=True,
                         train_split='train', eval_split='validation',
                         mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                         in_memory=False,
                         num_examples={'train': 1_281_167, 'validation': 50_000}),
    # Tuned for the CIFAR-10 JPEG tar; override for other folders. Split sizes
    # depend on the root (and the hold-out), so none are given.
    'image_folder': dict(_CIFAR, eval_split='validation', num_examples={},
                         mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7)),
}


def check_name(name: str) -> None:
  """Raises ValueError naming the known datasets unless `name` is one."""
  if name not in NAMES:
    raise ValueError(f'unknown dataset {name!r}; set --config.data.name to one of '
                     f'{", ".join(NAMES)}')


def data_config(name: str = 'digits') -> ml_collections.ConfigDict:
  """`config.data` for dataset `name`; override fields after calling this."""
  check_name(name)
  data = ml_collections.ConfigDict()
  data.name = name  # one of NAMES
  # image_folder: ROOT laid out ROOT/<split>/<class>/<image>.jpg|png, or a
  # .tar/.tar.gz of that layout (extracted once into a cache folder).
  data.root = ml_collections.config_dict.placeholder(str)
  data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default
  # image_folder: the class folders, in label order, that every root must
  # have. Empty: those of `root`. A released model (ddnn_jax.release) records
  # them, so that it scores another root without the training root.
  data.class_names = ()
  data.train_split = 'train'
  data.eval_split = 'test'
  # image_folder without a ROOT/validation folder: 'validation' is a hold-out
  # of validation_size examples of ROOT/train (validation_fraction of it when
  # validation_size is 0), chosen by a permutation seeded with validation_seed;
  # 'train' is the rest. Other split names are whole folders.
  data.validation_size = 5000
  data.validation_fraction = 0.1
  data.validation_seed = 0
  # True: index an in-memory source (exact, process-count independent order).
  # False: stream TFDS files per process (for datasets too big for memory).
  data.in_memory = True
  data.image_size = 32  # side of the square images the model sees
  data.augment = 'crop_flip'  # training augmentation: 'none', 'crop_flip' or 'inception'
  data.crop_padding = 4  # crop_flip: zero padding before the random crop
  data.flip = True  # crop_flip / inception: random horizontal flip
  data.mean = (0.0, 0.0, 0.0)  # per-channel mean in 0..255 units
  data.std = (255.0, 255.0, 255.0)  # per-channel std in 0..255 units
  data.shuffle_buffer = 16_384  # streaming path only: examples
  data.prefetch = 2  # batches prepared ahead of the trainer
  # image_folder of equal-size images: decode every image once into a uint8
  # array cached beside the extracted tar (CIFAR-10: 150 MB, decoded in ~10 s,
  # loaded in ~1 s), instead of decoding each JPEG in every epoch. Same pixels.
  data.decode_once = True
  # Streaming path only: keep this process's shard in memory after the first
  # epoch. In-memory sources ignore it (image folders: the OS caches files).
  data.cache = False
  # Split name -> examples, where known without reading the data (the preset
  # says; empty for image_folder). Informational: the pipeline counts itself,
  # and configs saved before this field existed lack it (read it with .get).
  data.num_examples = {}
  data.update(PRESETS[name])
  return data
