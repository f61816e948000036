"""Budget-aware extrusion (BaE) of FedMef (Huang et al., CVPR 2024, arXiv 2403.14737).

In an adjustment round the server will prune, per prunable layer, the k_l active weights of
smallest magnitude. BaE lets the clients move the information of those weights into the others
before they go:

- the *marked set* (`marked_set`): per layer the k_l active entries of smallest |theta|, derived
  by the server and by every client from the same broadcast weights, so that they agree on it
  and the server prunes exactly that set;
- the *penalty* `lambda * ||theta * marked||^2`, whose gradient `2 * lambda * theta * marked`
  (`penalty_gradient`) the masked layers add to their kernel gradient
  (`fedmef_tf.sparse_layers.masked_kernel`, `fedmef_tf.nsconv.masked_standardized_kernel`, and
  the in-backward updates of a TFLite `train` step), so that `fit`, custom loops and on-device
  training apply it without a change to the loss;
- the *budget-aware learning rate* of local step tau, `mu = max(eta_t, beta_tau)` with
  `beta_tau = p(tau) * (2 * sigmoid(||theta_low||_2) - 1) * eta_0` and the REX profile
  `p(tau) = (2 T_B - 2 tau) / (2 T_B - tau)` over the client's step budget T_B
  (`rex_profile`, `low_magnitude_norm`, `bae_beta`, `bae_learning_rate`; the budget is
  `fedmef_tf.schedules.local_step_budget`).

The client round that puts these together is `fedmef_tf.client.build_client_update`. Local
steps are counted from 0 (tau = 0 .. T_B - 1). The schedules accept Python numbers or scalar
tensors and return float32 scalar tensors.
"""

from typing import Any, Sequence

import tensorflow as tf

from fedmef_tf import ranking

__all__ = [
  'marked_set',
  'penalty_gradient',
  'rex_profile',
  'low_magnitude_norm',
  'bae_beta',
  'bae_learning_rate',
]


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def marked_set(kernel, mask, k):
  """The BaE marked set: the k active entries of smallest |kernel|, ties by flat index.

  Server and clients call this on the same broadcast weights, so they derive the same set, and
  the server prunes exactly this set.

  Args:
    kernel: float tensor, the layer's weights.
    mask: float32 0/1 tensor, same shape, the current sparsity mask.
    k: int scalar, k_l (clipped to the layer's active count).

  Returns:
    A float32 0/1 tensor of the kernel's shape, a subset of `mask` with min(k, nnz) ones.
  """
  return ranking.select_top(-tf.abs(kernel), mask > 0, k)


def penalty_gradient(kernel: tf.Tensor, marked: tf.Tensor, bae_lambda) -> tf.Tensor:
  """Gradient of the BaE penalty `bae_lambda * ||kernel * marked||^2` w.r.t. `kernel`.

  `(kernel * marked) * (2 * bae_lambda)`: the kernel-sized product is taken with the marked
  set first, so a caller that makes it wait for the layer's upstream gradient (a control or a
  data dependency on `kernel` or `marked`) keeps it out of the forward pass.

  Args:
    kernel: float tensor, the raw weights (or, on the active entries, the same values).
    marked: 0/1 tensor of the kernel's dtype and shape, the marked set.
    bae_lambda: scalar penalty weight lambda (>= 0).

  Returns:
    A tensor of the kernel's shape and dtype, zero outside the marked set.
  """
  return (kernel * marked) * (2.0 * tf.cast(bae_lambda, kernel.dtype))


def rex_profile(tau, budget):
  """REX profile `p(tau) = (2 * T_B - 2 * tau) / (2 * T_B - tau)`.

  p(0) = 1 and p(T_B) = 0; p falls slowly first and fast at the end of the budget.

  Args:
    tau: local step, from 0.
    budget: T_B, the local step budget (positive).

  Returns:
    A float32 scalar tensor, clipped to [0, 1] (0 at or beyond the budget, and for an empty
    budget).
  """
  tau = tf.cast(tau, tf.float64)
  budget = tf.cast(budget, tf.float64)
  denominator = 2.0 * budget - tau
  safe = tf.where(denominator > 0, denominator, tf.ones_like(denominator))
  p = tf.where(denominator > 0, (2.0 * budget - 2.0 * tau) / safe, tf.zeros_like(tau))
  return tf.cast(tf.clip_by_value(p, 0.0, 1.0), tf.float32)


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def low_magnitude_norm(layers: Sequence[Any]) -> tf.Tensor:
  """||theta_low||_2: the L2 norm of the marked (to be pruned) weights over all layers.

  `sqrt(sum_l ||kernel_l * marked_l||^2)`, the norm that `bae_beta` reads at each local step
  (the kernels change from step to step, the marked sets do not).

  Args:
    layers: the prunable layers (`fedmef_tf.masks.prunable_layers`), each with a `kernel` and
      its 0/1 `marked` set of the same shape (at least one layer).

  Returns:
    A float32 scalar tensor (0 for empty marked sets).
  """
  low_sq = tf.add_n([tf.reduce_sum(tf.square(layer.kernel * layer.marked)) for layer in layers])
  return tf.sqrt(low_sq)


def bae_beta(tau, budget, low_norm, eta_0):
  """BaE step size `beta_tau = p(tau) * (2 * sigmoid(||theta_low||_2) - 1) * eta_0`.

  Args:
    tau: local step, from 0.
    budget: T_B.
    low_norm: ||theta_low||_2, the L2 norm of the marked (to be pruned) weights over all
      prunable layers at the current step (non-negative scalar).
    eta_0: initial client learning rate.

  Returns:
    A float32 scalar tensor in [0, eta_0).
  """
  low_norm = tf.cast(low_norm, tf.float32)
  return rex_profile(tau, budget) * (2.0 * tf.sigmoid(low_norm) - 1.0) * tf.cast(eta_0, tf.float32)


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def bae_learning_rate(tau, budget, low_norm, eta_t, eta_0):
  """Budget-aware learning rate of local step tau: `mu = max(eta_t, beta_tau)`.

  Args:
    tau: local step, from 0.
    budget: T_B.
    low_norm: ||theta_low||_2 at this step.
    eta_t: the client learning rate of the round.
    eta_0: initial client learning rate.

  Returns:
    A float32 scalar tensor.
  """
  return tf.maximum(tf.cast(eta_t, tf.float32), bae_beta(tau, budget, low_norm, eta_0))
