"""Datasets and client partitions for FedMef experiments (plain NumPy / TensorFlow, no TFF).

Four image datasets are read from local files in their official distribution formats, and one
built-in dataset is generated, so that a first run needs no download:

- `synthetic`: generated from the seed (see `synthetic`); 10000 / 2000 examples by default,
  32x32x3, 10 classes. Synthetic data, not natural images.
- `cifar10`: the CIFAR-10 *binary version*, `data_batch_1.bin` .. `data_batch_5.bin` and
  `test_batch.bin`; 50000 / 10000, 32x32x3, 10 classes.
- `cifar100`: the CIFAR-100 *binary version*, `train.bin` and `test.bin` (fine labels);
  50000 / 10000, 32x32x3, 100 classes.
- `cinic10`: CINIC-10 folders `train/`, `valid/`, `test/`, each with 10 class folders of PNGs;
  90000 / 90000, 32x32x3, 10 classes.
- `tinyimagenet`: `tiny-imagenet-200` with `wnids.txt`, `train/<wnid>/images/*.JPEG` and `val/`;
  100000 / 10000, 64x64x3, 200 classes.

Nothing is ever unpickled (the CIFAR python versions are pickles; only the binary versions are
read). For CINIC-10 the `valid/` split is not used: training uses `train/`, evaluation `test/`.
For TinyImageNet the labelled `val/` split serves as the test split (the official `test/` has no
labels).

Storage and value range: images are kept as `uint8` arrays of shape `[N, H, W, 3]` (NHWC) until
batching; `to_float` (used by `client_dataset` and `test_dataset`) turns a batch into `float32` in
[0, 1] (pixel / 255, no per-channel normalisation, so an exported model takes the same input).
Labels are `int32` class indices in `[0, num_classes)`.

Every problem with the files (a missing directory or file, a file whose size is not what the
format demands, an image that cannot be decoded or has the wrong shape) raises `DataError` with a
one-line message that names the file and what is wrong.

Partitions: `dirichlet_partition` (label skew, Dirichlet parameter `a`, minimum client size) and
`iid_partition`, both deterministic functions of their seed, return one sorted index array per
client. `label_skew` measures how skewed a partition is.
"""

import contextlib
import dataclasses
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fedmef_tf import text

DATASET_NAMES = ('synthetic', 'cifar10', 'cifar100', 'cinic10', 'tinyimagenet')

CIFAR_IMAGE_BYTES = 32 * 32 * 3
CIFAR10_RECORD_BYTES = 1 + CIFAR_IMAGE_BYTES
CIFAR100_RECORD_BYTES = 2 + CIFAR_IMAGE_BYTES
CIFAR10_TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
CIFAR10_TEST_FILE = 'test_batch.bin'
CIFAR100_TRAIN_FILE = 'train.bin'
CIFAR100_TEST_FILE = 'test.bin'
CINIC10_CLASSES = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)


class DataError(Exception):
  """A dataset file or directory is missing, has the wrong size, or cannot be decoded.

  The message is one line and names the file (or directory) and what is wrong with it
  (control characters and undecodable bytes of file names escaped: `fedmef_tf.text`).
  """

  def __init__(self, message: str):
    super().__init__(text.one_line(message))


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An image classification dataset held in memory.

  Attributes:
    name: dataset name, one of `DATASET_NAMES`.
    train_images: uint8 array `[N_train, H, W, 3]`.
    train_labels: int32 array `[N_train]`.
    test_images: uint8 array `[N_test, H, W, 3]`.
    test_labels: int32 array `[N_test]`.
    num_classes: number of classes.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> Tuple[int, int, int]:
    """Shape `(H, W, C)` of one image."""
    return tuple(int(d) for d in self.train_images.shape[1:])


# ------------------------------------------------------------------------------------------------
# Synthetic dataset.


