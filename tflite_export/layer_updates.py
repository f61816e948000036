"""On-device `train` step in which every masked kernel is updated inside its own backward pass.

In the TFLite `train` graph of `tflite_export.train_module.TrainModule` the converter orders the
ops itself: control dependencies of the TF graph do not survive conversion, an op whose inputs
are all variable reads is scheduled early (in the forward pass) and every variable assignment
late (at the end of the step). With a plain `tape.gradient` followed by `v.assign_sub(lr * g)`
and `kernel.assign(kernel * mask)`, ResNet18's export kept every layer's kernel gradient alive
from its layer's backward pass to the end of the step, next to a second read of every mask (for
the final masking), the BaE term `2 lambda kernel * marked` of every layer (computed in the
forward pass) and, in FedMef's NSConv layers, the centred kernel `W - mean(W)` of every layer
(the converter merged its backward recomputation with the forward one). Each is kernel-sized:
43 MiB per copy for ResNet18's 11.2M kernel entries.

Under `InBackwardUpdates`, the `layer_kernels` of the execution strategy (`fedmef_tf.execution`)
with which the `train` signature of a TFLite export is traced (both the FedMef and the baseline
variant), every masked layer

* computes its effective kernel (`kernel * mask`, or NSConv's standardised `W_hat` with the
  formulas of `fedmef_tf.nsconv.standardize_kernel`) without a gradient of its own, keeping a
  few per-output-channel tensors for the backward pass;
* passes its input and that kernel through `_joint`, an identity whose gradient receives the
  layer input's gradient `dx` and the effective kernel's gradient together; it computes the
  kernel gradient (task gradient masked, plus BaE) and, for NSConv, the gain gradient
  (`fedmef_tf.nsconv.kernel_gradient`, NSConv's backward pass, as in the TF layer), applies
  the SGD step at once, with the mask enforced,

      kernel <- (kernel - lr * dL/dkernel) * mask,    gain <- gain - lr * dL/dgain,

  and returns `dx` plus a zero computed from `new_kernel` (`fedmef_tf.sap.after`; the assigned
  value, not a read of the variable: a read has no data input, so it orders nothing), so that
  nothing of the rest of the backward pass can run before the new kernel is computed: each
  layer's gradient buffers die with its update, and full-model gradients never coexist.

What a layer keeps from its forward pass for its backward pass, kernel-sized: `w = kernel *
mask` (float) and the mask and the BaE marked set as bool (1 byte per entry each), 6 bytes per
entry where the plain reads kept 16 (kernel, mask, marked set and the effective kernel, all
float: four copies of every kernel alive through the whole step, 172 MiB for ResNet18). This
takes masks and marked sets to be 0/1 (as everywhere in FedMef): the backward pass turns the
bools back into 1.0 / 0.0, and uses `w` where the plain step uses the kernel (the same numbers
on the active entries; the update multiplies the rest by 0). Everything kernel-sized that the
backward pass makes from these (the float masks, the BaE term, NSConv's `W_hat`) takes an input
computed from the layer's gradient (`fedmef_tf.sap.after`), or the converter would make it in
the forward pass and hold it. NSConv's `W_hat` is not kept at all: it is made from `w` and
per-channel tensors right before the layer's forward op (its input carried as a dependency) and
again, after the weight gradient, for the input gradient (the `input_grad_kernel` of the
layer's SAP op, `fedmef_tf.sap.sap_conv2d`) and the update, with the same operations on the
same numbers.

Biases and BatchNorm parameters are updated by the caller's step after `tape.gradient`
(`fedmef_tf.client.sgd_step`, which skips the variables of `updated_in_backward`).
The values are those of the plain step: the kernel is read once in the forward pass and
nothing else writes it during the step. The NSConv backward pass uses `W_hat` (which the input
gradient needs anyway) instead of the centred kernel: on the active entries the centred kernel
is `W_hat / s` with `s = g / sqrt(max(N var, eps))` per output channel (`s == 0` only where the
gain is 0, where the centred kernel's coefficient in the gradient is 0 too), and the centred
kernel's per-channel mean (0 up to rounding) is kept from the forward pass.

The TF reference of `tflite_export.verify` traces the plain step (this module is used only for
the TFLite graph), so the verifier compares the two.
"""

from __future__ import annotations

from typing import List, Optional

import tensorflow as tf

from fedmef_tf import agc
from fedmef_tf import bae
from fedmef_tf import execution
from fedmef_tf import nsconv
from fedmef_tf import sap

__all__ = ['InBackwardUpdates']


def _read(v) -> tf.Tensor:
  return tf.convert_to_tensor(v)


def _late_scalar_one(dep: tf.Tensor) -> tf.Tensor:
  """1.0, computed from `dep` (so that what uses it runs after `dep`)."""
  return sap.after(tf.constant(1.0, tf.float32), dep, always=True)


