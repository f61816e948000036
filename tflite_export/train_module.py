"""The `tf.Module` whose signatures become the on-device training API of a TFLite export.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) trains a sparse model on the clients from the
first round; on a phone each client runs the exported `train` signature. `TrainModule` wraps a
Keras model (any model of `fedmef_tf.models`, or a plain Keras model such as a stripped tfmot
model) and exposes these signatures:

* `train(x, y) -> {loss}`: one step of the clients' masked SGD (`fedmef_tf.client.sgd_step`) on the
  mean softmax cross-entropy of a batch (`fedmef_tf.losses.mean_loss`), with the AGC of the model's
  variant (`gradient_clipping`). `x`: float32 `[B, H, W, C]` with the batch size B fixed at export
  time; `y`: int32 `[B]` class ids. The model runs with `training=True`, so the SAP ops of a FedMef
  model cache only the kept activations (as values plus int32 indices, `tflite_export.static_sap`)
  and BitReLU a 1-bit mask, and BatchNorm of a baseline model uses batch statistics and updates its
  moving averages. The kernel gradient of a masked layer is already masked (and carries the BaE
  term, `fedmef_tf.sparse_layers.masked_kernel`); after the update every masked kernel is multiplied
  by its mask once more, so pruned entries are exactly zero after every step whatever values were
  loaded. `loss` is the task loss *before* the step (the BaE penalty is not in it, only its
  gradient). In the TFLite graph (`signatures(for_tflite=True)`) the same step is arranged for
  memory (`tflite_export.layer_updates`, both variants): each masked layer's kernel (and NSConv
  gain) is updated, `kernel <- (kernel - lr * g) * mask`, inside the backward pass as soon as its
  gradient exists, and the rest of the backward pass waits for it; `sgd_step` then updates the other
  variables and leaves those (the strategy's `layer_kernels.updated_in_backward()`,
  `fedmef_tf.execution.LayerKernels`) alone.
* `infer(x) -> {logits}`: `training=False` forward pass (plain ops, BatchNorm moving statistics).
  Same fixed batch B as `train` (a smaller batch is padded by the caller).
* `set_learning_rate(lr) -> {lr}`: sets the SGD learning rate (a variable, default chosen at
  export time) used by every later `train` call, e.g. eta_t of the round.
* `get_weights() -> {name: tensor}`: every variable of the model, masks, BaE marked sets,
  BaE lambdas and BatchNorm statistics included; names are `w000_<layer>_<variable>` in the
  order of `model.variables` (see `weight_names`).
* `set_weights(**same names) -> {n_weights}`: assigns all of them (e.g. the global model of a
  round, with its mask and, in adjustment rounds, its marked set and lambda).
* `save() -> {checkpoint}` / `restore(checkpoint) -> {name: tensor}`: every variable and the
  learning rate as one float32 vector, which the app writes to and reads from its own file
  (`tflite_export.checkpoint`: builtin ops only; its layout is `checkpoint_layout` in the
  metadata); `restore` assigns it and returns the restored values by name.
* `dense_gradients(x, y) -> {grad_<kernel name>: tensor}` (models with masks only): per
  prunable layer, the unmasked gradient of the task loss at every kernel position
  (`fedmef_tf.growth.dense_kernel_gradients`, plain ops, no BatchNorm update), from which
  a client picks the top-k_l inactive positions in an adjustment round.
* `metadata() -> {json}`: the JSON export configuration (model, variant, shapes, batch size,
  weight names, ...), so a reader of the file can rebuild the TF model (`tflite_export.verify`).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Dict, List, Optional

import tensorflow as tf

from fedmef_tf import client
from fedmef_tf import execution
from fedmef_tf import masks as masks_lib
from fedmef_tf import growth
from fedmef_tf import losses
from tflite_export import checkpoint as checkpoint_lib
from tflite_export import chunked_conv
from tflite_export import depthwise_grad
from tflite_export import filter_grad
from tflite_export import layer_updates
from tflite_export import static_sap

__all__ = ['TrainModule', 'weight_names', 'tflite_strategy', 'tflite_tracing', 'LR_NAME']

#: Name of the learning rate in the checkpoint vector of the `save` signature.
LR_NAME = 'learning_rate'

_SIGNATURES = (
  'train',
  'infer',
  'set_learning_rate',
  'get_weights',
  'set_weights',
  'save',
  'restore',
  'metadata',
)


#: The im2col budget that slices no convolution (`max_im2col_bytes=0`).
_UNBOUNDED = 1 << 62


def tflite_strategy(
  max_im2col_bytes: int = chunked_conv.DEFAULT_MAX_WORKSPACE_BYTES,
  builtin_weight_grads: bool = True,
  sap_storage: str = static_sap.DEFAULT_STORAGE,
) -> execution.Strategy:
  """How the graphs of a TFLite file are traced (`fedmef_tf.execution`): SAP with static-shape
  storage (`tflite_export.static_sap.STORAGES[sap_storage]`: TOPK_V2 or radix selection),
  the backward order carried by data dependencies,
  no native kernel, masked conv forwards in batch slices with at most `max_im2col_bytes` of
  im2col workspace each (`tflite_export.chunked_conv`; 0: whole batch) and, if
  `builtin_weight_grads`, their weight gradients from builtin ops
  (`tflite_export.filter_grad`; else the select-TF `Conv2DBackpropFilter`), and the gradients
  of masked depthwise convolutions likewise (`tflite_export.depthwise_grad`). Same values as the
  TF model's graphs. The `train` step adds its in-backward kernel updates
  (`tflite_export.layer_updates.InBackwardUpdates`) while it is traced."""
  budget = max_im2col_bytes if max_im2col_bytes > 0 else _UNBOUNDED
  return execution.Strategy(
    sap_storage=static_sap.storage(sap_storage),
    conv2d=chunked_conv.bounded(budget),
    conv2d_filter_grad=(
      filter_grad.conv2d_filter_grad if builtin_weight_grads else execution.tf_conv2d_filter_grad
    ),
    data_dependencies=True,
    native_kernels=False,
    depthwise=(
      depthwise_grad.BUILTIN_DEPTHWISE_OPS if builtin_weight_grads else execution.TF_DEPTHWISE_OPS
    ),
  )


def tflite_tracing(
  max_im2col_bytes: int = chunked_conv.DEFAULT_MAX_WORKSPACE_BYTES,
  builtin_weight_grads: bool = True,
  sap_storage: str = static_sap.DEFAULT_STORAGE,
):
  """`execution.scope(tflite_strategy(max_im2col_bytes, builtin_weight_grads, sap_storage))`:
  a context in which the graphs of a TFLite file are traced."""
  return execution.scope(tflite_strategy(max_im2col_bytes, builtin_weight_grads, sap_storage))


def weight_names(model: tf.keras.Model) -> List[str]:
  """Signature names of the model's variables: `w<index>_<sanitised variable name>`.

  Args:
    model: a built Keras model.

  Returns:
    One unique name per entry of `model.variables`, in that order, made of `[A-Za-z0-9_]`.
  """
  names = []
  for i, v in enumerate(model.variables):
    base = v.name.split(':')[0]
    base = re.sub(r'[^A-Za-z0-9_]+', '_', base).strip('_')
    names.append(f'w{i:03d}_{base}')
  return names


def _masked_pairs(model: tf.keras.Model):
  """(kernel, mask) variable pairs of the masked layers of `model` (empty for plain Keras)."""
  pairs = []
  for layer in model.submodules:
    kernel, mask = getattr(layer, 'kernel', None), getattr(layer, 'mask', None)
    if isinstance(kernel, tf.Variable) and isinstance(mask, tf.Variable):
      if kernel.shape == mask.shape:
        pairs.append((kernel, mask))
  return pairs


class TrainModule(tf.Module):
  """Training, inference, weight exchange and checkpoint signatures around a Keras model.

  Args:
    model: a built Keras model mapping `[B, *input_shape]` float32 to `[B, num_classes]` logits.
    batch_size: the fixed batch size B of `train` and `infer`.
    learning_rate: initial SGD learning rate (changed on the device with
      `set_learning_rate`).
    metadata: JSON-serialisable export configuration, returned by the `metadata` signature.
    layer_updates: in the TFLite graph, update each masked kernel inside its backward pass
      (`tflite_export.layer_updates`); False: the plain step (gradients, then all updates).
    max_im2col_bytes: in the TFLite graph, run masked convolutions in batch slices whose im2col
      buffer fits in this many bytes (`tflite_export.chunked_conv`); 0: one CONV_2D each.
    builtin_weight_grads: in the TFLite graph, compute the weight gradients of masked
      convolutions from builtin ops (`tflite_export.filter_grad`); False: the select-TF
      `Conv2DBackpropFilter`.
    sap_storage: in the TFLite graph, how SAP ops select and keep their kept activations
      (a name of `tflite_export.static_sap.STORAGES`).
    gradient_clipping: AGC threshold of `train` (`fedmef_tf.agc`, as the simulated clients
      of the model's variant use it: `agc.clipping_for(variant)`), or None for plain SGD.
  """

  def __init__(
    self,
    model: tf.keras.Model,
    *,
    batch_size: int,
    learning_rate: float,
    metadata: Dict[str, Any],
    layer_updates: bool = True,
    max_im2col_bytes: int = chunked_conv.DEFAULT_MAX_WORKSPACE_BYTES,
    builtin_weight_grads: bool = True,
    sap_storage: str = static_sap.DEFAULT_STORAGE,
    gradient_clipping: Optional[float] = None,
  ):
    super().__init__(name='fedmef_train_module')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.model = model
    self.batch_size = int(batch_size)
    self.input_shape = tuple(int(d) for d in model.input_shape[1:])
    self.lr = tf.Variable(float(learning_rate), dtype=tf.float32, trainable=False, name=LR_NAME)
    self.names = weight_names(model)
    self._vars = list(model.variables)
    self._masked = _masked_pairs(model)
    self._prunable = masks_lib.prunable_layers(model)
    self._tracing_tflite = False  # True while `signatures(for_tflite=True)` traces
    self.layer_updates = bool(layer_updates)
    if int(max_im2col_bytes) < 0:
      raise ValueError(f'max_im2col_bytes must be >= 0, got {max_im2col_bytes}')
    self.max_im2col_bytes = int(max_im2col_bytes)
    self.builtin_weight_grads = bool(builtin_weight_grads)
    static_sap.storage(sap_storage)  # ValueError for an unknown name
    self.sap_storage = str(sap_storage)
    self.gradient_clipping = None if gradient_clipping is None else float(gradient_clipping)
    output_layer = model.layers[-1]
    # AGC leaves the output layer alone (`agc.unit_axes`), so do its in-backward updates.
    self._unclipped_layers = [output_layer] if output_layer in self._prunable else []
    by_ref = {v.ref(): n for n, v in zip(self.names, self._vars)}
    #: Output names of `dense_gradients`: `grad_<kernel weight name>`, prunable layer order.
    self.gradient_names = (
      ['grad_' + by_ref[layer.kernel.ref()] for layer in masks_lib.prunable_layers(model)]
      if self._masked
      else []
    )
    meta = dict(metadata)
    meta.update(
      {
        'batch_size': self.batch_size,
        'input_shape': list(self.input_shape),
        'weight_names': self.names,
        'gradient_names': self.gradient_names,
        'learning_rate': float(learning_rate),
        'layer_updates': self.layer_updates,
        'max_im2col_bytes': self.max_im2col_bytes,
        'builtin_weight_grads': self.builtin_weight_grads,
        'sap_storage': self.sap_storage,
        'gradient_clipping': self.gradient_clipping,
        'checkpoint_layout': checkpoint_lib.layout(
          self.names + [LR_NAME], [v.shape for v in self._vars + [self.lr]]
        ),
        'signatures': list(self.signature_names()),
      }
    )
    self.metadata_json = json.dumps(meta, sort_keys=True)
    self._build_functions()

  def _build_functions(self):
    b, shape = self.batch_size, self.input_shape
    x_spec = tf.TensorSpec([b, *shape], tf.float32, name='x')
    y_spec = tf.TensorSpec([b], tf.int32, name='y')
    weight_specs = [tf.TensorSpec(v.shape, v.dtype, name=n) for n, v in zip(self.names, self._vars)]
    entries = checkpoint_lib.layout(
      self.names + [LR_NAME], [v.shape for v in self._vars + [self.lr]]
    )
    checkpoint_spec = tf.TensorSpec(
      [checkpoint_lib.checkpoint_size(entries)], tf.float32, name='checkpoint'
    )

    self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
    self.infer = tf.function(self._infer, input_signature=[x_spec])
    self.set_learning_rate = tf.function(
      self._set_learning_rate, input_signature=[tf.TensorSpec([], tf.float32, name='lr')]
    )
    self.get_weights = tf.function(self._get_weights, input_signature=[])
    self.set_weights = tf.function(self._set_weights, input_signature=weight_specs)
    self.save = tf.function(self._save, input_signature=[])
    self.restore = tf.function(self._restore, input_signature=[checkpoint_spec])
    self.metadata = tf.function(self._metadata, input_signature=[])
    if self._masked:
      self.dense_gradients = tf.function(self._dense_gradients, input_signature=[x_spec, y_spec])

  # -- signature bodies --------------------------------------------------------------------------

  def _train(self, x, y):
    # The client's masked SGD step (`fedmef_tf.client.sgd_step`). In the TFLite graph each
    # masked kernel (and NSConv gain) is updated, clipped and masked inside its own backward
    # pass (`tflite_export.layer_updates`), which sgd_step reads from the strategy's
    # `layer_kernels`; the TF reference traces the plain step.
    if self._tracing_tflite and self.layer_updates:
      updates = layer_updates.InBackwardUpdates(
        self.lr, clipping=self.gradient_clipping, unclipped=self._unclipped_layers
      )
      context = execution.scope(execution.current().replace(layer_kernels=updates))
    else:
      context = contextlib.nullcontext()
    with context:
      loss, _ = client.sgd_step(
        self.model, self._prunable, x, y, self.lr, clipping=self.gradient_clipping
      )
    return {'loss': loss}

  def _infer(self, x):
    return {'logits': self.model(x, training=False)}

  def _set_learning_rate(self, lr):
    self.lr.assign(lr)
    return {'lr': tf.identity(self.lr)}

  def _get_weights(self):
    return {n: tf.identity(v) for n, v in zip(self.names, self._vars)}

  def _set_weights(self, *values):
    for v, value in zip(self._vars, values):
      v.assign(value)
    return {'n_weights': tf.constant(len(self._vars), tf.int32)}

  def _save(self):
    return {'checkpoint': checkpoint_lib.pack(self._vars + [self.lr])}

  def _restore(self, checkpoint):
    out = {}
    variables = self._vars + [self.lr]
    for n, v, value in zip(
      self.names + [LR_NAME], variables, checkpoint_lib.unpack(checkpoint, variables)
    ):
      v.assign(value)
      out[n] = tf.identity(value)
    return out

  def _dense_gradients(self, x, y):
    grads = growth.dense_kernel_gradients(self.model, x, y, losses.example_losses)
    return {name: g for name, g in zip(self.gradient_names, grads)}

  def _metadata(self):
    return {'json': tf.constant(self.metadata_json)}

  # -- helpers -----------------------------------------------------------------------------------

  def signatures(self, *, for_tflite: bool = True) -> Dict[str, Any]:
    """Concrete functions keyed by signature name, for `tf.saved_model.save`.

    Args:
      for_tflite: trace the SAP ops with the on-device activation storage of
        `tflite_export.static_sap` (top-k values and int32 indices, static shapes); False
        traces `fedmef_tf.sap` as it is (the TF reference of `tflite_export.verify`).
    """
    context = (
      tflite_tracing(self.max_im2col_bytes, self.builtin_weight_grads, self.sap_storage)
      if for_tflite
      else contextlib.nullcontext()
    )
    self._tracing_tflite = bool(for_tflite)
    try:
      with context:
        return {
          name: getattr(self, name).get_concrete_function() for name in self.signature_names()
        }
    finally:
      self._tracing_tflite = False

  def signature_names(self) -> List[str]:
    """Names of the exported signatures (`dense_gradients` only for models with masks)."""
    return list(_SIGNATURES) + (['dense_gradients'] if self._masked else [])
