"""Tests of fedmef_tf.growth: the growth score (unmasked gradients through the layers' probe)
against autodiff of hand-written ops, and the clients' top-k inactive pairs by hand."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import growth
from fedmef_tf import masks
from fedmef_tf import sparse_layers as sl

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(normalize=False, sap_gamma=0.0, num_classes=5):
  """Conv -> ReLU -> depthwise (x2) -> ReLU -> GAP -> dense, all masked."""
  inp = tf.keras.Input((8, 8, 3))
  h = sl.MaskedConv2D(6, 3, padding='same', normalize=normalize, sap_gamma=sap_gamma, name='conv')(
    inp
  )
  h = tf.keras.layers.ReLU()(h)
  h = sl.MaskedDepthwiseConv2D(
    3,
    strides=2,
    padding='same',
    depth_multiplier=2,
    normalize=normalize,
    sap_gamma=sap_gamma,
    name='dw',
  )(h)
  h = tf.keras.layers.ReLU()(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  out = sl.MaskedDense(num_classes, sap_gamma=sap_gamma, normalize=normalize, name='head')(h)
  return tf.keras.Model(inp, out)


def _data(n=16, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, size=(n,)).astype(np.int32)
  return tf.constant(x), tf.constant(y)


def _reference_grads(model, x, y, normalize):
  """dL/dW of the kernels the ops use, by autodiff through hand-written ops (no probe)."""
  conv, dw, head = masks.prunable_layers(model)

  def std(w, axes, gain):
    w = w.numpy()
    centred = w - w.mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(np.maximum((centred**2).sum(axis=axes, keepdims=True), 1e-4))
    g = gain.numpy().reshape(
      [1] * (w.ndim - 2) + list(w.shape[-2:])
      if axes == (0, 1)
      else [1] * (w.ndim - 1) + [w.shape[-1]]
    )
    return tf.constant(centred * g * inv), tf.constant(g * inv)

  ws, scales = [], []
  for layer, axes in ((conv, (0, 1, 2)), (dw, (0, 1)), (head, (0,))):
    w = layer.kernel * layer.mask
    if normalize:
      w, s = std(w, axes, layer.gain)
      w = w * layer.mask
    else:
      s = tf.ones(())
    ws.append(tf.convert_to_tensor(w))
    scales.append(s)
  with tf.GradientTape() as tape:
    tape.watch(ws)
    h = tf.nn.relu(tf.nn.conv2d(x, ws[0], 1, 'SAME') + conv.bias)
    h = tf.nn.relu(tf.nn.depthwise_conv2d(h, ws[1], [1, 2, 2, 1], 'SAME') + dw.bias)
    h = tf.reduce_mean(h, axis=[1, 2])
    logits = tf.matmul(h, ws[2]) + head.bias
    loss = LOSS(y, logits)
  return [g * s for g, s in zip(tape.gradient(loss, ws), scales)]


@pytest.mark.parametrize('normalize', [False, True])
def test_dense_kernel_gradients_match_autodiff_reference(normalize):
  model = _model(normalize=normalize, sap_gamma=0.6)
  masks.init_sparse(model, 0.3, seed=5)
  for layer in masks.prunable_layers(model):
    layer.bias.assign(tf.random.normal(layer.bias.shape, stddev=0.1))
    if normalize:
      layer.gain.assign(tf.random.uniform(layer.gain.shape, 0.5, 1.5))
  x, y = _data()
  got = growth.dense_kernel_gradients(model, x, y, LOSS)
  ref = _reference_grads(model, x, y, normalize)
  for layer, g, r in zip(masks.prunable_layers(model), got, ref):
    g = g.numpy()
    assert g.shape == tuple(layer.kernel.shape)
    off = layer.mask.numpy() == 0
    assert np.count_nonzero(g[off]) > 0.5 * off.sum(), 'growth scores at inactive entries'
    np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-6)
  # The probe is gone afterwards: the forward pass is unchanged and gradients are masked.
  assert all(layer.probe is None for layer in masks.prunable_layers(model))
  compiled = tf.function(lambda a, b: growth.dense_kernel_gradients(model, a, b, LOSS))
  for g, r in zip(compiled(x, y), ref):
    np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-6)


def test_dense_kernel_gradients_ignores_bae_and_changes_nothing():
  model = _model()
  masks.init_sparse(model, 0.3, seed=6)
  x, y = _data()
  before = [v.numpy().copy() for v in model.weights]
  g0 = growth.dense_kernel_gradients(model, x, y, LOSS)
  sl.set_bae(model, [layer.mask.numpy() for layer in masks.prunable_layers(model)], 1.0)
  g1 = growth.dense_kernel_gradients(model, x, y, LOSS)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
  sl.clear_bae(model)
  for v, b in zip(model.weights, before):
    np.testing.assert_array_equal(v.numpy(), b)


def test_top_k_inactive_hand_case():
  grad = np.array([[0.5, -3.0, -2.0], [1.0, 9.0, 2.0]], np.float32)
  mask = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
  # Inactive: flat 1 (|-3|), 2 (|-2|), 3 (1), 5 (2): top 3 = 1, then tie 2 vs 5 -> 2, 5.
  indices, values = growth.top_k_inactive(grad, mask, 3)
  np.testing.assert_array_equal(indices.numpy(), [1, 2, 5])
  np.testing.assert_array_equal(values.numpy(), [-3.0, -2.0, 2.0])
  dense = growth.scatter_pairs(indices, values, grad.shape).numpy()
  np.testing.assert_array_equal(dense, [[0, -3, -2], [0, 0, 2]])
  # k beyond the inactive count is clipped.
  indices, _ = growth.top_k_inactive(grad, mask, 10)
  assert indices.shape[0] == 4