def _keep_for_backward(slot: dict, layer, w: tf.Tensor, mask: tf.Tensor) -> None:
  """What the backward pass of a layer keeps of its kernel: `w = kernel * mask` (float) and
  the mask and the BaE marked set as bool (1 byte per entry each)."""
  slot.update(
    layer=layer,
    w=w,
    mask_b=tf.not_equal(mask, 0.0),
    marked_b=tf.not_equal(_read(layer.marked), 0.0),
  )


def _late_masks(slot: dict, dep: tf.Tensor):
  """The float mask and marked set back from their bools, computed after `dep`."""
  one = _late_scalar_one(dep)
  return (tf.where(slot['mask_b'], one, 0.0), tf.where(slot['marked_b'], one, 0.0))


def _plain_kernel(layer, slot: dict) -> tf.Tensor:
  """`kernel * mask`, no gradient; `slot` gets what `_update` needs."""
  # Not stop_gradient: the tape must see the kernel behind `_joint`, or it never calls its
  # gradient where the layer's input needs none (the stem). No gradient flows past `_joint`.
  ks = _read(layer.kernel)
  mask = tf.stop_gradient(_read(layer.mask))
  w = ks * mask
  _keep_for_backward(slot, layer, w, mask)
  slot.update(normalize=False)
  return w


def _nsconv_kernel(layer, slot: dict) -> tf.Tensor:
  """NSConv `W_hat` (as `fedmef_tf.nsconv.masked_standardized_kernel`), no gradient;
  `slot` gets the forward tensors that `_update` needs (per-channel ones, `kernel * mask` and
  the bool masks), and `late_w_hat`, which recomputes `W_hat` from them in the backward pass."""
  # Not stop_gradient: the tape must see the kernel behind `_joint`, or it never calls its
  # gradient where the layer's input needs none (the stem). No gradient flows past `_joint`.
  ks = _read(layer.kernel)
  rank = ks.shape.rank
  depthwise = layer.depthwise
  axes = list(nsconv.reduction_axes(rank, depthwise))
  gain_shape = nsconv.gain_shape(ks.shape, depthwise)
  mask = tf.stop_gradient(_read(layer.mask))
  eps = tf.constant(nsconv.EPS, ks.dtype)
  gain = tf.stop_gradient(_read(layer.gain))
  if layer.act_gain != 1.0:
    gain = gain * layer.act_gain
  w = ks * mask
  if layer.center:
    mean = tf.reduce_mean(w, axis=axes, keepdims=True)  # per channel
  else:
    mean = tf.zeros_like(tf.reduce_sum(w, axis=axes, keepdims=True))
  centred = w - mean
  sum_sq = tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True)  # per channel
  inv = tf.math.rsqrt(tf.maximum(sum_sq, eps))
  gb = tf.reshape(gain, gain_shape)
  scale = gb * inv
  w_hat = centred * scale * mask
  # Per-channel scalars kept for the backward pass (not kernel-sized).
  mean_c = tf.reduce_mean(centred, axis=axes, keepdims=True)  # 0 up to rounding
  nonzero = tf.not_equal(scale, 0.0)
  inv_scale = tf.where(nonzero, 1.0 / tf.where(nonzero, scale, 1.0), 0.0)
  _keep_for_backward(slot, layer, w, mask)
  slot.update(
    normalize=True,
    center=layer.center,
    axes=axes,
    sum_sq=sum_sq,
    inv=inv,
    gb=gb,
    scale=scale,
    mean=mean,
    mean_c=mean_c,
    inv_scale=inv_scale,
  )

  def late_w_hat(dep, keep: bool = True):
    """`W_hat` again, the same operations on the same kept tensors (`w + 0` is `w`), made
    after `dep`; with `keep`, the first such result is reused by later calls."""
    if keep and 'w_hat' in slot:
      return slot['w_hat']
    mask_f, _ = _late_masks(slot, dep)
    value = (sap.after(w, dep, always=True) - mean) * scale * mask_f
    if keep:
      slot['w_hat'] = value
    return value

  slot['late_w_hat'] = late_w_hat
  return w_hat


