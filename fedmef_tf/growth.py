"""Growth scoring of FedMef's mask adjustment (Huang et al., CVPR 2024, arXiv 2403.14737).

In an adjustment round the server grows, per prunable layer, the k_l inactive positions whose
aggregated task-loss gradient is largest in magnitude (RigL's growth criterion, done on the
server as in FedTiny). The score is computed by the clients:

- `dense_kernel_gradients`: the *unmasked* gradient of the task loss at every kernel position of
  every prunable layer, active or not (the masked layers' kernel gradient is zero on the
  inactive positions, so it is taken through a zero probe added to the effective kernel,
  `fedmef_tf.sparse_layers.MaskedLayer.probe`);
- `top_k_inactive`: per layer, the k_l (flat index, value) pairs of largest |gradient| among the
  inactive positions, what a client uploads;
- `scatter_pairs`: those pairs as a dense tensor of the layer's shape, which the simulation sums
  over the clients.

The server's prune and grow step is `fedmef_tf.mask_updates.server_adjust_layer`; FedDST's
clients grow by their own gradient (`fedmef_tf.mask_updates.client_prune_and_regrow`).
Nothing here knows about TFF; everything runs eagerly or inside a `tf.function`.
"""

from typing import Callable, List

import tensorflow as tf

from fedmef_tf import sparse_layers

__all__ = ['dense_kernel_gradients', 'top_k_inactive', 'scatter_pairs']


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def dense_kernel_gradients(
  model: tf.keras.Model,
  x: tf.Tensor,
  y: tf.Tensor,
  loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
  *,
  training: bool = False,
) -> List[tf.Tensor]:
  """Unmasked gradient of the task loss at every kernel position, per prunable layer.

  A zero probe tensor P_l is added to each layer's effective kernel for one forward pass and
  the gradient of `loss_fn(y, model(x))` with respect to P_l is returned. For a plain masked
  layer this is dL/dW_eff with W_eff = kernel * mask, at active and inactive positions alike
  (the growth score of FedMef / RigL). For an NSConv layer (`normalize=True`) the probe enters
  as `W_hat + P * g / std` (per output channel, the scale held constant), which gives
  `dL/dW_hat * g / std`: the first-order gradient a raw weight would receive at that position
  if it were active (the gradient with respect to `kernel * mask` itself is useless for
  growth there, because the re-applied mask hides inactive positions from the loss).
  The BaE penalty is not included. Usable eagerly and inside `tf.function`.

  Args:
      model: a built model with masked layers.
      x: one input batch, e.g. `[B, H, W, C]` float32.
      y: its labels, whatever `loss_fn` expects.
      loss_fn: `loss_fn(y_true, y_pred)` returning a scalar (or per-example losses, which
          are averaged).
      training: forward mode. False (default) uses the plain ops (SAP off, exact gradients)
          and BatchNorm inference statistics, and updates no BatchNorm moving statistics.

  Returns:
      A list of float32 tensors, one per prunable layer, each with its kernel's shape.
  """
  layers = sparse_layers.prunable_layers(model)
  probes = [tf.zeros(layer.kernel.shape, dtype=tf.float32) for layer in layers]
  try:
    for layer, probe in zip(layers, probes):
      layer.probe = probe
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(probes)
      pred = model(x, training=training)
      loss = tf.reduce_mean(loss_fn(y, pred))
    grads = tape.gradient(loss, probes)
  finally:
    for layer in layers:
      layer.probe = None
  return [tf.zeros_like(p) if g is None else g for g, p in zip(grads, probes)]


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def top_k_inactive(grad, mask, k):
  """Per layer, the top-k positions of |grad| among inactive (mask == 0) positions.

  This is what a client uploads after training in an adjustment round: (flat index, value)
  pairs.

  Args:
    grad: float tensor, the unmasked gradient of the task loss w.r.t. the effective weights.
    mask: float32 0/1 tensor, same shape.
    k: int scalar, k_l (clipped to the layer's inactive count).

  Returns:
    (indices, values): int32 vector [k'] of flat indices in descending |grad| order (ties by
    lower index) and float32 vector [k'] of the signed gradient values there, k' = min(k,
    inactive count).
  """
  flat_grad = tf.reshape(tf.cast(grad, tf.float32), [-1])
  flat_inactive = tf.reshape(mask <= 0, [-1])
  k = tf.clip_by_value(tf.cast(k, tf.int32), 0, tf.reduce_sum(tf.cast(flat_inactive, tf.int32)))
  lowest = tf.fill(tf.shape(flat_grad), tf.constant(-float('inf'), tf.float32))
  score = tf.where(flat_inactive, tf.abs(flat_grad), lowest)
  _, indices = tf.math.top_k(score, k=k, sorted=True)
  return indices, tf.gather(flat_grad, indices)


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def scatter_pairs(indices, values, shape):
  """Dense tensor of `shape` holding `values` at flat `indices`, zero elsewhere.

  The simulation sums these dense tensors across clients; on the wire only the pairs travel,
  and that is what the traffic count charges. Missing entries are 0, as ALGORITHM.md states.

  Args:
    indices: int32 vector [k] of flat indices (distinct).
    values: float32 vector [k].
    shape: the layer's kernel shape.

  Returns:
    A float32 tensor of `shape`.
  """
  size = tf.reduce_prod(tf.cast(shape, tf.int32))
  flat = tf.scatter_nd(
    tf.expand_dims(tf.cast(indices, tf.int32), 1),
    tf.cast(values, tf.float32),
    tf.expand_dims(size, 0),
  )
  return tf.reshape(flat, shape)
