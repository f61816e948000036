"""A federated dataset of the user's own, read from TFF's SQL client data (`--dataset=client_data`).

The format is the one `tff.simulation.datasets.save_to_sql_client_data` writes and
`tff.simulation.datasets.load_and_parse_sql_client_data` reads (an SQLite database whose
`examples` table holds one serialized `tf.train.Example` per row, with its client id). The
directory `--data_dir` holds two such files:

- `train.sqlite`: the federated training data; each client id of the file is one client;
- `test.sqlite`: the held-out data the global model is evaluated on (the examples of all its
  clients together).

Element structure (every client of both files alike; what `save_to_sql_client_data` takes is
a dataset of such dicts):

- `'image'`: integer pixel values in [0, 255] (for example a `tf.uint8` tensor), of shape
  `[H, W, C]` with C = 1 or 3. The serialized example keeps the values only, so the shape is
  read from an optional integer feature `'image_shape'` (`[H, W, C]`) when present and
  otherwise inferred for square images (H = W, C = 3 or 1 is unambiguous);
- `'label'`: an integer class index in [0, num_classes); num_classes is the largest label of
  both files plus one.

Float images are refused (the programs keep images as uint8 until batching and feed the model
pixel / 255). `--num_clients` = K uses the first K client ids of `train.sqlite` in sorted order;
the data's own split is kept (`--iid`, `--dirichlet_alpha` and `--min_client_size` do not apply).

Every problem (a missing file, a file that is not such a database, an element structure other
than the above) raises `fedmef_tf.data.DataError` with one line naming the file.
"""

import math
import os
import sqlite3
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmef_tf import data as data_lib

TRAIN_FILE = 'train.sqlite'
TEST_FILE = 'test.sqlite'
NAME = 'client_data'


def _first_example(path: str) -> tf.train.Example:
  """The first serialized example of the database at `path` (opened read-only)."""
  try:
    connection = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  except sqlite3.Error as e:
    raise data_lib.DataError(f'{path}: cannot be opened ({e})') from None
  try:
    tables = {r[0] for r in connection.execute('SELECT name FROM sqlite_master')}
    missing = {'examples', 'client_metadata'} - tables
    if missing:
      raise data_lib.DataError(
        f'{path}: not TFF SQL client data (no table {", ".join(sorted(missing))})'
      )
    row = connection.execute('SELECT serialized_example_proto FROM examples LIMIT 1').fetchone()
  except sqlite3.DatabaseError as e:
    raise data_lib.DataError(f'{path}: not TFF SQL client data ({e})') from None
  finally:
    connection.close()
  if row is None:
    raise data_lib.DataError(f'{path}: no examples')
  try:
    return tf.train.Example.FromString(row[0])
  except Exception as e:  # pylint: disable=broad-except
    raise data_lib.DataError(
      f'{path}: an example is not a serialized tf.train.Example ({type(e).__name__})'
    ) from None


def _feature_values(example: tf.train.Example, name: str):
  feature = example.features.feature[name]
  kind = feature.WhichOneof('kind')
  return kind, (list(getattr(feature, kind).value) if kind else [])


