"""Tests of fedmef_tf.bae: the marked set, the penalty gradient and the budget-aware learning
rate against hand-computed values (ALGORITHM.md, "One round t")."""

import math
import types

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import bae


@pytest.mark.parametrize(
  'tau,expected', [(0, 1.0), (5, 10.0 / 15.0), (9, 2.0 / 11.0), (10, 0.0), (12, 0.0)]
)
def test_rex_profile(tau, expected):
  np.testing.assert_allclose(float(bae.rex_profile(tau, 10)), expected, rtol=1e-6)


def test_rex_profile_empty_budget():
  assert float(bae.rex_profile(0, 0)) == 0.0


def test_bae_beta_hand_computed():
  # sigmoid(ln 3) = 0.75 -> 2 * 0.75 - 1 = 0.5; p(5; T_B = 10) = 2/3; eta_0 = 0.1.
  beta = bae.bae_beta(5, 10, math.log(3.0), 0.1)
  np.testing.assert_allclose(float(beta), 2.0 / 3.0 * 0.5 * 0.1, rtol=1e-6)
  # An empty marked set (norm 0) gives beta = 0.
  assert float(bae.bae_beta(0, 10, 0.0, 0.1)) == 0.0


def test_bae_learning_rate_is_max():
  # beta(0) with norm ln 3 is 0.05; eta_t 0.02 -> mu 0.05; eta_t 0.08 -> mu 0.08.
  np.testing.assert_allclose(
    float(bae.bae_learning_rate(0, 10, math.log(3.0), 0.02, 0.1)), 0.05, rtol=1e-6
  )
  np.testing.assert_allclose(
    float(bae.bae_learning_rate(0, 10, math.log(3.0), 0.08, 0.1)), 0.08, rtol=1e-6
  )
  # At the end of the budget mu falls back to eta_t.
  np.testing.assert_allclose(float(bae.bae_learning_rate(10, 10, 5.0, 0.02, 0.1)), 0.02, rtol=1e-6)


def test_marked_set_hand_case_with_ties():
  kernel = np.array([[0.5, -0.1, 0.0], [0.1, 2.0, -0.3]], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  # Active |w|: 0.5 (0), 0.1 (1), 0.1 (3), 2.0 (4), 0.3 (5); two smallest: flat 1 and 3 (tie
  # on 0.1, both taken); with k = 1 the lower index 1 wins the tie.
  np.testing.assert_array_equal(bae.marked_set(kernel, mask, 2).numpy(), [[0, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(bae.marked_set(kernel, mask, 1).numpy(), [[0, 1, 0], [0, 0, 0]])
  # The inactive zero at flat 2 is never marked, even though |w| = 0 is smallest.
  assert bae.marked_set(kernel, mask, 5).numpy()[0, 2] == 0
  # k beyond nnz is clipped to nnz.
  np.testing.assert_array_equal(bae.marked_set(kernel, mask, 99).numpy(), mask)


def test_penalty_gradient_is_two_lambda_w_on_the_marked_set():
  kernel = np.array([[0.5, -0.1, 0.0], [0.1, 2.0, -0.3]], np.float32)
  marked = np.array([[0, 1, 0], [1, 0, 1]], np.float32)
  got = bae.penalty_gradient(tf.constant(kernel), tf.constant(marked), 0.25).numpy()
  np.testing.assert_array_equal(got, np.float32(0.5) * kernel * marked)
  assert got.dtype == np.float32


def test_masked_layers_add_the_penalty_gradient_bitwise():
  from fedmef_tf import nsconv  # pylint: disable=import-outside-toplevel
  from fedmef_tf import sparse_layers  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(3)
  mask = (rng.random((3, 3, 2, 4)) < 0.6).astype(np.float32)
  kernel = tf.constant(rng.normal(size=mask.shape).astype(np.float32) * mask)
  marked = tf.constant(mask * (rng.random(mask.shape) < 0.5))
  lam = tf.constant(0.37)
  penalty = bae.penalty_gradient(kernel, marked, lam).numpy()
  zero = tf.zeros(mask.shape)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(kernel)
    plain = sparse_layers.masked_kernel(kernel, mask, marked, lam)
    std = nsconv.masked_standardized_kernel(kernel, mask, marked, lam, tf.ones([4]))
  # With no task gradient only BaE's term reaches the kernel.
  np.testing.assert_array_equal(tape.gradient(plain, kernel, zero).numpy(), penalty)
  np.testing.assert_array_equal(tape.gradient(std, kernel, zero).numpy(), penalty)
  assert np.count_nonzero(penalty) > 0


def test_low_magnitude_norm_hand_case_and_rate_bitwise():
  from fedmef_tf import masks  # pylint: disable=import-outside-toplevel
  from fedmef_tf import models  # pylint: disable=import-outside-toplevel

  # Layer 1 marks 3 (not -1), layer 2 marks 4: sqrt(9 + 16) = 5; nothing marked: 0.
  one = types.SimpleNamespace(kernel=tf.constant([[3.0, -1.0]]), marked=tf.constant([[1.0, 0.0]]))
  two = types.SimpleNamespace(kernel=tf.constant([4.0, 2.0]), marked=tf.constant([1.0, 0.0]))
  assert float(bae.low_magnitude_norm([one, two])) == 5.0
  none = types.SimpleNamespace(kernel=one.kernel, marked=tf.zeros_like(one.marked))
  assert float(bae.low_magnitude_norm([none])) == 0.0

  # On a model's layers, bitwise the norm and the rate of the formula written out.
  model = models.build_model('cnn', 'fedmef', input_shape=(8, 8, 3), density=0.3, seed=1)
  layers = masks.prunable_layers(model)
  for l, layer in enumerate(layers):
    layer.marked.assign(bae.marked_set(layer.kernel, layer.mask, 3 + l))
  low_sq = tf.add_n([tf.reduce_sum(tf.square(layer.kernel * layer.marked)) for layer in layers])
  want = tf.sqrt(low_sq)
  got = tf.function(lambda: bae.low_magnitude_norm(layers))()
  assert got.numpy().tobytes() == want.numpy().tobytes() and float(got) > 0
  rate = bae.bae_learning_rate(2, 10, got, 0.01, 0.1)
  assert rate.numpy().tobytes() == bae.bae_learning_rate(2, 10, want, 0.01, 0.1).numpy().tobytes()
