"""Round and step schedules of FedMef.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). This module holds the scalar schedules of the method, as plain
TensorFlow so that they can be called eagerly, inside a `tf.function`, or inside a TFF
computation:

- which rounds adjust the mask (`is_adjustment_round`),
- the adjustment fraction `alpha_t` (cosine decay, as in RigL) and the per-layer count
  `k_l = floor(alpha_t * nnz_l)` (`adjustment_fraction`, `adjustment_counts`),
- the budget of local steps `T_B = E * ceil(n_k / B)` (`local_step_budget`), over which BaE's
  budget-aware learning rate runs (`fedmef_tf.bae`),
- the client learning rate of round t, exponential decay from eta_0 (round 1) to eta_min
  (round R) (`client_learning_rate`).

Rounds are counted from 1 (round t = 1 .. R), local steps from 0 (tau = 0 .. T_B - 1).
All functions accept Python numbers or scalar tensors and return scalar tensors
(float32 for rates, int32 for counts, bool for predicates) unless stated otherwise.
"""

import math

import tensorflow as tf


def is_adjustment_round(t, delta_t, t_end):
  """Whether round `t` adjusts the mask: `t % delta_t == 0 and 0 < t <= t_end`.

  Args:
    t: round number, counted from 1 (int or int scalar tensor).
    delta_t: rounds between adjustments (positive int).
    t_end: last round that may adjust (int; 0 means never).

  Returns:
    A bool scalar tensor.
  """
  t = tf.cast(t, tf.int64)
  delta_t = tf.cast(delta_t, tf.int64)
  t_end = tf.cast(t_end, tf.int64)
  return tf.logical_and(
    tf.logical_and(t > 0, t <= t_end), tf.equal(tf.math.floormod(t, delta_t), 0)
  )


def adjustment_fraction(t, alpha, t_end):
  """Cosine-decayed adjustment fraction `alpha_t = alpha / 2 * (1 + cos(pi * t / T_end))`.

  Args:
    t: round number (from 1).
    alpha: initial adjustment fraction, in [0, 1].
    t_end: last adjustment round T_end (0 means never: every round gets 0). Rounds after T_end
      get 0.

  Returns:
    A float64 scalar tensor, the fraction of each layer's active weights that is pruned and
    regrown in round t (0 for t > T_end). Float64 to the product `alpha_t * nnz_l` of
    `adjustment_counts`: in float32, 0.35 (alpha 0.7 at t = T_end / 2) is 0.34999999, and
    floor(0.34999999 * 20) would give 6 instead of 7.
  """
  t = tf.cast(t, tf.float64)
  t_end = tf.cast(t_end, tf.float64)
  # A Python float goes straight to float64 (tf.cast would round it through float32 first).
  alpha = tf.cast(tf.convert_to_tensor(alpha, dtype_hint=tf.float64), tf.float64)
  value = alpha / 2.0 * (1.0 + tf.cos(math.pi * t / tf.maximum(t_end, 1.0)))
  return tf.where(t <= t_end, value, tf.zeros_like(value))


def adjustment_counts(alpha_t, nnz, sizes=None):
  """Per-layer adjustment counts `k_l = floor(alpha_t * nnz_l)`.

  The product is taken in float64 so that values such as 0.1 * 30 = 3 are not floored to 2
  by float32 rounding. When `sizes` is given, k_l is also capped at the number of inactive
  positions `sizes_l - nnz_l`, since growth cannot pick more positions than are inactive (this
  only binds at densities above about 1 - alpha); ALGORITHM.md is silent on that case.

  Args:
    alpha_t: the adjustment fraction of the round (scalar).
    nnz: int vector [L], active (mask == 1) entries per prunable layer.
    sizes: optional int vector [L], total entries per prunable layer.

  Returns:
    An int32 vector [L].
  """
  nnz64 = tf.cast(nnz, tf.float64)
  # Add a tiny epsilon against float64 representation error (e.g. 0.3 * 10 = 2.9999...).
  alpha_t = tf.cast(tf.convert_to_tensor(alpha_t, dtype_hint=tf.float64), tf.float64)
  k = tf.floor(alpha_t * nnz64 + 1e-9)
  k = tf.cast(k, tf.int32)
  if sizes is not None:
    k = tf.minimum(k, tf.cast(sizes, tf.int32) - tf.cast(nnz, tf.int32))
  return tf.maximum(k, 0)


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def local_step_budget(num_examples, batch_size, local_epochs):
  """Local step budget `T_B = E * ceil(n_k / B)` of one client in one round.

  Args:
    num_examples: n_k, the client's number of examples (int).
    batch_size: B (positive int).
    local_epochs: E (positive int).

  Returns:
    An int32 scalar tensor (0 for an empty client).
  """
  n = tf.cast(num_examples, tf.int64)
  b = tf.cast(batch_size, tf.int64)
  steps_per_epoch = (n + b - 1) // b
  return tf.cast(tf.cast(local_epochs, tf.int64) * steps_per_epoch, tf.int32)


def client_learning_rate(t, eta_0, eta_min, total_rounds):
  """Client SGD learning rate of round t, exponential decay `eta_0 -> eta_min`.

  `eta_t = eta_0 * (eta_min / eta_0) ** ((t - 1) / (R - 1))`, so round 1 uses eta_0 and round R
  uses eta_min; rounds beyond R keep eta_min; with R = 1 the rate is eta_0.

  Args:
    t: round number, from 1.
    eta_0: initial rate (positive).
    eta_min: final rate (positive, at most eta_0).
    total_rounds: R (positive int).

  Returns:
    A float32 scalar tensor.
  """
  t = tf.cast(t, tf.float64)
  r = tf.cast(total_rounds, tf.float64)
  eta_0 = tf.cast(eta_0, tf.float64)
  eta_min = tf.cast(eta_min, tf.float64)
  span = tf.maximum(r - 1.0, 1.0)
  progress = tf.clip_by_value((t - 1.0) / span, 0.0, 1.0)
  progress = tf.where(r > 1.0, progress, tf.zeros_like(progress))
  return tf.cast(eta_0 * tf.pow(eta_min / eta_0, progress), tf.float32)
