"""Mask updates of FedMef and of its dynamic-pruning baselines, on plain tensors.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). In an adjustment round the server prunes, per prunable layer, the
k_l active weights of smallest magnitude (the *marked set*, `fedmef_tf.bae.marked_set`, which
clients already pushed towards zero with budget-aware extrusion) and grows the k_l positions with
the largest aggregated gradient magnitude among those that were inactive before the adjustment
(RigL's drop/grow step, Evci et al. 2020, done on the server as in FedTiny); the gradients are
the clients' top-k pairs of `fedmef_tf.growth`. This module also holds the aggregation of FedDST
(Bibikar et al., AAAI 2022) and the server-side magnitude pruning used by the tfmot-style
baseline, whose target sparsity comes from tensorflow-model-optimization's `PolynomialDecay`.

Conventions:

- Every function works on one layer: `kernel`, `mask`, `grad` are tensors of the same shape
  (any rank), masks are float32 0/1. Counts `k` are int scalars (Python or tensor).
- Ties are broken by flat (row-major) index, lower index first: every selection below is
  `fedmef_tf.ranking.select_top`, a `top_k` on a score.
- Selections never pick more positions than are eligible: `k` is clipped to the eligible count.
- Nothing here knows about TFF; everything runs eagerly or inside a `tf.function`.
"""

import tensorflow as tf
from tensorflow_model_optimization.sparsity import keras as tfmot_sparsity

from fedmef_tf import bae
from fedmef_tf import ranking


def prune_and_grow(kernel, mask, prune, grow_score, k):
  """One drop/grow step of a layer: prune a given set, grow by score among old inactives.

  Grown positions are the k largest `grow_score` entries (|aggregated gradient| on the server)
  among positions inactive *before* this step, so the just-pruned ones cannot be regrown;
  k is clipped to the number of those positions. Grown weights start at exactly zero. When
  `prune` has as many ones as are grown (the usual case: k_l <= nnz_l and k_l <= inactive),
  nnz is unchanged.

  Args:
    kernel: float tensor, the aggregated weights.
    mask: float32 0/1 tensor, the mask before the step.
    prune: float32 0/1 tensor, subset of `mask`: the positions to prune (the marked set).
    grow_score: float tensor, same shape; larger means grow first (e.g. |g|).
    k: int scalar, number of positions to grow.

  Returns:
    (new_kernel, new_mask, grown): the kernel with pruned and grown entries zero (and the
    inactive ones zero), the new 0/1 mask, and the 0/1 tensor of grown positions.
  """
  grown = ranking.select_top(grow_score, mask <= 0, k)
  kept = mask * (1.0 - prune)
  new_mask = kept + grown
  new_kernel = kernel * tf.cast(kept, kernel.dtype)
  return new_kernel, new_mask, grown


def server_adjust_layer(broadcast_kernel, mask, aggregated_kernel, aggregated_grad, k):
  """FedMef's (and the RigL baseline's) server adjustment of one layer.

  Prunes exactly the marked set, derived from the weights broadcast this round (the ones the
  clients derived it from), and grows the top-k positions by |aggregated gradient| among those
  inactive before the adjustment; grown weights are zero.

  Args:
    broadcast_kernel: float tensor, the global weights sent to the clients this round.
    mask: float32 0/1 tensor, the mask broadcast this round.
    aggregated_kernel: float tensor, `sum_k n_k theta_k / sum_k n_k`.
    aggregated_grad: float tensor, `sum_k n_k g_k / sum_k n_k` (zero where nobody sent).
    k: int scalar, k_l.

  Returns:
    (new_kernel, new_mask, pruned, grown): `pruned` is the marked set, `grown` the new positions.
  """
  pruned = bae.marked_set(broadcast_kernel, mask, k)
  new_kernel, new_mask, grown = prune_and_grow(
    aggregated_kernel, mask, pruned, tf.abs(aggregated_grad), k
  )
  return new_kernel, new_mask, pruned, grown