def synthetic(
  num_train: int = 10000, num_test: int = 2000, seed: int = 0, num_classes: int = 10
) -> ImageDataset:
  """Generates the built-in synthetic dataset (deterministic in `seed`; no download).

  SYNTHETIC DATA, not natural images. Each class has a template: a sum of three low-frequency
  2-D sinusoids (integer frequencies 1..3 on the 32-pixel torus) with class-specific colours,
  normalised to unit variance. Classes come in pairs that share two of their three sinusoids
  (the pair is told apart by the third and by colour), so some classes are confusable. One
  example of class c is

      0.5 + 0.16 * (s * roll(T_c) + w * roll(T_c') + blobs) + brightness + noise

  where both templates are circularly shifted by independent random offsets (so the class is not
  tied to a position), `T_c'` is a distractor template of another class (weight
  `w ~ U(0.3, 0.8)` against the signal weight `s ~ U(0.6, 1.1)`, so the distractor sometimes
  dominates), `blobs` are three Gaussian blobs of random position, size and colour (sd 1.5),
  brightness is a per-image offset and the noise is Gaussian per pixel (sd 0.15). The result is
  clipped to [0, 1] and stored as uint8. Labels are exactly balanced in both splits; train and
  test share the templates but no examples.

  Difficulty: the weights below are set so that a small CNN trained centrally with plain SGD
  learns the classes within a few epochs, while the distractors leave some examples ambiguous,
  so that it does not reach 100% (README.md, "The default run", gives the measured accuracies).

  Args:
    num_train: number of training examples (>= num_classes).
    num_test: number of test examples (>= num_classes).
    seed: seed of the templates and of every example.
    num_classes: number of classes (even, >= 2).

  Returns:
    An `ImageDataset` named 'synthetic' with 32x32x3 uint8 images.

  Raises:
    ValueError: if a size or `num_classes` is out of range.
  """
  if num_classes < 2 or num_classes % 2:
    raise ValueError(f'num_classes must be even and >= 2, got {num_classes}')
  if num_train < num_classes or num_test < num_classes:
    raise ValueError(
      f'num_train and num_test must be >= num_classes={num_classes}, got {num_train} and {num_test}'
    )
  templates_ss, train_ss, test_ss = np.random.SeedSequence([seed, 0x5EED]).spawn(3)
  templates = _synthetic_templates(np.random.default_rng(templates_ss), num_classes)
  train_x, train_y = _synthetic_examples(np.random.default_rng(train_ss), templates, num_train)
  test_x, test_y = _synthetic_examples(np.random.default_rng(test_ss), templates, num_test)
  return ImageDataset('synthetic', train_x, train_y, test_x, test_y, num_classes)


# Difficulty of the synthetic data (see `synthetic`'s docstring).
_UNIQUE_WEIGHT = 0.9
_SIGNAL_RANGE = (0.6, 1.1)
_DISTRACTOR_RANGE = (0.3, 0.8)
_BLOB_SD = 1.5
_NOISE_SD = 0.15


