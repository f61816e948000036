"""Memory footprint of one training step: an analytic model and the allocator's measured peak.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) claims a smaller on-device training footprint
through sparse weights and scaled activation pruning (SAP). This module gives both sides of the
claim (ALGORITHM.md, "Memory footprint"):

- :func:`measure_train_step_peak`: the peak bytes TensorFlow's allocator reports for one call of
  a compiled (``tf.function``) client SGD step (``fedmef_tf.client.sgd_step``), minus what was
  resident before the call (weights, masks, the input batch);
- :func:`analytic_footprint`: the same quantity predicted from the model's structure, layer by
  layer, plus the resident weight bytes.

What the analytic model counts (all float32, 4 bytes; ``n`` = elements of a tensor at the
given batch size):

Weights (resident, not part of the measured peak):
  ``weight_bytes`` = 4 * (nonzeros of masked kernels) + 4 * (all other trainable parameters:
  biases, NSConv gains, BatchNorm scale/offset) + 4 * (BatchNorm moving statistics)
  + ``ceil(prunable / 8)`` (the mask as a bitmap, what a sparse format needs).
  ``weight_bytes_as_implemented`` is what the Keras model holds: dense kernels, and float32
  ``mask`` and ``marked`` variables (3 * 4 bytes per prunable entry) plus the rest.

Cached for the backward pass (``cached_bytes``, per layer and in total), by layer type:
  - masked conv / depthwise / dense, SAP on (``sap_gamma > 0``): ``4 * k + ceil(n / 8)`` for
    its input, ``k = ceil((1 - gamma) * n)`` (see ``fedmef_tf.sap``), but at most ``n / 2``
    when the input is a ReLU output (SAP keeps no zeros, and a ReLU of centred
    pre-activations is zero on about half of its entries); SAP off: the float input,
    ``4 * n`` (shared with a ReLU that cached the same tensor, counted once);
  - every masked layer: the effective kernel its op keeps for the input gradient
    (``kernel * mask``, or the NSConv ``W_hat``), ``4 * |W|`` (``kernel_cache_bytes``); the
    NSConv standardisation recomputes its statistics in the backward pass and keeps nothing
    kernel-sized;
  - BatchNormalization (training): its input, ``4 * n`` (plus per-channel statistics);
  - ReLU / ReLU6 (Keras): its output, ``4 * n`` (usually the next conv's cached input);
    ``sap.BitReLU``: ``ceil(n / 8)``;
  - residual add, global average pooling, bias add, reshape: nothing (shapes only);
  - max pooling: input and output; dropout: a float mask; other layers with weights: input.

Peak model (``peak_bytes``): the measured peak is not the sum of caches. The live set of
the step is followed layer by layer (details in :func:`analytic_footprint`): in the forward pass
the caches of the layers done so far, all effective kernels (computed first: they depend on
variables only), and the current layer's input with its output or its SAP selection working
set; in the backward pass the caches not yet consumed, the dense gradients of the layers
already done (the SGD update applies them only once all are computed; the gradient of a sparse
kernel is dense), the upstream gradient, the input gradient or the rebuilt ``x_pruned`` of a SAP
layer, and the kernel-side working set. ``peak_bytes`` is the largest of these. Not modelled:
the allocator's rounding of each allocation (up to 2x for a single tensor in TensorFlow's BFC
allocator), the order in which a multi-threaded executor runs independent ops, and the small
per-channel tensors; with these the prediction is typically within 20% of the measurement.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from fedmef_tf import client
from fedmef_tf import masks
from fedmef_tf import sap
from fedmef_tf import sparse_layers

__all__ = ['analytic_footprint', 'measure_train_step_peak']

_F32 = 4


# ---------------------------------------------------------------------------------------------
# Measured
# ---------------------------------------------------------------------------------------------


def _default_device() -> str:
  return 'GPU:0' if tf.config.list_logical_devices('GPU') else 'CPU:0'


def measure_train_step_peak(
  model: tf.keras.Model,
  batch_size: int,
  *,
  learning_rate: float = 0.01,
  steps: int = 3,
  device: Optional[str] = None,
  seed: int = 0,
  gradient_clipping: Optional[float] = None,
) -> Dict[str, float]:
  """Allocator peak of one compiled client SGD step, minus the bytes resident before it.

  The step is the clients' own, ``fedmef_tf.client.sgd_step``, ``tf.function``-compiled:
  forward with ``training=True``, the clients' loss (softmax cross-entropy on the logits),
  ``tape.gradient`` over the trainable variables, AGC with ``gradient_clipping``, the SGD
  update and the masks re-applied to the kernels. It is traced and run twice (warm-up:
  tracing, allocator warm-up), then called ``steps`` times; before each call the allocator's
  peak is reset (``tf.config.experimental.reset_memory_stats``) and ``current`` is read; after
  it, ``peak - current_before`` is the step's peak.

  Args:
      model: a built Keras model mapping ``[B, *input_shape]`` float32 to ``[B, classes]``
          logits.
      batch_size: B.
      learning_rate: the SGD step's learning rate.
      steps: measured calls (>= 1).
      device: allocator to read, ``'CPU:0'`` or ``'GPU:0'``; default GPU if present.
      seed: seed of the random batch.
      gradient_clipping: AGC threshold applied to the gradients before the update
          (``fedmef_tf.agc.clipping_for`` the model's variant, as its clients train), or None.

  Returns:
      A dict with ``peak_bytes`` (median over the calls, bytes), ``peak_bytes_min`` and
      ``peak_bytes_max``, ``resident_bytes`` (``current`` before the calls, bytes: weights,
      batch, and whatever else the process holds), ``step_seconds``
      (median wall time of one call, seconds), ``step_seconds_min`` (the fastest call,
      seconds: the least disturbed by other processes) and ``batch_size``.
  """
  if batch_size < 1 or steps < 1:
    raise ValueError(f'batch_size and steps must be >= 1, got {batch_size}, {steps}')
  device = device or _default_device()
  input_shape = tuple(int(d) for d in model.input_shape[1:])
  num_classes = int(model.output_shape[-1])
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.standard_normal((batch_size,) + input_shape, dtype=np.float32))
  y = tf.constant(rng.integers(0, num_classes, size=(batch_size,)), dtype=tf.int32)
  layers = masks.prunable_layers(model)

  @tf.function
  def step(x, y):
    loss, _ = client.sgd_step(model, layers, x, y, learning_rate, clipping=gradient_clipping)
    return loss

  for _ in range(2):
    step(x, y).numpy()
  peaks: List[int] = []
  seconds: List[float] = []
  resident = 0
  for _ in range(steps):
    gc.collect()
    tf.config.experimental.reset_memory_stats(device)
    resident = tf.config.experimental.get_memory_info(device)['current']
    start = time.perf_counter()
    step(x, y).numpy()
    seconds.append(time.perf_counter() - start)
    peaks.append(tf.config.experimental.get_memory_info(device)['peak'] - resident)
  return {
    'peak_bytes': float(statistics.median(peaks)),
    'peak_bytes_min': float(min(peaks)),
    'peak_bytes_max': float(max(peaks)),
    'resident_bytes': float(resident),
    'step_seconds': float(statistics.median(seconds)),
    'step_seconds_min': float(min(seconds)),
    'batch_size': int(batch_size),
  }


# ---------------------------------------------------------------------------------------------
# Analytic
# ---------------------------------------------------------------------------------------------


def _elements(shape, batch_size: int) -> int:
  dims = list(shape)
  if dims and dims[0] is None:
    dims[0] = batch_size
  if any(d is None for d in dims):
    raise ValueError(f'cannot size a tensor of shape {shape}: unknown non-batch dimension')
  return int(math.prod(dims))


def _nodes_in_order(model: tf.keras.Model):
  """(layer, input KerasTensors, output KerasTensors) of a functional model, forward order."""
  if not hasattr(model, '_nodes_by_depth'):
    raise ValueError('analytic_footprint needs a functional (or Sequential) Keras model')
  rows = []
  for depth in sorted(model._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
    for node in model._nodes_by_depth[depth]:  # pylint: disable=protected-access
      rows.append((node.layer, tf.nest.flatten(node.keras_inputs), tf.nest.flatten(node.outputs)))
  return rows


def _layer_kind(layer) -> str:
  if isinstance(layer, sparse_layers.MaskedLayer):
    return 'masked'
  if isinstance(layer, sap.BitReLU):
    return 'bit_relu'
  if isinstance(layer, tf.keras.layers.InputLayer):
    return 'input'
  if isinstance(layer, tf.keras.layers.BatchNormalization):
    return 'batch_norm'
  if isinstance(layer, tf.keras.layers.ReLU):
    return 'relu'
  if isinstance(layer, tf.keras.layers.Activation):
    name = getattr(layer.activation, '__name__', '')
    return 'relu' if name in ('relu', 'relu6', 'sigmoid', 'tanh') else 'other'
  if isinstance(layer, (tf.keras.layers.MaxPooling2D, tf.keras.layers.MaxPooling1D)):
    return 'max_pool'
  if isinstance(layer, tf.keras.layers.Dropout):
    return 'dropout'
  if isinstance(
    layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense, tf.keras.layers.DepthwiseConv2D)
  ):
    return 'plain_weight'
  if layer.weights:
    return 'other_weight'
  # Add, global pooling, reshape, flatten, the lean ResidualAdd / GlobalAvgPool: shapes only.
  return 'shape_only'


def analytic_footprint(
  model: tf.keras.Model, batch_size: int, gamma: Optional[float] = None
) -> Dict[str, object]:
  """Predicted training-step memory of a functional Keras model, layer by layer.

  See the module docstring for what is counted. The model is walked in forward order; a
  float tensor cached by several consumers (a ReLU output that is also the next convolutions'
  input) is counted once; the model input is resident, so caching it costs nothing.

  Peak model, in bytes: with ``C_j`` the activation cache of layer j, ``K_j`` its kernel-sized
  cache (the effective kernel its op keeps for the input gradient) and ``G_j`` its dense
  parameter gradients,

  - forward at layer l: ``sum_{j<l} C_j + sum_all K_j + 4 n_in + max(4 n_out, S_l)``: every
    effective kernel is computed at the start (it depends on variables only); ``S_l`` is
    the SAP selection's working set, ``max(4 n_in, n_in + 12 k)`` (one int32 pattern
    tensor, or the bool mask with the int64 indices and the gathered values);
  - backward at layer l: ``sum_{j<=l} (C_j + K_j) + sum_{j>l} G_j + 4 n_out
    + max(4 n_in, R_l) + W_l``: the upstream gradient and either the input gradient or, for
    a SAP layer, the rebuilt ``x_pruned`` with its int64 indices (``R_l = 4 n_in + 8 k``,
    freed before the input gradient is made), plus the kernel-side working set ``W_l``
    (filter gradient and one working copy, ``2 * 4 |W|``);
  - ``peak_bytes`` is the largest of these.

  Args:
      model: a built functional Keras model (for example from ``models.build_model``).
      batch_size: B, the batch of the training step.
      gamma: if given, the SAP drop ratio assumed for every masked layer (a what-if); None
          uses each layer's own ``sap_gamma``.

  Returns:
      A dict (bytes unless named otherwise):
      ``layers``: a list of per-layer dicts with ``name``, ``kind``, ``input_elements``,
      ``output_elements``, ``sap_gamma``, ``cached_bytes``, ``kernel_cache_bytes``,
      ``gradient_bytes``, ``weight_bytes``, ``forward_live_bytes``,
      ``backward_live_bytes``;
      totals ``weight_bytes`` (nonzeros + dense parameters + BN statistics + 1-bit mask),
      ``weight_bytes_as_implemented`` (all variables of the Keras model), ``cached_bytes``,
      ``kernel_cache_bytes``, ``gradient_bytes``, ``peak_bytes``, ``peak_layer`` (name and
      phase of the predicted peak), ``total_bytes`` (``weight_bytes + peak_bytes``),
      ``batch_size`` and ``gamma``.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if gamma is not None and not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma must be in [0, 1], got {gamma}')
  cached_floats = set()  # ids of KerasTensors whose float value is already counted as cached
  relu_outputs = set()  # ids of KerasTensors produced by a ReLU-family layer
  rows = []
  weight_bytes = 0
  for layer, inputs, outputs in _nodes_in_order(model):
    kind = _layer_kind(layer)
    if kind == 'input':
      for t in outputs:
        cached_floats.add(id(t))  # the batch is resident before the step
      continue
    n_in = sum(_elements(t.shape, batch_size) for t in inputs)
    n_out = sum(_elements(t.shape, batch_size) for t in outputs)
    row = {
      'name': layer.name,
      'kind': kind,
      'input_elements': n_in,
      'output_elements': n_out,
      'sap_gamma': 0.0,
      'cached_bytes': 0,
      'kernel_cache_bytes': 0,
      'gradient_bytes': 0,
      'weight_bytes': 0,
      'sap_forward': 0,
      'sap_backward': 0,
      'kernel_backward': 0,
    }

    def cache_float(tensors):
      size = 0
      for t in tensors:
        if id(t) not in cached_floats:
          cached_floats.add(id(t))
          size += _F32 * _elements(t.shape, batch_size)
      return size

    if kind == 'masked':
      g = float(layer.sap_gamma if gamma is None else gamma)
      row['sap_gamma'] = g
      kernel_size = int(np.prod(layer.kernel.shape))
      if g > 0.0:
        k = sap.keep_count(n_in, g)
        if all(id(t) in relu_outputs for t in inputs):
          # SAP never keeps zeros; a ReLU of centred pre-activations (NSConv keeps
          # them centred) is zero on about half of its entries.
          k = min(k, math.ceil(n_in / 2))
        row['cached_bytes'] = _F32 * k + math.ceil(n_in / 8)
        # Selection: one int32 pattern tensor, then the bool mask with the int64
        # indices and the values. Backward: x_pruned and the int64 indices.
        row['sap_forward'] = max(_F32 * n_in, n_in + 12 * k)
        row['sap_backward'] = _F32 * n_in + 8 * k
      else:
        row['cached_bytes'] = cache_float(inputs)
      # The effective kernel (kernel * mask, or the NSConv W_hat) that the op keeps for
      # its input gradient. The NSConv standardisation itself keeps nothing kernel-sized
      # (nsconv.masked_standardized_kernel recomputes its statistics backward).
      row['kernel_cache_bytes'] = _F32 * kernel_size
      # Backward working set on the kernel side: the filter gradient and one working
      # copy (the masked product; NSConv's recomputation runs through forwarded buffers,
      # and measures like the plain case).
      row['kernel_backward'] = 2 * _F32 * kernel_size
      nnz = int(np.count_nonzero(layer.mask.numpy()))
      dense = sum(int(np.prod(v.shape)) for v in layer.trainable_weights if v is not layer.kernel)
      row['weight_bytes'] = _F32 * (nnz + dense) + math.ceil(kernel_size / 8)
    elif kind == 'batch_norm':
      row['cached_bytes'] = cache_float(inputs)
      row['weight_bytes'] = _F32 * sum(int(np.prod(v.shape)) for v in layer.weights)
    elif kind == 'relu':
      row['cached_bytes'] = cache_float(outputs)
      relu_outputs.update(id(t) for t in outputs)
    elif kind == 'bit_relu':
      row['cached_bytes'] = math.ceil(n_out / 8)
      relu_outputs.update(id(t) for t in outputs)
    elif kind == 'max_pool':
      row['cached_bytes'] = cache_float(inputs) + cache_float(outputs)
    elif kind == 'dropout':
      row['cached_bytes'] = _F32 * n_out
    elif kind in ('plain_weight', 'other_weight'):
      row['cached_bytes'] = cache_float(inputs)
      row['weight_bytes'] = _F32 * sum(int(np.prod(v.shape)) for v in layer.weights)
    row['gradient_bytes'] = _F32 * sum(int(np.prod(v.shape)) for v in layer.trainable_weights)
    weight_bytes += row['weight_bytes']
    rows.append(row)

  # Live-set model of the step (see docstring).
  grads_after = [0] * (len(rows) + 1)
  for i in range(len(rows) - 1, -1, -1):
    grads_after[i] = grads_after[i + 1] + rows[i]['gradient_bytes']
  peak, peak_at = 0, ''
  # Every effective kernel depends on variables only, so the executor computes them all at
  # the start of the forward pass; they stay alive until their layer's backward.
  kernels = sum(r['kernel_cache_bytes'] for r in rows)
  held = 0  # activation caches of the layers before the current one
  for i, row in enumerate(rows):
    x_in, y_out = _F32 * row['input_elements'], _F32 * row['output_elements']
    # Forward: the input, and either the output or the SAP selection (which runs first).
    row['forward_live_bytes'] = held + kernels + x_in + max(y_out, row['sap_forward'])
    held += row['cached_bytes']
    kernels_held = sum(r['kernel_cache_bytes'] for r in rows[: i + 1])
    # Backward: dy, and either dx or the rebuilt x_pruned (a SAP layer frees it first),
    # plus the kernel-side working set; the gradients of later layers are held.
    row['backward_live_bytes'] = (
      held
      + kernels_held
      + grads_after[i + 1]
      + y_out
      + max(x_in, row['sap_backward'])
      + row['kernel_backward']
    )
    for phase in ('forward', 'backward'):
      if row[f'{phase}_live_bytes'] > peak:
        peak, peak_at = row[f'{phase}_live_bytes'], f'{row["name"]} ({phase})'
  for row in rows:
    del row['sap_forward'], row['sap_backward'], row['kernel_backward']
  return {
    'layers': rows,
    'weight_bytes': weight_bytes,
    'weight_bytes_as_implemented': _F32 * sum(int(np.prod(v.shape)) for v in model.weights),
    'cached_bytes': sum(r['cached_bytes'] for r in rows),
    'kernel_cache_bytes': sum(r['kernel_cache_bytes'] for r in rows),
    'gradient_bytes': sum(r['gradient_bytes'] for r in rows),
    'peak_bytes': peak,
    'peak_layer': peak_at,
    'total_bytes': weight_bytes + peak,
    'batch_size': int(batch_size),
    'gamma': gamma,
  }