def client_prune_and_regrow(kernel, mask, grad, k):
  """FedDST's local mask readjustment of one layer on a client.

  Magnitude prune of the k smallest active weights, then growth of the k inactive positions
  (before the step) of largest |grad| (the client's own gradient), grown weights zero.

  Args:
    kernel: float tensor, the client's current weights.
    mask: float32 0/1 tensor, the client's current mask.
    grad: float tensor, the client's unmasked gradient on one mini-batch.
    k: int scalar.

  Returns:
    (new_kernel, new_mask).
  """
  prune = bae.marked_set(kernel, mask, k)
  new_kernel, new_mask, _ = prune_and_grow(kernel, mask, prune, tf.abs(grad), k)
  return new_kernel, new_mask


def magnitude_mask(kernel, eligible_mask, nnz):
  """0/1 mask of the `nnz` largest |kernel| entries among `eligible_mask`, ties by flat index.

  Args:
    kernel: float tensor.
    eligible_mask: float32 0/1 tensor (e.g. the current mask, or the union of client masks).
    nnz: int scalar, entries to keep (clipped to the eligible count).

  Returns:
    A float32 0/1 tensor of the kernel's shape.
  """
  return ranking.select_top(tf.abs(kernel), eligible_mask > 0, nnz)


def feddst_aggregate_layer(weighted_kernel_sum, weighted_mask_sum, target_nnz):
  """FedDST's server aggregation of one layer.

  Each coordinate is averaged over the clients whose mask holds it,
  `theta = sum_k n_k m_k theta_k / sum_k n_k m_k`; the new mask is the union of the client masks
  (coordinates with positive weight), magnitude-pruned back to `target_nnz` entries.

  Args:
    weighted_kernel_sum: `sum_k n_k * m_k * theta_k` (float tensor).
    weighted_mask_sum: `sum_k n_k * m_k` (float tensor, same shape).
    target_nnz: int scalar, the layer's nnz budget.

  Returns:
    (kernel, mask): the aggregated kernel with masked entries zero and the new 0/1 mask.
  """
  held = weighted_mask_sum > 0
  safe = tf.where(held, weighted_mask_sum, tf.ones_like(weighted_mask_sum))
  kernel = tf.where(held, weighted_kernel_sum / safe, tf.zeros_like(weighted_kernel_sum))
  mask = magnitude_mask(kernel, tf.cast(held, tf.float32), target_nnz)
  return kernel * mask, mask


def tfmot_target_sparsity(t, *, final_sparsity, end_round, frequency):
  """Target sparsity of round t from tfmot's `PolynomialDecay` (power 3, from sparsity 0).

  Rounds play the role of tfmot's training steps: pruning starts at round 0 (dense model),
  happens every `frequency` rounds up to `end_round`, where the final sparsity is reached.

  Args:
    t: round number (int or int tensor).
    final_sparsity: target sparsity 1 - d, in [0, 1).
    end_round: last pruning round (positive int).
    frequency: rounds between pruning steps (positive int).

  Returns:
    (should_prune, sparsity): bool and float32 scalar tensors.
  """
  schedule = tfmot_sparsity.PolynomialDecay(
    initial_sparsity=0.0,
    final_sparsity=float(final_sparsity),
    begin_step=0,
    end_step=int(end_round),
    frequency=int(frequency),
  )
  should_prune, sparsity = schedule(tf.cast(t, tf.int64))
  return tf.convert_to_tensor(should_prune), tf.cast(sparsity, tf.float32)


def uniform_nnz(sizes, sparsity):
  """Per-layer nnz for a uniform per-layer sparsity, `round((1 - s) * n_l)`, at least 1.

  This is how tfmot's `prune_low_magnitude` distributes sparsity (the same share per layer).

  Args:
    sizes: int vector [L] of layer sizes.
    sparsity: float scalar in [0, 1).

  Returns:
    An int32 vector [L].
  """
  sizes64 = tf.cast(sizes, tf.float64)
  nnz = tf.round((1.0 - tf.cast(sparsity, tf.float64)) * sizes64)
  return tf.cast(tf.clip_by_value(nnz, 1.0, sizes64), tf.int32)