def element_spec(path: str) -> dict:
  """The element spec `{'image': uint8 [H, W, C], 'label': int64 []}` of the file at `path`.

  Raises:
    DataError: on a missing or unreadable file, or an element structure other than the
      module's.
  """
  if not os.path.isfile(path):
    raise data_lib.DataError(f'{path}: missing file (TFF SQL client data)')
  example = _first_example(path)
  names = set(example.features.feature)
  for name in ('image', 'label'):
    if name not in names:
      raise data_lib.DataError(
        f'{path}: examples have no {name!r} feature (they have '
        f'{", ".join(sorted(names)) or "none"}; expected image, label)'
      )
  kind, values = _feature_values(example, 'label')
  if kind != 'int64_list' or len(values) != 1:
    raise data_lib.DataError(
      f"{path}: feature 'label' must be one integer, found {len(values)} value(s) of {kind}"
    )
  kind, values = _feature_values(example, 'image')
  if kind != 'int64_list':
    raise data_lib.DataError(
      f"{path}: feature 'image' must hold integer pixel values in [0, 255] (uint8), found {kind}"
    )
  n = len(values)
  if 'image_shape' in names:
    shape_kind, shape = _feature_values(example, 'image_shape')
    if shape_kind != 'int64_list' or len(shape) != 3 or int(np.prod(shape)) != n:
      raise data_lib.DataError(
        f"{path}: feature 'image_shape' {shape} is not [H, W, C] of the {n} image values"
      )
    shape = tuple(int(d) for d in shape)
  else:
    shape = None
    for channels in (3, 1):
      side = math.isqrt(n // channels) if n % channels == 0 else 0
      if side > 0 and side * side * channels == n:
        shape = (side, side, channels)
        break
    if shape is None:
      raise data_lib.DataError(
        f'{path}: cannot infer the shape of an image of {n} values '
        "(not H*H*3 or H*H*1); add an integer feature 'image_shape'"
      )
  if shape[2] not in (1, 3):
    raise data_lib.DataError(f'{path}: images have {shape[2]} channels, expected 1 or 3')
  return {'image': tf.TensorSpec(shape, tf.uint8), 'label': tf.TensorSpec([], tf.int64)}


def _read_clients(path: str, spec: dict) -> Tuple[List[str], List[np.ndarray], List[np.ndarray]]:
  """Client ids (sorted), and each client's uint8 images and int32 labels, through TFF."""
  # Pixels are parsed as int64 and checked before they become uint8 (a cast would wrap).
  parse_spec = {'image': tf.TensorSpec(spec['image'].shape, tf.int64), 'label': spec['label']}
  try:
    federated = tff.simulation.datasets.load_and_parse_sql_client_data(path, parse_spec)
    ids = sorted(federated.client_ids)
    images, labels = [], []
    for client_id in ids:
      x, y = [], []
      for batch in federated.create_tf_dataset_for_client(client_id).batch(4096):
        pixels = batch['image'].numpy()
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
          raise data_lib.DataError(
            f'{path}: client {client_id!r} has pixel values outside [0, 255]'
          )
        x.append(pixels.astype(np.uint8))
        y.append(batch['label'].numpy())
      images.append(np.concatenate(x) if x else np.zeros((0,) + spec['image'].shape, np.uint8))
      labels.append(np.concatenate(y).astype(np.int64) if y else np.zeros(0, np.int64))
  except (tf.errors.OpError, sqlite3.Error, ValueError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise data_lib.DataError(f'{path}: unreadable TFF SQL client data ({msg[:200]})') from None
  if not ids:
    raise data_lib.DataError(f'{path}: no clients')
  return ids, images, labels


def _check_labels(path: str, labels: Sequence[np.ndarray]) -> None:
  for y in labels:
    if y.size and y.min() < 0:
      raise data_lib.DataError(f'{path}: label {int(y.min())} is negative')


class TooFewClientsError(data_lib.DataError):
  """The data hold fewer clients than were asked for."""

  def __init__(self, path: str, available: int, requested: int):
    self.path, self.available, self.requested = path, available, requested
    super().__init__(f'{path}: {available} clients, fewer than the {requested} asked for')


def load_sql_client_data(
  data_dir: str, num_clients: int
) -> Tuple[data_lib.ImageDataset, List[np.ndarray], List[str]]:
  """Reads `data_dir/train.sqlite` and `data_dir/test.sqlite` (see the module docstring).

  Args:
    data_dir: the directory of the two files.
    num_clients: K; the first K client ids of `train.sqlite` in sorted order are used.

  Returns:
    `(dataset, partitions, client_ids)`: an `ImageDataset` named 'client_data' whose training
    arrays are the K clients' examples one client after another, K index arrays into them (one
    per client, for `client_data.make_client_data`), and the K client ids of the file.

  Raises:
    DataError: on a missing or unreadable file, an element structure other than the module's,
      fewer than K clients, or a client without examples.
  """
  train_path = os.path.join(data_dir, TRAIN_FILE)
  test_path = os.path.join(data_dir, TEST_FILE)
  spec = element_spec(train_path)
  test_spec = element_spec(test_path)
  if test_spec['image'].shape != spec['image'].shape:
    raise data_lib.DataError(
      f'{test_path}: images of shape {test_spec["image"].shape}, those of '
      f'{TRAIN_FILE} are {spec["image"].shape}'
    )
  ids, images, labels = _read_clients(train_path, spec)
  if num_clients > len(ids):
    raise TooFewClientsError(train_path, len(ids), num_clients)
  ids, images, labels = ids[:num_clients], images[:num_clients], labels[:num_clients]
  for client_id, y in zip(ids, labels):
    if not y.size:
      raise data_lib.DataError(f'{train_path}: client {client_id!r} has no examples')
  _, test_images, test_labels = _read_clients(test_path, spec)
  _check_labels(train_path, labels)
  _check_labels(test_path, test_labels)
  train_y = np.concatenate(labels).astype(np.int32)
  test_y = np.concatenate(test_labels).astype(np.int32)
  num_classes = int(max(train_y.max(), test_y.max() if test_y.size else 0)) + 1
  sizes = np.cumsum([0] + [len(y) for y in labels])
  partitions = [np.arange(sizes[k], sizes[k + 1], dtype=np.int64) for k in range(len(labels))]
  dataset = data_lib.ImageDataset(
    NAME, np.concatenate(images), train_y, np.concatenate(test_images), test_y, max(num_classes, 2)
  )
  return dataset, partitions, ids
