"""Federated views of a partitioned dataset: `tff.simulation.datasets.ClientData` and test data.

The plain pieces (loading, partitioning, tf.data pipelines) live in `fedmef_tf/data.py`; this
module only wraps them in TFF's `ClientData`, so programs can sample clients by id and build
each sampled client's pipeline lazily (memory does not grow with the number of clients).
"""

from typing import List, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmef_tf import data as data_lib


def client_ids(num_clients: int) -> List[str]:
  """Returns the client ids '0' .. 'K-1' used by `make_client_data`."""
  return [str(k) for k in range(num_clients)]


def make_client_data(
  images: np.ndarray,
  labels: np.ndarray,
  partitions: Sequence[np.ndarray],
  *,
  as_float: bool = False,
) -> tff.simulation.datasets.ClientData:
  """Wraps a partition of `(images, labels)` as a `ClientData`.

  Each client's dataset yields unbatched `(uint8 [H, W, 3], int32 [])` examples in index order
  (float32 images in [0, 1] with `as_float`); shuffle, epochs and batching are left to
  `fedmef_tf.data.client_dataset` (the caller chooses the seed per round and client).

  Args:
    images: uint8 `[N, H, W, 3]`.
    labels: int32 `[N]`.
    partitions: K index arrays (from `fedmef_tf.data.partition`).
    as_float: yield float32 images (converted when a client's dataset is made, no `map`).

  Returns:
    A `ClientData` with ids '0' .. 'K-1'.
  """
  fn = data_lib.make_client_dataset_fn(images, labels, partitions, as_float=as_float)
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids(len(partitions)), fn)


def client_sizes(partitions: Sequence[np.ndarray]) -> List[int]:
  """Returns n_k, the number of examples of each client."""
  return [int(len(p)) for p in partitions]


def make_test_dataset(dataset: data_lib.ImageDataset, batch_size: int = 500) -> tf.data.Dataset:
  """Returns the held-out test split as batched float32 `(x, y)` for evaluating the global model."""
  return data_lib.test_dataset(dataset.test_images, dataset.test_labels, batch_size)
