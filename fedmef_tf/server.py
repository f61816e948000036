"""The server side of a FedMef round (and of its baselines), as plain TensorFlow.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). In round t the server

1. broadcasts the weights, the mask and a `client.RoundConfig` (`round_config`: eta_t, whether
   the round adjusts, k_l = floor(alpha_t * nnz_l));
2. aggregates `theta = sum_k n_k theta_k / sum_k n_k` over the usable clients (the clients
   already multiplied by n_k; non-finite and empty clients have weight 0). All clients of
   FedMef, RigL, static, tfmot and FedAvg hold the server's mask, so this is exact per
   coordinate; FedDST's clients hold their own masks and send them, and its kernels are averaged
   per coordinate over the clients whose mask holds it;
3. in adjustment rounds (`server_update`):
   - FedMef / RigL: per layer, prunes exactly the marked set (the k_l active entries of smallest
     |theta| of the *broadcast* weights, which the clients derived too) and grows the top-k_l
     positions by |aggregated gradient| among those inactive before the adjustment, grown
     weights zero (`mask_updates.server_adjust_layer`). The RigL baseline uses this very step
     (ALGORITHM.md: "FedMef's adjustment without BaE and SAP"), so the two differ only in what
     FedMef adds; the `marked_overlap` metric says how far this set is from the smallest
     weights after aggregation, i.e. how much pruning after aggregation would change;
   - FedDST (Bibikar et al., AAAI 2022): union of the client masks, magnitude-pruned back to the
     layer's nnz (`mask_updates.feddst_aggregate_layer`);
   - tfmot-style: per-layer magnitude masks at the uniform sparsity of tfmot's `PolynomialDecay`
     schedule (`mask_updates.tfmot_target_sparsity`), so the global model really is sparse;
4. reports the round's metrics.

Optimizer state: clients run plain SGD (no momentum) started afresh every round, and the server
takes the weighted mean (server learning rate 1, no server optimizer), so there is no optimizer
state to carry or to reset where the mask changes. A round in which no client is usable keeps
the whole state (round number included) and reports `round_skipped = 1`.

Nothing here imports TFF; the functions take and return (nested structures of) tensors.
"""

import collections
from typing import List, NamedTuple

import tensorflow as tf

from fedmef_tf import algorithms
from fedmef_tf import bae
from fedmef_tf import client as client_lib
from fedmef_tf import mask_updates
from fedmef_tf import schedules

#: How the server changes masks; which algorithm uses which is in `fedmef_tf.algorithms`.
MODE_SERVER_ADJUST = algorithms.MODE_SERVER_ADJUST
MODE_FEDDST = algorithms.MODE_FEDDST
MODE_TFMOT = algorithms.MODE_TFMOT
MODE_NONE = algorithms.MODE_NONE
MODES = algorithms.MODES


class ServerState(NamedTuple):
  """The server state between rounds.

  Attributes:
    round_num: int32 scalar, rounds completed (the next round is round_num + 1).
    trainable: list of the model's trainable weights (`model.trainable_weights` order); masked
      kernel entries are zero.
    non_trainable: list of the model's non-trainable weights (masks, marked sets (all zero
      between rounds), BaE lambdas (zero), BatchNorm statistics).
    mask_changed: bool scalar, whether the masks differ from those last broadcast (True at
      initialisation: the first broadcast carries the mask).
  """

  round_num: tf.Tensor
  trainable: List[tf.Tensor]
  non_trainable: List[tf.Tensor]
  mask_changed: tf.Tensor


class ScheduleConfig(NamedTuple):
  """Static (Python) schedule parameters of a process; see `schedules` and `mask_updates`."""

  mode: str
  delta_t: int
  t_end: int
  alpha: float
  eta_0: float
  eta_min: float
  total_rounds: int
  density: float


def _kernels(state: ServerState, layout: client_lib.WeightLayout):
  return [state.trainable[i] for i in layout.kernel_indices]


def _masks(state: ServerState, layout: client_lib.WeightLayout):
  return [state.non_trainable[i] for i in layout.mask_indices]


def _nnz(masks_list) -> tf.Tensor:
  return tf.stack([tf.cast(tf.reduce_sum(m), tf.int32) for m in masks_list])