def _synthetic_templates(rng: np.random.Generator, num_classes: int) -> np.ndarray:
  """Returns float32 templates `[num_classes, 32, 32, 3]` with zero mean and unit variance."""
  size = 32
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')

  def wave() -> np.ndarray:
    fy, fx = rng.integers(-3, 4, size=2)
    while fy == 0 and fx == 0:
      fy, fx = rng.integers(-3, 4, size=2)
    phase = rng.uniform(0, 2 * np.pi)
    colour = rng.normal(size=3)
    w = np.sin(2 * np.pi * (fy * yy + fx * xx) / size + phase)
    return w[:, :, None] * colour[None, None, :]

  templates = []
  for _ in range(num_classes // 2):
    shared = wave() + wave()
    for _ in range(2):
      t = shared + _UNIQUE_WEIGHT * wave() + 0.3 * rng.normal(size=3)[None, None, :]
      t = t - t.mean()
      templates.append(t / t.std())
  return np.stack(templates).astype(np.float32)


def _synthetic_examples(
  rng: np.random.Generator, templates: np.ndarray, n: int
) -> Tuple[np.ndarray, np.ndarray]:
  """Draws `n` examples (balanced labels) from `templates`; returns uint8 images, int32 labels."""
  num_classes, size = templates.shape[0], templates.shape[1]
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  images = np.empty((n, size, size, 3), np.uint8)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  chunk = 1000
  for start in range(0, n, chunk):
    y = labels[start : start + chunk]
    m = len(y)
    other = (y + rng.integers(1, num_classes, size=m)) % num_classes

    def shifted(classes):
      dy = rng.integers(0, size, size=m)[:, None, None]
      dx = rng.integers(0, size, size=m)[:, None, None]
      return templates[classes[:, None, None], (yy[None] - dy) % size, (xx[None] - dx) % size]

    s = rng.uniform(*_SIGNAL_RANGE, size=(m, 1, 1, 1))
    w = rng.uniform(*_DISTRACTOR_RANGE, size=(m, 1, 1, 1))
    x = s * shifted(y) + w * shifted(other)
    for _ in range(3):
      cy = rng.uniform(0, size, size=(m, 1, 1))
      cx = rng.uniform(0, size, size=(m, 1, 1))
      sigma = rng.uniform(2.0, 6.0, size=(m, 1, 1))
      blob = np.exp(-((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2) / (2 * sigma**2))
      x += blob[..., None] * rng.normal(0.0, _BLOB_SD, size=(m, 1, 1, 3))
    x = 0.5 + 0.16 * x + rng.uniform(-0.1, 0.1, size=(m, 1, 1, 1))
    x += rng.normal(0.0, _NOISE_SD, size=x.shape)
    images[start : start + m] = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
  return images, labels


# ------------------------------------------------------------------------------------------------
# Loaders of the official file formats.


def _require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DataError(f'{path}: missing directory ({what})')
  return path


def _require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing file ({what})')
  return path


def _find_dir(data_dir: str, marker: str, subdirs: Sequence[str], what: str) -> str:
  """Returns `data_dir` or the first `data_dir/<subdir>` that holds `marker`."""
  _require_dir(data_dir, what)
  for candidate in [data_dir] + [os.path.join(data_dir, s) for s in subdirs]:
    if os.path.exists(os.path.join(candidate, marker)):
      return candidate
  raise DataError(
    f'{os.path.join(data_dir, marker)}: missing file or directory ({what}; '
    f'also looked in {", ".join(subdirs)})'
  )


def _read_records(path: str, label_bytes: int, label_index: int) -> Tuple[np.ndarray, np.ndarray]:
  """Reads a CIFAR binary file of records `label_bytes` + 3072 image bytes (CHW, row-major)."""
  _require_file(path, 'CIFAR binary batch')
  record = label_bytes + CIFAR_IMAGE_BYTES
  size = os.path.getsize(path)
  if size == 0 or size % record:
    raise DataError(
      f'{path}: wrong size {size} bytes, not a positive multiple of the {record}-byte record'
    )
  try:
    raw = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise DataError(f'{path}: cannot be read ({e})') from None
  raw = raw.reshape(-1, record)
  labels = raw[:, label_index].astype(np.int32)
  images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def _check_labels(path: str, labels: np.ndarray, num_classes: int) -> None:
  if labels.size and labels.max() >= num_classes:
    raise DataError(f'{path}: label {int(labels.max())} out of range [0, {num_classes})')


def load_cifar10(data_dir: str) -> ImageDataset:
  """Loads CIFAR-10 from its binary version (`cifar-10-batches-bin`).

  Args:
    data_dir: the directory holding `data_batch_1.bin` .. `data_batch_5.bin` and
      `test_batch.bin`, or its parent (which holds `cifar-10-batches-bin/`).

  Returns:
    An `ImageDataset` with 10 classes.

  Raises:
    DataError: on a missing directory or file, or a file whose size is not a multiple of the
      3073-byte record.
  """
  d = _find_dir(data_dir, CIFAR10_TEST_FILE, ['cifar-10-batches-bin'], 'CIFAR-10 binary version')
  parts = []
  for name in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,):
    path = os.path.join(d, name)
    x, y = _read_records(path, 1, 0)
    _check_labels(path, y, 10)
    parts.append((x, y))
  train_x = np.concatenate([p[0] for p in parts[:-1]])
  train_y = np.concatenate([p[1] for p in parts[:-1]])
  return ImageDataset('cifar10', train_x, train_y, parts[-1][0], parts[-1][1], 10)


def load_cifar100(data_dir: str) -> ImageDataset:
  """Loads CIFAR-100 (fine labels) from its binary version (`cifar-100-binary`).

  Args:
    data_dir: the directory holding `train.bin` and `test.bin`, or its parent (which holds
      `cifar-100-binary/`).

  Returns:
    An `ImageDataset` with 100 classes (the fine labels; the coarse byte is skipped).

  Raises:
    DataError: on a missing directory or file, or a file whose size is not a multiple of the
      3074-byte record.
  """
  d = _find_dir(data_dir, CIFAR100_TEST_FILE, ['cifar-100-binary'], 'CIFAR-100 binary version')
  splits = []
  for name in (CIFAR100_TRAIN_FILE, CIFAR100_TEST_FILE):
    path = os.path.join(d, name)
    x, y = _read_records(path, 2, 1)
    _check_labels(path, y, 100)
    splits.append((x, y))
  return ImageDataset('cifar100', splits[0][0], splits[0][1], splits[1][0], splits[1][1], 100)


@contextlib.contextmanager
def _native_stderr_silenced():
  """Sends what C code writes to stderr (file descriptor 2) to /dev/null while inside.

  libjpeg prints its warnings about damaged data ('Corrupt JPEG data', 'Input file read
  error') straight to stderr; the error that follows them names the file in one line.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _decode_image(path: str, size: int) -> np.ndarray:
  """Decodes a PNG or JPEG file to uint8 `[size, size, 3]` (grey images are made RGB)."""
  try:
    # Read by Python, which takes any file name the file system holds (TensorFlow's file
    # functions refuse names that are not UTF-8).
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'{path}: cannot be read ({e.strerror or e})') from None
  try:
    with _native_stderr_silenced():
      image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except (tf.errors.OpError, ValueError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'{path}: unreadable image ({msg})') from None
  if image.shape != (size, size, 3):
    raise DataError(f'{path}: image of shape {image.shape}, expected ({size}, {size}, 3)')
  return image


def _decode_all(paths: Sequence[str], size: int) -> np.ndarray:
  images = np.empty((len(paths), size, size, 3), np.uint8)
  for i, path in enumerate(paths):
    images[i] = _decode_image(path, size)
  return images


def _list_images(directory: str, suffixes: Tuple[str, ...]) -> List[str]:
  _require_dir(directory, 'image folder')
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(suffixes))
  if not names:
    raise DataError(f'{directory}: no {"/".join(suffixes)} images in the folder')
  return [os.path.join(directory, n) for n in names]


def load_cinic10(data_dir: str) -> ImageDataset:
  """Loads CINIC-10 from its official folder layout.

  Args:
    data_dir: the directory holding `train/` and `test/` (and `valid/`, unused), each with one
      folder of 32x32 PNGs per class (`airplane`, `automobile`, ..., `truck`).

  Returns:
    An `ImageDataset` with 10 classes; labels follow the order of `CINIC10_CLASSES`.

  Raises:
    DataError: on a missing or empty folder, or an unreadable or wrongly sized image.
  """
  _require_dir(data_dir, 'CINIC-10 root')
  splits = []
  for split in ('train', 'test'):
    split_dir = _require_dir(os.path.join(data_dir, split), f'CINIC-10 {split} split')
    paths, labels = [], []
    for label, cls in enumerate(CINIC10_CLASSES):
      files = _list_images(os.path.join(split_dir, cls), ('.png',))
      paths += files
      labels += [label] * len(files)
    splits.append((_decode_all(paths, 32), np.asarray(labels, np.int32)))
  return ImageDataset('cinic10', splits[0][0], splits[0][1], splits[1][0], splits[1][1], 10)


def load_tinyimagenet(data_dir: str) -> ImageDataset:
  """Loads TinyImageNet (`tiny-imagenet-200`) from its official folder layout.

  Training images come from `train/<wnid>/images/*.JPEG`, test images from `val/images/` with
  labels from `val/val_annotations.txt` (tab-separated: file name, wnid, bounding box). Labels
  are the line numbers of the wnids in `wnids.txt`.

  Args:
    data_dir: the `tiny-imagenet-200` directory, or its parent.

  Returns:
    An `ImageDataset` with 64x64x3 images and as many classes as `wnids.txt` lists (200).

  Raises:
    DataError: on a missing file or folder, a malformed annotation line, an unknown wnid, or an
      unreadable or wrongly sized image.
  """
  d = _find_dir(data_dir, 'wnids.txt', ['tiny-imagenet-200'], 'TinyImageNet')
  wnids_path = os.path.join(d, 'wnids.txt')
  with open(wnids_path, encoding='utf-8') as f:
    wnids = [line.strip() for line in f if line.strip()]
  if not wnids or len(set(wnids)) != len(wnids):
    raise DataError(f'{wnids_path}: empty or with repeated wnids')
  index = {w: i for i, w in enumerate(wnids)}
  paths, labels = [], []
  for wnid in wnids:
    files = _list_images(os.path.join(d, 'train', wnid, 'images'), ('.jpeg', '.jpg'))
    paths += files
    labels += [index[wnid]] * len(files)
  train = (_decode_all(paths, 64), np.asarray(labels, np.int32))
  ann_path = _require_file(
    os.path.join(d, 'val', 'val_annotations.txt'), 'TinyImageNet validation labels'
  )
  images_dir = _require_dir(os.path.join(d, 'val', 'images'), 'TinyImageNet validation images')
  paths, labels = [], []
  with open(ann_path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip('\n').split('\t')
      if len(fields) < 2:
        raise DataError(
          f'{ann_path}: line {lineno} is malformed (expected tab-separated file name and wnid)'
        )
      if fields[1] not in index:
        raise DataError(f'{ann_path}: line {lineno} names wnid {fields[1]!r} not in wnids.txt')
      path = os.path.join(images_dir, fields[0])
      _require_file(path, f'listed in {ann_path} line {lineno}')
      paths.append(path)
      labels.append(index[fields[1]])
  if not paths:
    raise DataError(f'{ann_path}: no annotations')
  test = (_decode_all(paths, 64), np.asarray(labels, np.int32))
  return ImageDataset('tinyimagenet', train[0], train[1], test[0], test[1], len(wnids))


def load_dataset(
  name: str,
  data_dir: Optional[str] = None,
  *,
  seed: int = 0,
  synthetic_train: int = 10000,
  synthetic_test: int = 2000,
) -> ImageDataset:
  """Loads a dataset by name.

  Args:
    name: one of `DATASET_NAMES`.
    data_dir: directory of the files (ignored for 'synthetic', required otherwise).
    seed: seed of the synthetic dataset.
    synthetic_train: training examples of the synthetic dataset.
    synthetic_test: test examples of the synthetic dataset.

  Returns:
    The `ImageDataset`.

  Raises:
    ValueError: on an unknown name or a missing `data_dir`.
    DataError: on a problem with the files.
  """
  if name == 'synthetic':
    return synthetic(synthetic_train, synthetic_test, seed)
  loaders = {
    'cifar10': load_cifar10,
    'cifar100': load_cifar100,
    'cinic10': load_cinic10,
    'tinyimagenet': load_tinyimagenet,
  }
  if name not in loaders:
    raise ValueError(f'unknown dataset {name!r}; expected one of {", ".join(DATASET_NAMES)}')
  if not data_dir:
    raise ValueError(f'dataset {name!r} is read from local files: give their directory')
  return loaders[name](data_dir)


# ------------------------------------------------------------------------------------------------
# Partitions.


def iid_partition(num_examples: int, num_clients: int, seed: int) -> List[np.ndarray]:
  """Splits `range(num_examples)` uniformly at random into `num_clients` near-equal parts.

  Args:
    num_examples: number of examples N.
    num_clients: number of clients K (1 <= K <= N).
    seed: seed of the permutation.

  Returns:
    K sorted int64 index arrays whose sizes differ by at most one.

  Raises:
    ValueError: if K is out of range.
  """
  if not 1 <= num_clients <= num_examples:
    raise ValueError(f'num_clients must be in [1, {num_examples}], got {num_clients}')
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
  labels: np.ndarray,
  num_clients: int,
  alpha: float,
  seed: int,
  *,
  min_size: int = 10,
  max_tries: int = 100,
) -> List[np.ndarray]:
  """Label-skew partition: each class is shared among clients by Dirichlet(alpha) proportions.

  For every class (in label order) the class's examples are shuffled and cut by proportions
  `p ~ Dirichlet(alpha * 1_K)`; a client that already holds N/K examples gets no share of later
  classes (the usual balancing step). If some client ends with fewer than `min_size` examples the
  whole draw is repeated (from the same generator, so the result stays a function of the seed), up
  to `max_tries` times; if that never succeeds, examples are moved one at a time from the largest
  client (its highest index) to the smallest until every client has `min_size`. Small `alpha`
  gives strong skew (clients see few classes); large `alpha` approaches the global label mix.

  Args:
    labels: int array `[N]` of class indices.
    num_clients: number of clients K >= 1.
    alpha: Dirichlet concentration a > 0.
    seed: seed of the draw.
    min_size: minimum number of examples per client (K * min_size <= N).
    max_tries: draws before falling back to the repair step.

  Returns:
    K sorted int64 index arrays that together hold every example exactly once.

  Raises:
    ValueError: if an argument is out of range.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if num_clients < 1 or alpha <= 0 or min_size < 0 or num_clients * min_size > n:
    raise ValueError(
      f'need num_clients >= 1, alpha > 0 and num_clients * min_size <= {n}; '
      f'got num_clients={num_clients}, alpha={alpha}, min_size={min_size}'
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max(1, max_tries)):
    parts = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for c in classes:
      idx = np.flatnonzero(labels == c)
      rng.shuffle(idx)
      p = rng.dirichlet(np.full(num_clients, alpha))
      p = p * (sizes < n / num_clients)
      p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].append(chunk)
        sizes[k] += len(chunk)
    if sizes.min() >= min_size:
      break
  result = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
  while min(len(r) for r in result) < min_size:
    small = int(np.argmin([len(r) for r in result]))
    large = int(np.argmax([len(r) for r in result]))
    result[small] = np.sort(np.append(result[small], result[large][-1]))
    result[large] = result[large][:-1]
  return [r.astype(np.int64) for r in result]


