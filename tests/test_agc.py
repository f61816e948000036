"""Adaptive gradient clipping (fedmef_tf.agc) against a hand computation."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from fedmef_tf import agc  # pylint: disable=g-import-not-at-top
from fedmef_tf import client
from fedmef_tf import masks
from fedmef_tf import models


def test_clip_gradient_by_hand():
  # Dense kernel (2 inputs, 2 units): unit 0 has ||W|| = 5, ||G|| = 10 -> clipped to
  # lambda * 5 = 0.5 (factor 0.05); unit 1 has ||W|| = 1, ||G|| = 0.1 <= 0.1 * 1: unchanged.
  w = tf.constant([[3.0, 1.0], [4.0, 0.0]])
  g = tf.constant([[6.0, 0.1], [8.0, 0.0]])
  got = agc.clip_gradient(g, w, (0,), clipping=0.1).numpy()
  np.testing.assert_allclose(got, [[0.3, 0.1], [0.4, 0.0]], rtol=1e-6)
  # A zero vector (a bias at init): its norm is floored at eps, so its step is at most
  # lambda * eps.
  got = agc.clip_gradient(tf.constant([3.0, 4.0]), tf.zeros([2]), (), clipping=0.1, eps=1e-3)
  np.testing.assert_allclose(got.numpy(), [3e-4 * 0.2, 4e-4 * 0.2], rtol=1e-5)
  # None axes: not clipped.
  assert agc.clip_gradient(g, w, None) is g


def test_unit_axes_per_output_channel_and_the_output_layer_is_excluded():
  model = models.build_model('mobilenet_v2', 'fedmef', input_shape=(16, 16, 3))
  axes = dict(zip([v.name for v in model.trainable_weights], agc.unit_axes(model)))
  assert axes['stem_conv/kernel:0'] == (0, 1, 2)
  assert axes['block1_dw/kernel:0'] == (0, 1)  # depthwise: the spatial fan-in
  assert axes['stem_conv/gain:0'] == () and axes['stem_conv/bias:0'] == ()
  assert axes['classifier/kernel:0'] is None and axes['classifier/bias:0'] is None
  assert agc.clipping_for('fedmef') == agc.CLIPPING and agc.clipping_for('baseline') is None


def test_sgd_step_with_clipping_moves_no_unit_by_more_than_lr_times_lambda():
  model = models.build_model('cnn', 'fedmef', input_shape=(16, 16, 3), density=0.3, seed=1)
  layers = masks.prunable_layers(model)
  before = {v.name: v.numpy().copy() for v in model.trainable_weights}
  axes = dict(zip([v.name for v in model.trainable_weights], agc.unit_axes(model)))
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((8, 16, 16, 3)).astype(np.float32) * 5.0)
  y = tf.constant(rng.integers(0, 10, 8).astype(np.int32))
  lr = 1.0
  loss, _ = client.sgd_step(model, layers, x, y, lr, clipping=0.01)
  assert np.isfinite(float(loss))
  moved = 0
  for v in model.trainable_weights:
    a = axes[v.name]
    if a is None:
      continue
    w0 = before[v.name]
    step = v.numpy() - w0
    norm = lambda t: np.sqrt(np.sum(t * t, axis=a, keepdims=True)) if a else np.linalg.norm(t)
    bound = lr * 0.01 * np.maximum(norm(w0), agc.EPS)
    assert np.all(norm(step) <= bound * (1 + 1e-4)), v.name
    moved += int(np.any(step != 0))
  assert moved > 0
  for layer in layers:
    assert not np.any(layer.kernel.numpy()[layer.mask.numpy() == 0])


def test_clip_model_gradients_uses_the_masked_kernel():
  model = models.build_model('cnn', 'fedmef', input_shape=(8, 8, 3), density=0.3, seed=2)
  layer = masks.prunable_layers(model)[1]
  layer.kernel.assign(layer.kernel + 100.0 * (1.0 - layer.mask))  # junk under the mask
  grads = [tf.ones_like(v) * 1e3 for v in model.trainable_weights]
  clipped = agc.clip_model_gradients(model, grads, clipping=0.1)
  i = [v.ref() for v in model.trainable_weights].index(layer.kernel.ref())
  w = (layer.kernel * layer.mask).numpy()
  unit = np.sqrt(np.sum(w * w, axis=(0, 1, 2)))
  got = np.sqrt(np.sum(clipped[i].numpy() ** 2, axis=(0, 1, 2)))
  np.testing.assert_allclose(got, 0.1 * unit, rtol=1e-5)
  with pytest.raises(ValueError):
    agc.clip_gradients(grads[:1], model.trainable_weights, agc.unit_axes(model))
