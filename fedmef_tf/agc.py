"""Adaptive gradient clipping (AGC) of the normaliser-free FedMef networks.

Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets, ICML 2021) make BatchNorm-free networks stable at large learning rates
and small batches by clipping each *unit's* gradient relative to that unit's weights:

    G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i    where ||G_i|| > lambda * max(||W_i||, eps)

so that one SGD step changes no unit by more than `learning_rate * lambda` of its norm. A unit
is one output channel of a kernel: the fan-in axes of `fedmef_tf.nsconv.reduction_axes` (all
but the last axis of a Conv2D or Dense kernel, the two spatial axes of a depthwise kernel); a
vector (bias, NSConv gain) is one unit as a whole; norms are Frobenius norms. As in NFNets the
classifier (the model's output layer) is not clipped.

FedMef's NSConv makes the forward pass invariant to the scale of each output channel of the raw
kernel, so the ratio ||G_i|| / ||W_i|| is exactly the quantity that sets how far a step turns
the channel's weights; a large-learning-rate step on a small batch can turn it by more than a
radian and the network leaves the region where its signal propagation holds. BatchNorm bounds
the activations instead; the baseline variants are not clipped.

Constants: `CLIPPING = 0.16`, the largest of the thresholds NFNets report as stable (their
figure of clipping threshold against batch size: smaller batches tolerate larger thresholds,
0.16 at the smallest batch they tried); `EPS = 1e-3` as in NFNets, so that a zero-initialised
vector (a bias) can start moving.

Works on masked kernels: the masked entries of a kernel and of its gradient are zero, so the
norms are those of the active entries, and a scaled gradient stays zero where the mask is.
"""

from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from fedmef_tf import masks
from fedmef_tf import nsconv

#: Clipping threshold lambda (see the module docstring for where it comes from).
CLIPPING = 0.16

#: Floor of the weight norm of a unit.
EPS = 1e-3

#: Axes of one unit per variable: a tuple of axes, () for a vector taken whole, None: not clipped.
UnitAxes = Optional[Tuple[int, ...]]


def clipping_for(variant: str) -> Optional[float]:
  """The clipping threshold a model variant trains with: `CLIPPING` for 'fedmef' (no
  normaliser), None (no clipping) for 'baseline' and the other BatchNorm models."""
  return CLIPPING if variant == 'fedmef' else None


def unit_axes(model: tf.keras.Model) -> List[UnitAxes]:
  """The unit axes of each of `model.trainable_weights`, in that order.

  Kernels of prunable layers are clipped per output channel; every other variable of rank
  <= 1 whole, higher-rank ones per last-axis slice; the output layer's variables are not
  clipped (None).

  Args:
    model: a built Keras model.

  Returns:
    A list parallel to `model.trainable_weights`.
  """
  output_layer = model.layers[-1]
  excluded = {v.ref() for v in output_layer.trainable_weights}
  kernel_axes = {}
  for layer in masks.prunable_layers(model):
    kernel_axes[layer.kernel.ref()] = nsconv.reduction_axes(
      layer.kernel.shape.rank, layer.depthwise
    )
  out = []
  for v in model.trainable_weights:
    if v.ref() in excluded:
      out.append(None)
    elif v.ref() in kernel_axes:
      out.append(tuple(kernel_axes[v.ref()]))
    elif v.shape.rank <= 1:
      out.append(())
    else:
      out.append(tuple(range(v.shape.rank - 1)))
  return out


def unitwise_norm(x: tf.Tensor, axes: Tuple[int, ...]) -> tf.Tensor:
  """Frobenius norm of each unit of `x` (over `axes`, kept as size-1 axes; () = whole tensor)."""
  x = tf.convert_to_tensor(x)
  if not axes:
    return tf.norm(tf.reshape(x, [-1]))
  return tf.sqrt(tf.reduce_sum(tf.square(x), axis=list(axes), keepdims=True))


def clip_gradient(
  grad: tf.Tensor, weight: tf.Tensor, axes: UnitAxes, clipping: float = CLIPPING, eps: float = EPS
) -> tf.Tensor:
  """AGC of one gradient against its weight (see the module docstring).

  Args:
    grad: gradient, the weight's shape.
    weight: the variable's current value.
    axes: unit axes of `unit_axes`; None returns `grad` unchanged.
    clipping: lambda (> 0).
    eps: floor of a unit's weight norm.

  Returns:
    The clipped gradient, `grad`'s shape and dtype.
  """
  if axes is None or grad is None:
    return grad
  grad = tf.convert_to_tensor(grad)
  max_norm = tf.maximum(unitwise_norm(weight, axes), eps) * clipping
  grad_norm = unitwise_norm(grad, axes)
  factor = tf.where(
    grad_norm > max_norm, max_norm / tf.maximum(grad_norm, 1e-6), tf.ones_like(grad_norm)
  )
  return grad * factor


def clip_gradients(
  grads: Sequence[Optional[tf.Tensor]],
  variables: Sequence[tf.Variable],
  axes: Sequence[UnitAxes],
  clipping: float = CLIPPING,
  eps: float = EPS,
) -> List[Optional[tf.Tensor]]:
  """`clip_gradient` over parallel lists (None gradients stay None)."""
  if not len(grads) == len(variables) == len(axes):
    raise ValueError(
      f'clip_gradients: {len(grads)} gradients, {len(variables)} variables and '
      f'{len(axes)} unit axes'
    )
  return [clip_gradient(g, v, a, clipping, eps) for g, v, a in zip(grads, variables, axes)]


def clip_model_gradients(
  model: tf.keras.Model,
  grads: Sequence[Optional[tf.Tensor]],
  clipping: float = CLIPPING,
  eps: float = EPS,
  skip: Sequence[tf.Variable] = (),
) -> List[Optional[tf.Tensor]]:
  """AGC of the gradients of `model.trainable_weights` (see `unit_axes`).

  The weight of a prunable kernel is `kernel * mask`, so that entries under the mask (zero
  after every step, but a caller may have loaded other values) do not count in its norms.

  Args:
    model: the model the gradients belong to.
    grads: gradients parallel to `model.trainable_weights` (None allowed).
    clipping, eps: see `clip_gradient`.
    skip: variables whose gradients are returned unchanged (updated elsewhere).

  Returns:
    The clipped gradients, same order.
  """
  masked = {layer.kernel.ref(): layer for layer in masks.prunable_layers(model)}
  skipped = {v.ref() for v in skip}
  out = []
  for g, v, axes in zip(grads, model.trainable_weights, unit_axes(model)):
    if g is None or v.ref() in skipped:
      out.append(g)
      continue
    layer = masked.get(v.ref())
    weight = v * layer.mask if layer is not None else v
    out.append(clip_gradient(g, weight, axes, clipping, eps))
  return out