def label_distribution(
  labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
  """Returns the int64 count matrix `[K, num_classes]` of each client's labels."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partitions])


def label_skew(labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int) -> dict:
  """Measures the label skew of a partition.

  Args:
    labels: int array `[N]`.
    partitions: client index arrays.
    num_classes: number of classes C.

  Returns:
    A dict with `mean_kl` (mean over clients of KL(client label mix || global label mix), in
    nats; 0 for a perfectly balanced split), `mean_max_share` (mean over clients of the share of
    the client's most frequent class; 1/C when balanced) and `mean_classes` (mean number of
    classes present per client).
  """
  counts = label_distribution(labels, partitions, num_classes).astype(np.float64)
  total = counts.sum(axis=0)
  q = total / total.sum()
  p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(p > 0, p * np.log(p / np.where(q > 0, q, 1)), 0.0)
  return {
    'mean_kl': float(terms.sum(axis=1).mean()),
    'mean_max_share': float(p.max(axis=1).mean()),
    'mean_classes': float((counts > 0).sum(axis=1).mean()),
  }


def partition(
  labels: np.ndarray, num_clients: int, dirichlet_alpha: float, seed: int, *, min_size: int = 10
) -> List[np.ndarray]:
  """Dirichlet label-skew partition, or IID when `dirichlet_alpha <= 0` (the IID switch).

  Args:
    labels: int array `[N]`.
    num_clients: number of clients K.
    dirichlet_alpha: Dirichlet parameter a; 0 (or negative) selects `iid_partition`.
    seed: seed of the partition.
    min_size: minimum client size of the Dirichlet partition.

  Returns:
    K sorted int64 index arrays.
  """
  if dirichlet_alpha <= 0:
    return iid_partition(len(labels), num_clients, seed)
  return dirichlet_partition(labels, num_clients, dirichlet_alpha, seed, min_size=min_size)


# ------------------------------------------------------------------------------------------------
# tf.data pipelines.


def channel_stats(images: np.ndarray, chunk: int = 4096) -> Tuple[List[float], List[float]]:
  """Per-channel mean and standard deviation of images, in the units of `to_float` (pixel / 255).

  The FedMef models normalise their input with these (`fedmef_tf.models.build_model`'s
  `input_mean` / `input_std`): computed once from a run's training split, stored with the run
  and inside the saved and exported model, so that every client, the evaluation and a phone
  apply the same constants. Accumulated in float64 over chunks, so a 50000-image set needs no
  float copy of itself.

  Args:
    images: uint8 array `[N, H, W, C]` (N >= 1).
    chunk: images per accumulation step.

  Returns:
    `(mean, std)`: two lists of C floats; std is the population standard deviation, floored at
    1/255 (one pixel step) so that a constant channel does not divide by zero.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f'channel_stats needs images [N, H, W, C] with N >= 1, got {images.shape}')
  channels = images.shape[-1]
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  for start in range(0, images.shape[0], chunk):
    block = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  count = float(np.prod(images.shape[:-1]))
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  std = np.maximum(np.sqrt(var), 1.0)
  return [float(v) for v in mean / 255.0], [float(v) for v in std / 255.0]