def _update(slot: dict, upstream: tf.Tensor, lr: tf.Variable) -> tf.Tensor:
  """SGD step of the layer's kernel (and NSConv gain) from `upstream = dL/dW_eff`.

  Returns the new kernel (the assigned value).
  """
  layer, w = slot['layer'], slot['w']
  bae_lambda = _read(layer.bae_lambda)
  rate = _read(lr)
  # Every kernel-sized tensor below has an input computed from `upstream`: one computed from
  # forward tensors alone (e.g. the BaE term) would be scheduled by the converter in the
  # forward pass and held until here, for every layer at once.
  mask, marked = _late_masks(slot, upstream)
  # On the active entries `w` is the kernel itself; elsewhere the update multiplies by 0.
  # `(w * marked) * (2 lambda)`: `w` times the scalar first would run (and wait) in the forward.
  penalty = bae.penalty_gradient(w, marked, bae_lambda)
  u = upstream * mask
  clipping = slot.get('clipping')
  kernel_axes = nsconv.reduction_axes(w.shape.rank, layer.depthwise)
  if not slot['normalize']:
    d_k = u + penalty
  else:
    # NSConv's backward pass (`fedmef_tf.nsconv.kernel_gradient`) from `W_hat`: the centred
    # kernel on the active entries is `w_hat * inv_scale` (a per-channel factor), and the mean
    # of dL/dcentred comes from the kept per-channel mean of the centred kernel.
    w_hat = slot['late_w_hat'](upstream)
    d_w, d_gain = nsconv.kernel_gradient(
      u,
      w_hat,
      slot['sum_sq'],
      slot['inv'],
      slot['gb'],
      slot['scale'],
      slot['axes'],
      center=slot['center'],
      centred_factor=slot['inv_scale'],
      centred_mean=slot['mean_c'],
    )
    d_k = d_w * mask + penalty
    d_gain_var = tf.reshape(d_gain, tf.shape(layer.gain)) * layer.act_gain
    if clipping is not None:
      d_gain_var = agc.clip_gradient(d_gain_var, _read(layer.gain), (), clipping)
    layer.gain.assign_sub(rate * d_gain_var)
  if clipping is not None:
    d_k = agc.clip_gradient(d_k, w, tuple(kernel_axes), clipping)
  new_kernel = (w - rate * d_k) * mask
  layer.kernel.assign(new_kernel)
  return new_kernel


def _joint(x: tf.Tensor, w: tf.Tensor, slot: dict, lr: tf.Variable):
  """Identity on `(x, w)` (the layer op's input and kernel) whose gradient applies the kernel
  update and makes the input gradient wait for it (`sap.after(dx, new_kernel)`: the assigned
  value, not a read of the variable, which has no data input and orders nothing): the rest of
  the backward pass cannot run before this layer's update, nor can its buffers outlive it."""

  @tf.custom_gradient
  def _identity(xx, ww):
    def grad(dx, dw):
      if dw is None:  # no gradient reaches the kernel: keep the mask enforced all the same
        slot['layer'].kernel.assign(slot['w'])
        return dx, None
      new_kernel = _update(slot, dw, lr)
      return (None if dx is None else sap.after(dx, new_kernel, always=True)), None

    return (tf.identity(xx), tf.identity(ww)), grad

  return _identity(x, w)


class InBackwardUpdates(execution.LayerKernels):
  """Masked layers traced with a tape update their kernels in the backward pass (module
  docstring): the `layer_kernels` of the execution strategy of a TFLite `train` step.

  One object per traced step: it collects, per layer, what the layer's backward pass needs.

  Args:
    lr: the SGD learning rate variable.
    clipping: AGC threshold (`fedmef_tf.agc`) applied to each kernel's and gain's gradient
      before its update, unit by unit as in the TF step; None: plain SGD.
    unclipped: masked layers whose updates are not clipped (the output layer, as in
      `agc.unit_axes`).

  Attributes:
    updated: the variables updated so (kernels, NSConv gains), in the order the layers ran:
      the caller must neither apply a gradient to these nor mask them again
      (`updated_in_backward`, which `fedmef_tf.client.sgd_step` reads).
  """

  def __init__(self, lr: tf.Variable, *, clipping: Optional[float] = None, unclipped=()):
    self.lr = lr
    self.clipping = clipping
    self.updated: List[tf.Variable] = []
    self._unclipped_ids = {id(layer) for layer in unclipped}
    self._slots = {}

  def updated_in_backward(self) -> List[tf.Variable]:
    """`updated`: the kernels and NSConv gains updated (clipped and masked) in the backward
    pass (`fedmef_tf.execution.LayerKernels.updated_in_backward`)."""
    return list(self.updated)

  def _kernel(self, layer, slot: dict) -> tf.Tensor:
    """The layer's effective kernel, made without a gradient of its own; `slot` gets what
    the update needs."""
    self.updated.append(layer.kernel)
    slot['clipping'] = None if id(layer) in self._unclipped_ids else self.clipping
    if layer.normalize:
      self.updated.append(layer.gain)
      return _nsconv_kernel(layer, slot)
    return _plain_kernel(layer, slot)

  def apply(self, layer, inputs: tf.Tensor, op) -> tf.Tensor:
    """`layer`'s op on `inputs`, its kernel updated inside the op's backward pass."""
    slot = self._slots.setdefault(id(layer), {})
    if 'w' in slot:
      raise ValueError(
        f'{layer.name}: a masked layer called twice in one train step is not '
        'supported by tflite_export.layer_updates (use layer_updates=False)'
      )
    w = self._kernel(layer, slot)
    if 'late_w_hat' in slot:
      # W_hat once more, made only once the layer's input exists: the one from `_kernel` (then
      # unused, dropped by the converter) would be made with every other layer's at the start
      # of the step and held until this layer runs.
      w = slot['late_w_hat'](inputs, keep=False)
    inputs, w = _joint(inputs, w, slot, self.lr)
    if 'late_w_hat' in slot:  # the layer's SAP op recomputes W_hat for its input gradient
      return op(inputs, w, input_grad_kernel=slot['late_w_hat'])
    return op(inputs, w)
