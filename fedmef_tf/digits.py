"""Real images for development and tests: scikit-learn's handwritten digits as CIFAR-10 files.

The built-in `synthetic` dataset of `fedmef_tf.data` serves the default run and fast tests, but
it was generated for this project and says nothing about how the method behaves on images that
nobody made for it. scikit-learn ships a small real image set offline: the UCI optical
recognition of handwritten digits (1797 grey-level scans of 8x8 pixels, values 0..16, 10
classes, about 180 per class). `write_cifar10_layout` turns it into the official CIFAR-10
*binary version* (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`, one label byte
then 3072 image bytes per record, planes R, G, B of 32x32 row-major), so that the project's real
loader (`fedmef_tf.data.load_cifar10`, `--dataset=cifar10 --data_dir=DIR`) reads it exactly as it
reads CIFAR-10:

- each image is upsampled 8x8 -> 32x32 with bilinear interpolation (`tf.image.resize`, half-pixel
  centres), scaled from 0..16 to 0..255 and rounded, and copied to the three colour planes;
- a stratified split: `test_per_class` images of every class (by a permutation drawn from
  `seed`) form `test_batch.bin`, the rest are shuffled and dealt to the five training files.

It is kept out of the default run; `python -m fedmef_tf.digits --output=DIR` writes the files.
"""

import os
from typing import Tuple

import numpy as np
import tensorflow as tf

from fedmef_tf import data
from fedmef_tf import flag_parsing

#: Images per class held out for the test file (of about 180 per class).
TEST_PER_CLASS = 30

#: Side of the written images (CIFAR-10's).
IMAGE_SIZE = 32


def digit_images(
  seed: int = 0, test_per_class: int = TEST_PER_CLASS
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The digits as uint8 32x32x3 images, split per class.

  Args:
    seed: seed of the split and of the order of the training images.
    test_per_class: test images per class (the rest train).

  Returns:
    `(train_images, train_labels, test_images, test_labels)`: uint8 `[N, 32, 32, 3]` and
    int32 `[N]` arrays.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top (optional dependency)

  digits = datasets.load_digits()
  small = digits.images.astype(np.float32)[..., None]  # [N, 8, 8, 1] in 0..16
  big = tf.image.resize(small, (IMAGE_SIZE, IMAGE_SIZE), method='bilinear').numpy()
  pixels = np.clip(np.round(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  images = np.repeat(pixels, 3, axis=-1)
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test_idx = []
  for c in range(10):
    members = np.flatnonzero(labels == c)
    test_idx.extend(rng.permutation(members)[:test_per_class].tolist())
  test_idx = np.sort(np.asarray(test_idx))
  train_idx = rng.permutation(np.setdiff1d(np.arange(labels.size), test_idx))
  return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _records(images: np.ndarray, labels: np.ndarray) -> bytes:
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW, row-major
  return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def write_cifar10_layout(
  directory: str, seed: int = 0, test_per_class: int = TEST_PER_CLASS
) -> str:
  """Writes the digits as the CIFAR-10 binary version into `directory` (created if needed).

  Args:
    directory: output directory; existing files of the same names are replaced.
    seed: seed of the split (see `digit_images`).
    test_per_class: test images per class.

  Returns:
    `directory`, ready for `fedmef_tf.data.load_cifar10`.
  """
  train_x, train_y, test_x, test_y = digit_images(seed, test_per_class)
  os.makedirs(directory, exist_ok=True)
  shards = np.array_split(np.arange(len(train_y)), len(data.CIFAR10_TRAIN_FILES))
  outputs = [(name, train_x[s], train_y[s]) for name, s in zip(data.CIFAR10_TRAIN_FILES, shards)]
  outputs.append((data.CIFAR10_TEST_FILE, test_x, test_y))
  for name, x, y in outputs:
    path = os.path.join(directory, name)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(_records(x, y))
    os.replace(tmp, path)
  return directory


def check_flags(values) -> None:
  """Raises `flag_parsing.UsageError` when `--output` is missing."""
  if not values['output']:
    raise flag_parsing.UsageError('--output is required: the directory to write')


def main(argv) -> int:
  """`python -m fedmef_tf.digits --output=DIR [--seed=N]`: writes the set to `--output`."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv  # no positional argument (flag_parsing refuses any)
  output = flags.FLAGS.output
  write_cifar10_layout(output, seed=flags.FLAGS.seed)
  print(f'wrote {output} (CIFAR-10 binary layout, 10 classes)')
  return 0


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top

  # Defined only when run as a program: importing the module defines no flag.
  flags.DEFINE_string('output', '', 'Directory to write the files to.')
  flags.DEFINE_integer('seed', 0, 'Seed of the train/test split.')
  flag_parsing.run_tool(main, 'digits', __doc__, check=check_flags)
