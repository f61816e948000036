"""Specification tests of fedmef_tf.nsconv against a per-channel NumPy computation."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import nsconv
from fedmef_tf import sparse_layers as sl


def _hand(w, m, g, depthwise):
  """W_hat[o] = g[o] (W[o] - mean) / sqrt(max(N var, 1e-4)) M[o], one channel at a time."""
  w = w * m
  out = np.zeros_like(w, dtype=np.float64)
  if w.ndim == 2:  # dense (d_in, d_out)
    for o in range(w.shape[1]):
      col = w[:, o].astype(np.float64)
      n = col.size
      out[:, o] = g[o] * (col - col.mean()) / np.sqrt(max(n * col.var(), 1e-4)) * m[:, o]
    return out
  kh, kw, cin, cout = w.shape
  if depthwise:
    for c in range(cin):
      for q in range(cout):
        f = w[:, :, c, q].astype(np.float64)
        n = kh * kw
        out[:, :, c, q] = (
          g[c * cout + q] * (f - f.mean()) / np.sqrt(max(n * f.var(), 1e-4)) * m[:, :, c, q]
        )
    return out
  for o in range(cout):
    f = w[:, :, :, o].astype(np.float64)
    n = kh * kw * cin
    out[:, :, :, o] = g[o] * (f - f.mean()) / np.sqrt(max(n * f.var(), 1e-4)) * m[:, :, :, o]
  return out


def _case(shape, n_gain, seed, density=0.4):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  m = (rng.random(shape) < density).astype(np.float32)
  g = rng.uniform(0.5, 2.0, size=n_gain).astype(np.float32)
  return w, m, g


@pytest.mark.parametrize(
  'shape,depthwise,n_gain',
  [
    ((3, 3, 4, 5), False, 5),
    ((1, 1, 7, 3), False, 3),
    ((3, 3, 4, 1), True, 4),
    ((3, 3, 3, 2), True, 6),
    ((6, 4), False, 4),
  ],
)
def test_standardize_matches_hand_computation(shape, depthwise, n_gain):
  w, m, g = _case(shape, n_gain, seed=sum(shape))
  got = nsconv.standardize_kernel(w * m, m, g, depthwise).numpy()
  want = _hand(w, m, g, depthwise)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[m == 0] == 0.0)  # the mask is applied again


def test_statistics_include_pruned_zeros():
  # One channel, fan-in 4, two active entries: mean over all 4 entries (pruned zeros count).
  w = np.array([[2.0], [4.0], [0.0], [0.0]], np.float32)
  m = np.array([[1.0], [1.0], [0.0], [0.0]], np.float32)
  got = nsconv.standardize_kernel(w, m, np.ones(1, np.float32)).numpy()
  mean = 1.5
  ss = 0.5**2 + 2.5**2 + 1.5**2 + 1.5**2  # = N * var = 11
  np.testing.assert_allclose(got[:, 0], [0.5 / np.sqrt(ss), 2.5 / np.sqrt(ss), 0, 0], rtol=1e-6)
  assert mean == w.mean()


def test_dense_channel_has_unit_norm_times_gain():
  w, _, g = _case((3, 3, 4, 6), 6, seed=1)
  m = np.ones_like(w)
  got = nsconv.standardize_kernel(w, m, g).numpy()
  np.testing.assert_allclose(got.sum(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.sqrt((got**2).sum(axis=(0, 1, 2))), g, rtol=1e-5)


def test_eps_floor_for_empty_channel():
  w, m, g = _case((3, 3, 2, 3), 3, seed=2)
  m[:, :, :, 1] = 0.0  # fully pruned channel: N var = 0 -> floored, no NaN
  got, scale = nsconv.standardize_kernel(w * m, m, g, return_scale=True)
  assert np.all(np.isfinite(got.numpy())) and np.all(got.numpy()[..., 1] == 0.0)
  np.testing.assert_allclose(scale.numpy()[0, 0, 0, 1], g[1] / np.sqrt(1e-4), rtol=1e-5)
  assert scale.shape == (1, 1, 1, 3)
  kernel = tf.constant(w * m)
  with tf.GradientTape() as tape:
    tape.watch(kernel)
    out = tf.reduce_sum(nsconv.standardize_kernel(kernel, m, g) ** 3)
  assert np.all(np.isfinite(tape.gradient(out, kernel).numpy()))


def test_reduction_axes():
  assert nsconv.reduction_axes(4, False) == (0, 1, 2)
  assert nsconv.reduction_axes(4, True) == (0, 1)
  assert nsconv.reduction_axes(2, False) == (0,)
  with pytest.raises(ValueError):
    nsconv.reduction_axes(2, True)


def test_nsconv_layers_use_the_standardised_kernel():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  conv = sl.MaskedConv2D(4, 3, padding='same', normalize=True, use_bias=False)
  conv.build(x.shape)
  w, m, g = _case(tuple(conv.kernel.shape), 4, seed=4)
  conv.kernel.assign(w)
  conv.set_mask(m)
  conv.gain.assign(g)
  want = tf.nn.conv2d(x, _hand(w, m, g, False).astype(np.float32), 1, 'SAME')
  np.testing.assert_allclose(conv(x), want, rtol=1e-4, atol=1e-5)

  dw = sl.MaskedDepthwiseConv2D(
    3, padding='valid', depth_multiplier=2, normalize=True, use_bias=False
  )
  dw.build(x.shape)
  w, m, g = _case(tuple(dw.kernel.shape), 6, seed=5)
  dw.kernel.assign(w)
  dw.set_mask(m)
  dw.gain.assign(g)
  want = tf.nn.depthwise_conv2d(x, _hand(w, m, g, True).astype(np.float32), [1, 1, 1, 1], 'VALID')
  np.testing.assert_allclose(dw(x), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw(x, training=True), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('depthwise', [False, True])
def test_uncentred_standardisation_only_scales_each_channel_to_the_gain(depthwise):
  rng = np.random.default_rng(4)
  shape = (3, 3, 4, 2)
  w = rng.normal(size=shape).astype(np.float32)
  m = (rng.random(shape) < 0.6).astype(np.float32)
  n_out = 8 if depthwise else 2
  g = rng.uniform(0.5, 2.0, size=n_out).astype(np.float32)
  got = nsconv.standardize_kernel(w * m, m, g, depthwise, center=False).numpy()
  axes = nsconv.reduction_axes(4, depthwise)
  wm = (w * m).astype(np.float64)
  norm = np.sqrt(np.sum(wm * wm, axis=axes, keepdims=True))
  want = wm / norm * np.reshape(g, nsconv.gain_shape(shape, depthwise))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[m == 0] == 0.0)


def test_center_spatial_value_and_gradient_match_the_plain_expression():
  rng = np.random.default_rng(5)
  y = tf.constant(rng.normal(size=(2, 5, 4, 3)).astype(np.float32) + 3.0)
  dy = tf.constant(rng.normal(size=(2, 5, 4, 3)).astype(np.float32))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(y)
    got = nsconv.center_spatial(y)
    want = y - tf.reduce_mean(y, axis=[1, 2], keepdims=True)
    got_loss = tf.reduce_sum(got * dy)
    want_loss = tf.reduce_sum(want * dy)
  np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
  np.testing.assert_allclose(tf.reduce_mean(got, axis=[1, 2]).numpy(), 0.0, atol=1e-6)
  np.testing.assert_allclose(
    tape.gradient(got_loss, y).numpy(), tape.gradient(want_loss, y).numpy(), atol=1e-6
  )


@pytest.mark.parametrize('center', [True, False])
@pytest.mark.parametrize(
  'shape,depthwise,n_gain',
  [
    ((3, 3, 4, 5), False, 5),
    ((3, 3, 3, 2), True, 6),
    ((7, 3), False, 3),
  ],
)
def test_fused_nsconv_kernel_matches_autodiff(shape, depthwise, n_gain, center):
  """The recomputing custom gradient equals autodiff of the plain formula (incl. BaE)."""
  rng = np.random.default_rng(sum(shape))
  mask = (rng.random(shape) < 0.5).astype(np.float32)
  mask.reshape(-1, shape[-1])[:, 0] = 0.0  # one fully pruned output column: eps floor
  kernel = tf.constant(rng.normal(size=shape).astype(np.float32) * mask)
  marked = tf.constant(mask * (rng.random(shape) < 0.4))
  gain = tf.constant(rng.uniform(0.5, 2.0, size=n_gain).astype(np.float32))
  upstream = tf.constant(rng.normal(size=shape).astype(np.float32))
  lam = 0.3
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([kernel, gain])
    fused = nsconv.masked_standardized_kernel(kernel, mask, marked, lam, gain, depthwise, center)
    plain = nsconv.standardize_kernel(
      sl.masked_kernel(kernel, mask, marked, lam), mask, gain, depthwise, center=center
    )
    fused_loss = tf.reduce_sum(fused * upstream)
    plain_loss = tf.reduce_sum(plain * upstream)
  np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-6, atol=1e-7)
  for a, b in zip(
    tape.gradient(fused_loss, [kernel, gain]), tape.gradient(plain_loss, [kernel, gain])
  ):
    assert np.any(b.numpy() != 0.0)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
