"""The tfmot comparison point: a plain Keras CNN pruned with tensorflow-model-optimization.

What a TF user picks today to ship a sparse model for on-device training: the registry `cnn` as
the stock Keras model `fedmef_tf.models.keras_cnn` (Conv2D without bias + BatchNorm + ReLU,
global average pooling, Dense classifier), wrapped with
`tfmot.sparsity.keras.prune_low_magnitude` at a constant sparsity `1 - density` (the same density
in every layer, tfmot's default, not ERK), pruned by one `fit` step with the `UpdatePruningStep`
callback, and stripped with `strip_pruning`. The stripped model has no mask: its zeros are plain
zero weights, and an on-device SGD step makes them nonzero again (the export keeps no mask to
enforce; `tflite_export.verify` reports this).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from fedmef_tf import models

__all__ = ['build_plain_cnn', 'build_tfmot_cnn']


def build_plain_cnn(
  *, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), seed: int = 0
) -> tf.keras.Model:
  """The registry `cnn` (baseline form) from stock Keras layers, dense: `models.keras_cnn`.

  Args:
    num_classes: number of logits.
    input_shape: `(H, W, C)`.
    seed: seed of the kernel initializers.

  Returns:
    An uncompiled Keras model `[B, H, W, C]` -> `[B, num_classes]` logits.
  """
  return models.keras_cnn(num_classes=num_classes, input_shape=input_shape, seed=seed)


def build_tfmot_cnn(
  *, density: float, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), seed: int = 0
) -> tf.keras.Model:
  """`build_plain_cnn` pruned by tfmot to `density` in every layer, then stripped.

  Args:
    density: fraction of nonzero weights kept in each Conv2D / Dense kernel, in (0, 1].
    num_classes, input_shape, seed: as `build_plain_cnn`.

  Returns:
    The stripped Keras model (stock layers; kernels with about `density` nonzeros).

  Raises:
    ValueError: density out of range.
  """
  import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel

  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density}')
  model = build_plain_cnn(num_classes=num_classes, input_shape=input_shape, seed=seed)
  schedule = tfmot.sparsity.keras.ConstantSparsity(1.0 - float(density), begin_step=0, frequency=1)
  pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
  pruned.compile(
    optimizer=tf.keras.optimizers.SGD(1e-3),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((4, *input_shape)).astype(np.float32)
  y = rng.randint(0, num_classes, size=(4,)).astype(np.int32)
  pruned.fit(
    x, y, batch_size=4, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]
  )
  return tfmot.sparsity.keras.strip_pruning(pruned)