def tfmot_end_round(delta_t: int, t_end: int) -> int:
  """Last tfmot pruning round: the largest multiple of delta_t not after t_end (>= delta_t)."""
  return max(int(delta_t), (int(t_end) // int(delta_t)) * int(delta_t))


def round_config(
  state: ServerState, layout: client_lib.WeightLayout, config: ScheduleConfig
) -> client_lib.RoundConfig:
  """The broadcast configuration of the next round (round t = state.round_num + 1).

  Args:
    state: the server state.
    layout: the model's `client.WeightLayout`.
    config: the process's `ScheduleConfig`.

  Returns:
    A `client.RoundConfig`. `adjust` is true only in an adjustment round of a mask-adjusting
    algorithm whose k_l are not all zero (so `static`, alpha = 0, never adjusts); `k` is zero
    outside adjustment rounds.
  """
  t = state.round_num + 1
  lr = schedules.client_learning_rate(t, config.eta_0, config.eta_min, config.total_rounds)
  num_layers = layout.num_layers
  if config.mode in (MODE_SERVER_ADJUST, MODE_FEDDST):
    scheduled = schedules.is_adjustment_round(t, config.delta_t, config.t_end)
    alpha_t = schedules.adjustment_fraction(t, config.alpha, config.t_end)
    k = schedules.adjustment_counts(alpha_t, _nnz(_masks(state, layout)), layout.kernel_sizes)
    adjust = tf.logical_and(scheduled, tf.reduce_sum(k) > 0)
    k = tf.where(adjust, k, tf.zeros_like(k))
  else:
    adjust = tf.constant(False)
    k = tf.zeros([num_layers], tf.int32)
  return client_lib.RoundConfig(
    round_num=tf.cast(t, tf.int32),
    learning_rate=lr,
    adjust=adjust,
    k=k,
    mask_changed=tf.convert_to_tensor(state.mask_changed),
  )


def server_update(
  state: ServerState,
  round_cfg: client_lib.RoundConfig,
  sums: client_lib.ClientOutput,
  layout: client_lib.WeightLayout,
  config: ScheduleConfig,
):
  """Aggregates the clients' sums, adjusts masks, and returns the new state and metrics.

  Args:
    state: the state broadcast this round.
    round_cfg: the round's `client.RoundConfig` (from `round_config(state, ...)`).
    sums: the element-wise sum over clients of their `client.ClientOutput`.
    layout: the model's `client.WeightLayout`.
    config: the process's `ScheduleConfig`.

  Returns:
    (new_state, metrics): a `ServerState` and an OrderedDict of metrics (see
    `tff_programs.fedmef_process` for their meaning).
  """
  total = tf.cast(sums.weight, tf.float32)
  usable = total > 0
  safe_total = tf.where(usable, total, 1.0)
  kernel_pos = {i: l for l, i in enumerate(layout.kernel_indices)}

  old_kernels = _kernels(state, layout)
  old_masks = _masks(state, layout)

  # 1. Weighted mean (per coordinate over mask holders for kernels).
  trainable = []
  for i, summed in enumerate(sums.weighted_trainable):
    if i in kernel_pos and sums.weighted_masks:
      held = sums.weighted_masks[kernel_pos[i]]
      safe = tf.where(held > 0, held, tf.ones_like(held))
      trainable.append(tf.where(held > 0, summed / safe, tf.zeros_like(summed)))
    else:
      trainable.append(summed / safe_total)
  stats = [s / safe_total for s in sums.weighted_stats]
  agg_kernels = [trainable[i] for i in layout.kernel_indices]

  # 2. Mask adjustment.
  t = round_cfg.round_num
  k = tf.cast(round_cfg.k, tf.int32)
  adjusted = tf.constant(False)
  overlap_hits = tf.constant(0.0)
  new_kernels, new_masks = [], []
  if config.mode == MODE_SERVER_ADJUST and not sums.weighted_grads:
    raise ValueError("server_adjust mode needs the clients' gradients (server_adjust=True)")
  if config.mode == MODE_FEDDST and not sums.weighted_masks:
    raise ValueError("feddst mode needs the clients' masks (client_regrow=True)")
  if config.mode == MODE_SERVER_ADJUST:
    adjusted = tf.convert_to_tensor(round_cfg.adjust)
    for l in range(layout.num_layers):
      grad = sums.weighted_grads[l] / safe_total
      kernel_a, mask_a, pruned, _ = mask_updates.server_adjust_layer(
        old_kernels[l], old_masks[l], agg_kernels[l], grad, k[l]
      )
      smallest = bae.marked_set(agg_kernels[l], old_masks[l], k[l])
      overlap_hits += tf.reduce_sum(pruned * smallest)
      new_kernels.append(tf.where(adjusted, kernel_a, agg_kernels[l] * old_masks[l]))
      new_masks.append(tf.where(adjusted, mask_a, old_masks[l]))
  elif config.mode == MODE_FEDDST:
    adjusted = tf.convert_to_tensor(round_cfg.adjust)
    nnz_old = _nnz(old_masks)
    for l in range(layout.num_layers):
      kernel_a, mask_a = mask_updates.feddst_aggregate_layer(
        sums.weighted_trainable[layout.kernel_indices[l]], sums.weighted_masks[l], nnz_old[l]
      )
      new_kernels.append(tf.where(adjusted, kernel_a, agg_kernels[l] * old_masks[l]))
      new_masks.append(tf.where(adjusted, mask_a, old_masks[l]))
  elif config.mode == MODE_TFMOT:
    should_prune, sparsity = mask_updates.tfmot_target_sparsity(
      t,
      final_sparsity=1.0 - config.density,
      end_round=tfmot_end_round(config.delta_t, config.t_end),
      frequency=config.delta_t,
    )
    target = mask_updates.uniform_nnz(layout.kernel_sizes, sparsity)
    adjusted = tf.logical_and(should_prune, tf.reduce_any(target < _nnz(old_masks)))
    for l in range(layout.num_layers):
      mask_a = mask_updates.magnitude_mask(agg_kernels[l], old_masks[l], target[l])
      mask_l = tf.where(adjusted, mask_a, old_masks[l])
      new_masks.append(mask_l)
      new_kernels.append(agg_kernels[l] * mask_l)
  else:
    new_kernels = [kk * m for kk, m in zip(agg_kernels, old_masks)]
    new_masks = list(old_masks)

  for l, i in enumerate(layout.kernel_indices):
    trainable[i] = new_kernels[l]
  non_trainable = list(state.non_trainable)
  for l in range(layout.num_layers):
    non_trainable[layout.mask_indices[l]] = new_masks[l]
    non_trainable[layout.marked_indices[l]] = tf.zeros_like(new_masks[l])
    non_trainable[layout.lambda_indices[l]] = tf.zeros_like(
      state.non_trainable[layout.lambda_indices[l]]
    )
  for j, i in enumerate(layout.stat_indices):
    non_trainable[i] = stats[j]
  mask_changed = tf.reduce_any(
    tf.stack([tf.reduce_any(tf.not_equal(a, b)) for a, b in zip(new_masks, old_masks)])
  )

  candidate = ServerState(
    round_num=tf.cast(state.round_num + 1, tf.int32),
    trainable=trainable,
    non_trainable=non_trainable,
    mask_changed=mask_changed,
  )
  # A round without a usable client keeps the previous state entirely.
  new_state = tf.nest.map_structure(
    lambda new, old: tf.where(usable, new, tf.convert_to_tensor(old)), candidate, state
  )

  final_masks = _masks(new_state, layout)
  nnz = _nnz(final_masks)
  total_size = float(sum(layout.kernel_sizes))
  k_total = tf.cast(tf.reduce_sum(k), tf.float32)
  adjusted_now = tf.logical_and(adjusted, usable)
  m = sums.metrics
  examples = tf.cast(m['num_examples'], tf.float32)
  safe_examples = tf.where(examples > 0, examples, 1.0)
  metrics = collections.OrderedDict(
    round_num=tf.cast(t, tf.int32),
    round_skipped=tf.cast(tf.logical_not(usable), tf.int32),
    learning_rate=tf.cast(round_cfg.learning_rate, tf.float32),
    train_loss=tf.where(examples > 0, m['loss_sum'] / safe_examples, 0.0),
    train_accuracy=tf.where(examples > 0, tf.cast(m['correct'], tf.float32) / safe_examples, 0.0),
    num_examples=tf.cast(m['num_examples'], tf.int32),
    global_density=tf.cast(tf.reduce_sum(nnz), tf.float32) / total_size,
    layer_nnz=nnz,
    k=tf.where(adjusted_now, k, tf.zeros_like(k)),
    adjusted=tf.cast(adjusted_now, tf.int32),
    marked_overlap=tf.where(
      tf.logical_and(adjusted_now, k_total > 0), overlap_hits / tf.maximum(k_total, 1.0), 0.0
    ),
    bytes_down=tf.cast(m['bytes_down'], tf.int64),
    bytes_up=tf.cast(m['bytes_up'], tf.int64),
    clients_used=tf.cast(m['used'], tf.int32),
    clients_rejected=tf.cast(m['rejected'], tf.int32),
    clients_empty=tf.cast(m['empty'], tf.int32),
  )
  return new_state, metrics
