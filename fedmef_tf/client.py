"""One client's local work in a round of FedMef and of its baselines, as plain TensorFlow.

FedMef: Huang, Zhuang, Chen, Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning",
CVPR 2024 (arXiv 2403.14737). A sampled client k with n_k examples, in round t:

1. loads the broadcast weights and mask and trains E epochs of masked SGD (batch B, learning
   rate eta_t); masked weights stay exactly zero after every step;
2. in adjustment rounds with budget-aware extrusion (BaE) on: derives the marked set (per layer the
   k_l active weights of smallest |theta|, `bae.marked_set`) from the broadcast weights,
   sets it with lambda in the masked layers (whose custom kernel gradient adds
   `2 * lambda * theta` on the marked entries), and uses at local step tau the learning rate
   `mu = max(eta_t, beta_tau)` over the budget `T_B = E * ceil(n_k / B)`;
3. in adjustment rounds of server-side adjusting algorithms, after training: the unmasked
   task-loss gradient on one mini-batch (`growth.dense_kernel_gradients`) and per layer the
   top-k_l (index, value) pairs among inactive positions;
4. returns its weights (multiplied by its aggregation weight n_k, so that the server only sums),
   n_k, the sparse gradients, metrics and whether its update was finite.

FedDST's clients (Bibikar et al., AAAI 2022) instead readjust their own mask in adjustment
rounds: at local step floor(T_B / 2) they magnitude-prune k_l active weights and regrow k_l
positions by their own gradient on the current mini-batch (grown weights zero), then keep
training, so that the grown weights are trained before upload; they upload their mask as well.
ALGORITHM.md does not say when in the local budget FedDST readjusts; mid-budget is our choice.

n_k is needed before training, because the budget T_B, and so the BaE learning rate of step 0,
depends on it: it is the dataset's cardinality where tf.data knows it, else counted with one
pass over the (batched) dataset (a client whose dataset is expensive to read can cache it).

The loops over the dataset iterate an explicit iterator (`iter(batches)`), which AutoGraph
turns into a `tf.while_loop`, instantiated once with the function. A plain `for` over a
dataset becomes a `ReduceDataset` op, which instantiates (and optimises) its loop body, the
whole SGD step, on every call: in TFF's worker and in a plain loop alike that cost several times
a local step, on every client of every round. Training loss and accuracy are taken on each batch
before its update, over all epochs.

The client iterates its dataset with tf.data's autotuning off (`without_autotune`). With it on,
every iterator starts a model thread that re-optimises the pipeline at periods doubling from
10 ms up to 60 s; in TFF's C++ worker, destroying the iterator waits until that thread next
wakes, so a client's loop (and with it the round) would end only at the next of those wake-ups
(10 ms times 2^n - 1 after the iterator's first element: 10.2 s, 20.5 s, 41 s, ...).
Autotuning changes buffer sizes and parallelism, never the elements or their order: the
updates are the same; a pipeline passed in with `tf.data.AUTOTUNE` parameters runs them at
tf.data's fixed defaults.

This module knows nothing about TFF: `client_update` is a `tf.function` on a Keras model whose
prunable layers follow the masked layer contract of `docs/DESIGN.md`.
"""

import collections
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from fedmef_tf import agc
from fedmef_tf import bae
from fedmef_tf import execution
from fedmef_tf import growth
from fedmef_tf import losses
from fedmef_tf import mask_updates
from fedmef_tf import masks as masks_lib
from fedmef_tf import schedules

#: Bytes per weight value and per gradient value on the wire (float32), and per index (int32).
VALUE_BYTES = 4
INDEX_BYTES = 4