def to_float(images: tf.Tensor, labels: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Maps a uint8 image batch to float32 in [0, 1] and labels to int32."""
  return tf.cast(images, tf.float32) / 255.0, tf.cast(labels, tf.int32)


def client_dataset(
  dataset: tf.data.Dataset,
  *,
  batch_size: Optional[int] = None,
  epochs: int = 1,
  shuffle_seed: Optional[int] = None,
  shuffle_buffer: int = 10000,
) -> tf.data.Dataset:
  """Turns a client's unbatched `(image, label)` dataset into its training input.

  Shuffles (each iteration anew, deterministically when `shuffle_seed` is given), repeats
  `epochs` times, batches when `batch_size` is given (the last batch may be smaller) and
  converts uint8 images with `to_float` (float32 input is passed through: no `map`). A client
  update that batches and loops over epochs itself (as `fedmef_tf.client` does) takes the
  default `batch_size=None, epochs=1`.

  Args:
    dataset: elements `(uint8 or float32 [H, W, 3], int32 [])`.
    batch_size: batch size B, or None to leave the examples unbatched.
    epochs: repetitions of the dataset.
    shuffle_seed: seed of the shuffle; None for no shuffle.
    shuffle_buffer: shuffle buffer size (a client's whole dataset for the usual sizes).

  Returns:
    Dataset of `(float32 [b, H, W, 3], int32 [b])` batches, or of `(float32 [H, W, 3],
    int32 [])` examples when unbatched.
  """
  if shuffle_seed is not None:
    dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  if epochs != 1:
    dataset = dataset.repeat(epochs)
  if batch_size is not None:
    dataset = dataset.batch(batch_size)
  if dataset.element_spec[0].dtype == tf.float32:
    return dataset
  return dataset.map(to_float)


def test_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> tf.data.Dataset:
  """Returns the evaluation pipeline `(float32 [b, H, W, 3], int32 [b])`, in order, unshuffled."""
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size).map(to_float)


def make_client_dataset_fn(
  images: np.ndarray,
  labels: np.ndarray,
  partitions: Sequence[np.ndarray],
  *,
  as_float: bool = False,
) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """Returns `fn(client_id) -> tf.data.Dataset` of one client's unbatched examples.

  Client ids are the decimal strings '0' .. 'K-1' (index into `partitions`). The function is
  pure TensorFlow (it parses the id and gathers the client's rows), so it runs eagerly and
  inside `tf.function`; the returned dataset holds only that client's examples, so memory does
  not grow with the number of clients. The arrays are converted to tensors once.

  With `as_float` the gathered rows are converted to float32 in [0, 1] before the dataset is
  made, so no `Dataset.map` is needed later: an eager `map` registers a new function in the
  runtime each time a pipeline is built, which adds up over thousands of client-rounds.

  Args:
    images: uint8 `[N, H, W, 3]`.
    labels: int32 `[N]`.
    partitions: K index arrays.
    as_float: yield float32 images in [0, 1] instead of uint8.

  Returns:
    The dataset function.
  """
  images_t = tf.convert_to_tensor(images, tf.uint8)
  labels_t = tf.convert_to_tensor(np.asarray(labels, np.int32))
  parts = tf.RaggedTensor.from_row_lengths(
    np.concatenate([np.asarray(p, np.int64) for p in partitions]),
    np.asarray([len(p) for p in partitions], np.int64),
  )

  def dataset_fn(client_id) -> tf.data.Dataset:
    k = tf.strings.to_number(client_id, out_type=tf.int64)
    idx = parts[k]
    x = tf.gather(images_t, idx)
    if as_float:
      x = tf.cast(x, tf.float32) / 255.0
    return tf.data.Dataset.from_tensor_slices((x, tf.gather(labels_t, idx)))

  return dataset_fn
