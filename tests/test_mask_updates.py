"""Tests of fedmef_tf.mask_updates: hand-checkable cases and mask properties."""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import bae
from fedmef_tf import mask_updates


def _random_layer(shape, density, seed):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  nnz = int(round(density * n))
  mask = np.zeros(n, np.float32)
  mask[rng.choice(n, nnz, replace=False)] = 1.0
  mask = mask.reshape(shape)
  kernel = rng.normal(size=shape).astype(np.float32) * mask
  return kernel, mask


def test_server_adjust_hand_case():
  broadcast = np.array([0.9, 0.05, 0.0, -0.2, 0.0, 0.0], np.float32)
  mask = np.array([1, 1, 0, 1, 0, 0], np.float32)
  aggregated = np.array([0.8, 0.01, 0.0, -0.25, 0.0, 0.0], np.float32)
  grad = np.array([0.0, 0.0, 0.3, 0.0, -0.7, 0.1], np.float32)
  kernel, new_mask, pruned, grown = mask_updates.server_adjust_layer(
    broadcast, mask, aggregated, grad, 2
  )
  np.testing.assert_array_equal(pruned.numpy(), [0, 1, 0, 1, 0, 0])  # |0.05|, |-0.2|
  np.testing.assert_array_equal(grown.numpy(), [0, 0, 1, 0, 1, 0])  # |-0.7|, |0.3|
  np.testing.assert_array_equal(new_mask.numpy(), [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(kernel.numpy(), np.float32([0.8, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize(
  'shape,density,k,seed',
  [((3, 3, 4, 8), 0.2, 10, 0), ((64, 10), 0.5, 40, 1), ((5, 5, 1, 7), 0.1, 3, 2)],
)
def test_server_adjust_properties(shape, density, k, seed):
  kernel, mask = _random_layer(shape, density, seed)
  rng = np.random.default_rng(seed + 10)
  aggregated = (kernel + 0.01 * rng.normal(size=shape).astype(np.float32)) * mask
  grad = rng.normal(size=shape).astype(np.float32)
  new_kernel, new_mask, pruned, grown = [
    x.numpy() for x in mask_updates.server_adjust_layer(kernel, mask, aggregated, grad, k)
  ]
  # Pruned set is exactly the marked set.
  np.testing.assert_array_equal(pruned, bae.marked_set(kernel, mask, k).numpy())
  assert pruned.sum() == k and grown.sum() == k
  # nnz unchanged, so the density is exact.
  assert new_mask.sum() == mask.sum()
  # Grown among previously inactive only, disjoint from pruned, and zero.
  assert np.all(mask[grown > 0] == 0)
  assert not np.any((grown > 0) & (pruned > 0))
  assert np.all(new_kernel[grown > 0] == 0)
  # Masked weights zero, and the survivors keep their aggregated values.
  assert np.all(new_kernel[new_mask == 0] == 0)
  kept = (mask > 0) & (pruned == 0)
  np.testing.assert_array_equal(new_kernel[kept], aggregated[kept])
  # Grown are the top-k of |g| among old inactive.
  scores = np.where(mask == 0, np.abs(grad), -np.inf).ravel()
  assert set(np.flatnonzero(grown.ravel())) == set(np.argsort(-scores, kind='stable')[:k])
  # Deterministic, dtype kept.
  again = mask_updates.server_adjust_layer(kernel, mask, aggregated, grad, k)
  np.testing.assert_array_equal(again[1].numpy(), new_mask)
  assert new_kernel.dtype == np.float32 and new_mask.dtype == np.float32


def test_adjust_inside_tf_function_with_tensor_k():
  kernel, mask = _random_layer((4, 6), 0.5, 3)
  grad = np.arange(24, dtype=np.float32).reshape(4, 6)

  @tf.function
  def run(k):
    return mask_updates.server_adjust_layer(kernel, mask, kernel, grad, k)

  out = run(tf.constant(3))
  assert out[1].numpy().sum() == mask.sum()
  assert out[3].numpy().sum() == 3


def test_client_prune_and_regrow():
  kernel = np.array([0.4, -0.01, 0.0, 0.3, 0.0], np.float32)
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  grad = np.array([9.0, 0.0, 0.2, 0.0, -0.5], np.float32)
  new_kernel, new_mask = mask_updates.client_prune_and_regrow(kernel, mask, grad, 1)
  np.testing.assert_array_equal(new_mask.numpy(), [1, 0, 0, 1, 1])
  np.testing.assert_array_equal(new_kernel.numpy(), np.float32([0.4, 0, 0, 0.3, 0]))


def test_feddst_aggregate_hand_case():
  # Two clients, n = 1 and 3. Client A holds positions 0, 1; client B holds 0, 2.
  theta_a = np.array([1.0, 0.5, 0.0, 0.0], np.float32)
  theta_b = np.array([3.0, 0.0, -0.1, 0.0], np.float32)
  m_a = np.array([1, 1, 0, 0], np.float32)
  m_b = np.array([1, 0, 1, 0], np.float32)
  weighted_kernel = 1 * m_a * theta_a + 3 * m_b * theta_b
  weighted_mask = 1 * m_a + 3 * m_b
  kernel, mask = mask_updates.feddst_aggregate_layer(weighted_kernel, weighted_mask, 2)
  # Per-coordinate averages: 0 -> (1 + 9) / 4 = 2.5; 1 -> 0.5; 2 -> -0.1; union {0, 1, 2}.
  # Prune back to 2 by magnitude: keep 0 and 1.
  np.testing.assert_array_equal(mask.numpy(), [1, 1, 0, 0])
  np.testing.assert_allclose(kernel.numpy(), [2.5, 0.5, 0, 0])


def test_magnitude_mask_ties_and_eligibility():
  kernel = np.array([0.2, -0.2, 0.5, 0.9], np.float32)
  eligible = np.array([1, 1, 1, 0], np.float32)
  np.testing.assert_array_equal(
    mask_updates.magnitude_mask(kernel, eligible, 2).numpy(), [1, 0, 1, 0]
  )


def test_tfmot_target_sparsity_follows_polynomial_decay():
  # s(t) = s_f + (0 - s_f) * (1 - t / end) ** 3, pruning every `frequency` rounds.
  for t in [0, 5, 10, 20, 25]:
    should, s = mask_updates.tfmot_target_sparsity(t, final_sparsity=0.9, end_round=20, frequency=5)
    expected = 0.9 - 0.9 * (1 - min(t, 20) / 20) ** 3
    np.testing.assert_allclose(float(s), expected, rtol=1e-6, atol=1e-7)
    assert bool(should) is (t % 5 == 0 and t <= 20)


def test_uniform_nnz():
  np.testing.assert_array_equal(mask_updates.uniform_nnz([100, 10, 3], 0.9).numpy(), [10, 1, 1])