class WeightLayout(object):
  """Where each prunable layer's variables sit in a model's weight lists (static, Python).

  The TFF state holds `model.trainable_weights` and `model.non_trainable_weights` as two lists
  of tensors; this layout says which entries are the kernels (trainable) and the masks, marked
  sets and BaE lambdas (non-trainable) of prunable layer l (order of
  `masks.prunable_layers(model)`), and which non-trainable entries are other state to average
  (BatchNorm moving statistics).

  Attributes:
    kernel_indices: list [L] of indices into the trainable list.
    mask_indices, marked_indices, lambda_indices: lists [L] of indices into the non-trainable
      list.
    stat_indices: indices of the other non-trainable weights (averaged like weights).
    kernel_shapes: list [L] of kernel shapes (tuples).
    kernel_sizes: list [L] of kernel sizes (ints).
    dense_param_count: number of trainable entries outside the prunable kernels plus the
      entries of `stat_indices` (all sent densely).
    num_trainable, num_non_trainable: list lengths.
  """

  def __init__(self, model: tf.keras.Model):
    layers = masks_lib.prunable_layers(model)
    if not layers:
      raise ValueError('model has no prunable (masked) layer')
    trainable = {v.ref(): i for i, v in enumerate(model.trainable_weights)}
    non_trainable = {v.ref(): i for i, v in enumerate(model.non_trainable_weights)}
    self.kernel_indices = [trainable[layer.kernel.ref()] for layer in layers]
    self.mask_indices = [non_trainable[layer.mask.ref()] for layer in layers]
    self.marked_indices = [non_trainable[layer.marked.ref()] for layer in layers]
    self.lambda_indices = [non_trainable[layer.bae_lambda.ref()] for layer in layers]
    reserved = set(self.mask_indices + self.marked_indices + self.lambda_indices)
    self.stat_indices = [i for i in range(len(model.non_trainable_weights)) if i not in reserved]
    self.kernel_shapes = [tuple(int(d) for d in layer.kernel.shape) for layer in layers]
    self.kernel_sizes = [int(np.prod(s)) for s in self.kernel_shapes]
    kernel_set = set(self.kernel_indices)
    dense = sum(
      int(np.prod(v.shape)) for i, v in enumerate(model.trainable_weights) if i not in kernel_set
    )
    dense += sum(int(np.prod(model.non_trainable_weights[i].shape)) for i in self.stat_indices)
    self.dense_param_count = dense
    self.num_trainable = len(model.trainable_weights)
    self.num_non_trainable = len(model.non_trainable_weights)

  @property
  def num_layers(self) -> int:
    return len(self.kernel_indices)

  def mask_bytes(self) -> int:
    """Bytes of all masks sent as bitmaps (1 bit per kernel entry, each layer byte-padded)."""
    return int(sum((n + 7) // 8 for n in self.kernel_sizes))


class RoundConfig(NamedTuple):
  """What the server broadcasts to the clients besides the weights (one round).

  Attributes:
    round_num: int32 scalar, t (from 1).
    learning_rate: float32 scalar, eta_t.
    adjust: bool scalar, whether this round adjusts masks (after the schedule and alpha_t).
    k: int32 vector [L], k_l of the round (zeros when not adjusting).
    mask_changed: bool scalar, whether the mask differs from the previous broadcast (it is then
      sent with the weights, which the downlink count charges).
  """

  round_num: tf.Tensor
  learning_rate: tf.Tensor
  adjust: tf.Tensor
  k: tf.Tensor
  mask_changed: tf.Tensor


class ClientOutput(NamedTuple):
  """What one client returns, already multiplied by its aggregation weight (server sums it).

  `weight` is n_k for a usable client and 0 for an empty or rejected one (then every weighted
  tensor is exactly zero, so a NaN cannot leak into the sum).

  Attributes:
    weight: float32, n_k or 0.
    weighted_trainable: list, weight * trained trainable weights (kernels masked).
    weighted_stats: list, weight * the non-trainable statistics (BatchNorm moving stats).
    weighted_masks: list [L], weight * the client's mask, for FedDST's per-coordinate
      average; an empty list for the other algorithms, whose clients all hold the server's
      mask (the server then divides by the total weight).
    weighted_grads: list [L], weight * the dense scatter of the client's top-k inactive
      gradient pairs (zero outside adjustment rounds); an empty list for algorithms that do
      not grow on the server. Leaving out what an algorithm does not need keeps the
      simulation's per-client output at the size of the model for FedAvg-like rounds.
    metrics: OrderedDict of summable scalars: loss_sum, correct, num_examples (training
      examples seen, all epochs), used, rejected, empty (int32 counts), bytes_up, bytes_down
      (int64).
  """

  weight: tf.Tensor
  weighted_trainable: List[tf.Tensor]
  weighted_stats: List[tf.Tensor]
  weighted_masks: List[tf.Tensor]
  weighted_grads: List[tf.Tensor]
  metrics: collections.OrderedDict


#: The loss of the client steps unless another is given: `fedmef_tf.losses.mean_loss`.
default_loss_fn = losses.mean_loss


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def sgd_step(
  model: tf.keras.Model,
  layers: Sequence[tf.keras.layers.Layer],
  x: tf.Tensor,
  y: tf.Tensor,
  learning_rate,
  loss_fn: Callable = default_loss_fn,
  clipping: Optional[float] = None,
):
  """One masked SGD step: forward in training mode, loss, gradient, update.

  The step of the simulated clients, of the memory measurement and of the `train` signature of
  a TFLite export (`tflite_export.train_module`). Every trainable variable moves by
  `-learning_rate * gradient` (the masked layers' custom kernel gradients are zero at pruned
  entries and carry BaE's penalty), then every prunable kernel is multiplied by its mask, so
  masked weights are exactly zero after the step. With `clipping`, the gradients are first
  clipped unit-wise (`fedmef_tf.agc`, the FedMef models' adaptive gradient clipping; the
  output layer is not clipped).

  Variables that the current execution strategy's layer kernels update inside the backward
  pass (`execution.current().layer_kernels.updated_in_backward()`, e.g. the kernels and
  NSConv gains under `tflite_export.layer_updates.InBackwardUpdates`, which clip and mask
  their own updates) are left alone: no gradient is clipped or applied to them and no kernel
  among them is masked again. Under the plain strategies that set is empty.

  Args:
    model: a Keras model with masked layers (or none: then nothing is masked).
    layers: `masks.prunable_layers(model)`.
    x, y: one batch.
    learning_rate: scalar, the step's rate (a tensor or a `tf.Variable`).
    loss_fn: `loss_fn(y_true, logits)` -> scalar mean loss.
    clipping: AGC threshold lambda (`agc.clipping_for(variant)`), or None for plain SGD.

  Returns:
    `(loss, logits)` of the batch before the update.
  """
  kernels = execution.current().layer_kernels
  with tf.GradientTape() as tape:
    logits = model(x, training=True)
    loss = loss_fn(y, logits)
  grads = tape.gradient(loss, model.trainable_weights)
  in_backward = list(kernels.updated_in_backward()) if kernels is not None else []
  done = {v.ref() for v in in_backward}
  if clipping is not None:
    grads = agc.clip_model_gradients(model, grads, clipping, skip=in_backward)
  for v, g in zip(model.trainable_weights, grads):
    if g is not None and v.ref() not in done:
      v.assign_sub(learning_rate * tf.convert_to_tensor(g))
  for layer in layers:
    if layer.kernel.ref() not in done:
      layer.kernel.assign(layer.kernel * layer.mask)
  return loss, logits


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` with tf.data's autotuning off (no model thread per iterator; module docstring)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def _count_examples(dataset: tf.data.Dataset, batches: tf.data.Dataset) -> tf.Tensor:
  """n_k of the unbatched `dataset`: its cardinality where tf.data knows it (exact then), else
  one pass over `batches` (the same dataset, batched)."""
  cardinality = dataset.cardinality()

  def count():
    n = tf.constant(0, tf.int32)
    for _, y in iter(batches):
      n += tf.shape(y)[0]
    return n

  return tf.cond(cardinality >= 0, lambda: tf.cast(cardinality, tf.int32), count)


def _all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]
  return tf.reduce_all(tf.stack(flags))


def build_client_update(
  model: tf.keras.Model,
  layout: WeightLayout,
  *,
  local_epochs: int,
  batch_size: int,
  eta_0: float,
  lambda_bae: float,
  use_bae: bool,
  server_adjust: bool,
  client_regrow: bool,
  loss_fn: Callable = default_loss_fn,
  gradient_clipping: Optional[float] = None,
):
  """Returns `client_update(dataset, trainable, non_trainable, config) -> ClientOutput`.

  The returned function is a `tf.function` that loads the given weights into `model` (whose
  variables it owns), runs one round of local work and returns a `ClientOutput`.

  Args:
    model: a built Keras model with masked layers (logits output unless `loss_fn` says
      otherwise). Its variables are overwritten on every call.
    layout: `WeightLayout(model)`.
    local_epochs: E, local epochs per round (positive).
    batch_size: B; the client batches its unbatched dataset of (x, y) examples with it.
    eta_0: the initial client learning rate, the scale of BaE's beta_tau.
    lambda_bae: BaE penalty weight lambda (used only with `use_bae`).
    use_bae: whether adjustment rounds use BaE (penalty on the marked set and the
      budget-aware learning rate).
    server_adjust: whether adjustment rounds send top-k inactive gradient pairs (FedMef, RigL).
    client_regrow: whether adjustment rounds readjust the client's own mask (FedDST).
    loss_fn: `loss_fn(y_true, y_pred)` -> scalar mean loss.
    gradient_clipping: AGC threshold of the local steps (`agc.clipping_for` the model's
      variant), or None.

  Returns:
    The client update function described above.
  """
  layers = masks_lib.prunable_layers(model)
  local_epochs = int(local_epochs)
  batch_size = int(batch_size)
  dense_bytes = VALUE_BYTES * layout.dense_param_count
  mask_bytes = layout.mask_bytes()

  def _load(trainable, non_trainable):
    for v, t in zip(model.trainable_weights, trainable):
      v.assign(t)
    for v, t in zip(model.non_trainable_weights, non_trainable):
      v.assign(t)

  def _regrow(x, y, k):
    grads = growth.dense_kernel_gradients(model, x, y, loss_fn)
    for l, layer in enumerate(layers):
      new_kernel, new_mask = mask_updates.client_prune_and_regrow(
        layer.kernel, layer.mask, grads[l], k[l]
      )
      layer.mask.assign(new_mask)
      layer.kernel.assign(new_kernel)

  def _bae_lr(tau, budget, eta_t):
    return bae.bae_learning_rate(tau, budget, bae.low_magnitude_norm(layers), eta_t, eta_0)

  @tf.function
  def client_update(dataset, trainable, non_trainable, config: RoundConfig):
    _load(trainable, non_trainable)
    dataset = without_autotune(dataset)
    batches = dataset.batch(batch_size)
    num_examples = _count_examples(dataset, batches)
    budget = schedules.local_step_budget(num_examples, batch_size, local_epochs)
    nnz_before = tf.stack([tf.reduce_sum(layer.mask) for layer in layers])
    k = tf.cast(config.k, tf.int32)

    bae_on = tf.logical_and(config.adjust, tf.constant(bool(use_bae)))
    for l, layer in enumerate(layers):
      marked = bae.marked_set(layer.kernel, layer.mask, k[l])
      layer.marked.assign(tf.where(bae_on, marked, tf.zeros_like(marked)))
      layer.bae_lambda.assign(tf.where(bae_on, tf.constant(lambda_bae, tf.float32), 0.0))

    eta_t = tf.cast(config.learning_rate, tf.float32)
    regrow_step = budget // 2
    regrow_on = tf.logical_and(config.adjust, tf.constant(bool(client_regrow)))
    tau = tf.constant(0, tf.int32)
    loss_sum = tf.constant(0.0, tf.float32)
    correct = tf.constant(0, tf.int32)
    seen = tf.constant(0, tf.int32)
    for _ in range(local_epochs):
      for x, y in iter(batches):
        if client_regrow:
          if tf.logical_and(regrow_on, tf.equal(tau, regrow_step)):
            _regrow(x, y, k)
        lr = eta_t
        if use_bae:
          lr = tf.cond(bae_on, lambda: _bae_lr(tau, budget, eta_t), lambda: eta_t)
        loss, logits = sgd_step(model, layers, x, y, lr, loss_fn, gradient_clipping)
        n_batch = tf.shape(y)[0]
        loss_sum += loss * tf.cast(n_batch, tf.float32)
        predictions = tf.cast(tf.argmax(logits, axis=-1), tf.int64)
        correct += tf.reduce_sum(
          tf.cast(tf.equal(predictions, tf.cast(tf.reshape(y, [-1]), tf.int64)), tf.int32)
        )
        seen += n_batch
        tau += 1

    # BaE is over: clear the marked set so the uploaded state carries none.
    for layer in layers:
      layer.marked.assign(tf.zeros_like(layer.marked))
      layer.bae_lambda.assign(0.0)

    # Top-k inactive gradient pairs of one mini-batch (the first), scattered densely.
    pairs_sent = tf.constant(0, tf.int32)
    # Tuples, not lists: a loop over a dataset would stack a list into one tensor.
    grad_dense = tuple(tf.zeros(shape, tf.float32) for shape in layout.kernel_shapes)
    if server_adjust:
      if config.adjust:  # a tf.cond: no iterator is made outside adjustment rounds
        for x, y in iter(batches.take(1)):
          grads = growth.dense_kernel_gradients(model, x, y, loss_fn)
          new_dense = []
          count = tf.constant(0, tf.int32)
          for l, layer in enumerate(layers):
            indices, values = growth.top_k_inactive(grads[l], layer.mask, k[l])
            new_dense.append(growth.scatter_pairs(indices, values, layout.kernel_shapes[l]))
            count += tf.size(indices)
          grad_dense = tuple(new_dense)
          pairs_sent = count

    trained = [tf.convert_to_tensor(v) for v in model.trainable_weights]
    stats = [tf.convert_to_tensor(model.non_trainable_weights[i]) for i in layout.stat_indices]
    client_masks = [tf.convert_to_tensor(layer.mask) for layer in layers]
    nonempty = num_examples > 0
    finite = _all_finite(trained + stats + (list(grad_dense) if server_adjust else []) + [loss_sum])
    usable = tf.logical_and(nonempty, finite)
    weight = tf.where(usable, tf.cast(num_examples, tf.float32), 0.0)

    def _weighted(tensors):
      return [tf.where(usable, weight * t, tf.zeros_like(t)) for t in tensors]

    nnz_after = tf.stack([tf.reduce_sum(m) for m in client_masks])
    bytes_up = (
      VALUE_BYTES * tf.cast(tf.reduce_sum(nnz_after), tf.int64)
      + dense_bytes
      + (VALUE_BYTES + INDEX_BYTES) * tf.cast(pairs_sent, tf.int64)
    )
    bytes_up += tf.where(regrow_on, tf.constant(mask_bytes, tf.int64), 0)
    bytes_down = (
      VALUE_BYTES * tf.cast(tf.reduce_sum(nnz_before), tf.int64)
      + dense_bytes
      + tf.where(config.mask_changed, tf.constant(mask_bytes, tf.int64), 0)
    )
    metrics = collections.OrderedDict(
      loss_sum=tf.where(usable, loss_sum, 0.0),
      correct=tf.where(usable, correct, 0),
      num_examples=tf.where(usable, seen, 0),
      used=tf.cast(usable, tf.int32),
      rejected=tf.cast(tf.logical_and(nonempty, tf.logical_not(finite)), tf.int32),
      empty=tf.cast(tf.logical_not(nonempty), tf.int32),
      bytes_up=tf.where(nonempty, bytes_up, tf.constant(0, tf.int64)),
      bytes_down=tf.where(nonempty, bytes_down, tf.constant(0, tf.int64)),
    )
    return ClientOutput(
      weight=weight,
      weighted_trainable=_weighted(trained),
      weighted_stats=_weighted(stats),
      weighted_masks=_weighted(client_masks) if client_regrow else [],
      weighted_grads=_weighted(list(grad_dense)) if server_adjust else [],
      metrics=metrics,
    )

  return client_update
