"""Normalized sparse convolution (NSConv): scaled weight standardisation of a sparse kernel.

FedMef (Huang et al., CVPR 2024) removes BatchNorm and keeps activations centred by standardising
each output channel of every (sparse) convolution kernel, as in scaled weight standardisation
(Brock et al., 2021), with the statistics taken over the whole fan-in, pruned zeros included:

    W_hat[o] = g[o] * (W[o] - mean(W[o])) / sqrt(max(N * var(W[o]), 1e-4)) * M[o]

where N is the fan-in of output channel o (k_h * k_w * C_in for Conv2D, k_h * k_w for
DepthwiseConv2D, d_in for Dense), `var` is the population variance (divide by N) and the mask M
is applied again so that pruned entries stay exactly zero in the kernel the op uses.

`kernel_gradient` is NSConv's backward pass (the gradients of the sparse kernel and the gain
from that of `W_hat`), used by the masked layers' kernel (`masked_standardized_kernel`: the
standardised sparse kernel with its custom gradient, BaE's penalty included) and by the
in-backward kernel updates of a TFLite `train` step (`tflite_export.layer_updates`).

Output centring (`center_spatial`): the models subtract, from every NSConv output but the
stem's, its per-example, per-channel mean over height and width, before the bias. Centring the
kernel removes the part of the input that is common to a whole patch; it cannot remove an offset
that one output channel carries over the whole image (after a ReLU, every channel has one, and
its size depends on the image: on images with a large uniform background it dominates the
channel). Such offsets pass unchanged through the identity shortcuts and reach the classifier as
a large common component of the pooled features, which slows learning (a linear layer on
uncentred inputs). BatchNorm removes them with batch statistics; `center_spatial` does it per
example, so it needs no batch, behaves the same in training and inference, keeps no state and
caches nothing for the backward pass (its gradient is `dy - mean(dy)`).

`center=False` skips the subtraction of the mean (the kernel is only scaled to unit norm per
output channel). The models use it for a layer whose input is already centred per channel, the
stem behind the input normalisation: there centring has no mean shift to remove, and it would
make the output scale depend on the data, because a zero-sum kernel passes only the part of a
patch that differs from the patch mean (little, for smooth images). A unit-norm kernel with
random signs passes the input's second moment in expectation, whatever the correlation between
neighbouring pixels, so the stem's output has unit variance on any normalised images.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import tensorflow as tf

from fedmef_tf import bae

__all__ = [
  'standardize_kernel',
  'masked_standardized_kernel',
  'kernel_gradient',
  'center_spatial',
  'EPS',
  'reduction_axes',
  'gain_shape',
]

#: Floor of N * var(W[o]) (a sum of squares of kernel entries), unitless.
EPS = 1e-4


def gain_shape(kernel_shape, depthwise: bool) -> List[int]:
  """Shape that broadcasts a per-output-channel gain against a kernel of `kernel_shape`:
  1 on the fan-in axes (`reduction_axes`), the kernel's size on the output-channel axes."""
  rank = len(kernel_shape)
  shape = [1] * rank
  if depthwise:
    shape[2], shape[3] = int(kernel_shape[2]), int(kernel_shape[3])
  else:
    shape[-1] = int(kernel_shape[-1])
  return shape


def reduction_axes(rank: int, depthwise: bool) -> Tuple[int, ...]:
  """Axes of a kernel that form the fan-in of one output channel.

  Args:
      rank: kernel rank (4 for convolutions, 2 for Dense).
      depthwise: the kernel is a DepthwiseConv2D kernel `(kh, kw, c_in, multiplier)`, whose
          output channel (c, m) has fan-in kh * kw.

  Returns:
      The axes to reduce over.
  """
  if depthwise:
    if rank != 4:
      raise ValueError(f'depthwise kernels have rank 4, got {rank}')
    return (0, 1)
  return tuple(range(rank - 1))


def standardize_kernel(
  kernel: tf.Tensor,
  mask: tf.Tensor,
  gain: tf.Tensor,
  depthwise: bool = False,
  *,
  center: bool = True,
  return_scale: bool = False,
) -> Union[tf.Tensor, Tuple[tf.Tensor, tf.Tensor]]:
  """Scaled weight standardisation of a sparse kernel, per output channel.

  Differentiable with ordinary autodiff (the gradient through mean and variance reaches every
  entry; the caller's masked-kernel gradient removes it at pruned positions).

  Args:
      kernel: float tensor, the effective sparse kernel W (already `kernel * mask`), shape
          `(kh, kw, c_in, c_out)` (Conv2D), `(kh, kw, c_in, mult)` (depthwise) or
          `(d_in, d_out)` (Dense).
      mask: 0/1 tensor of the same shape as `kernel`.
      gain: per-output-channel gain g, shape `(c_out,)`, `(c_in * mult,)` for depthwise
          (channel index c * mult + m, the order of `tf.nn.depthwise_conv2d`'s output), or
          `(d_out,)`.
      depthwise: whether `kernel` is a depthwise kernel.
      center: subtract the per-channel mean (the FedMef formula); False only scales.
      return_scale: also return `g / sqrt(max(N var, EPS))`, broadcastable to the kernel.

  Returns:
      W_hat, same shape and dtype as `kernel`; with `return_scale`, `(W_hat, scale)` where scale
      has the kernel's rank with size 1 on the reduced axes.
  """
  kernel = tf.convert_to_tensor(kernel)
  mask = tf.cast(mask, kernel.dtype)
  gain = tf.cast(gain, kernel.dtype)
  rank = kernel.shape.rank
  axes = list(reduction_axes(rank, depthwise))
  if center:
    centred = kernel - tf.reduce_mean(kernel, axis=axes, keepdims=True)
  else:
    centred = kernel
  sum_sq = tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True)  # == N * var
  inv_std = tf.math.rsqrt(tf.maximum(sum_sq, tf.cast(EPS, kernel.dtype)))
  scale = tf.reshape(gain, gain_shape(kernel.shape, depthwise)) * inv_std
  w_hat = centred * scale * mask
  if return_scale:
    return w_hat, scale
  return w_hat


def kernel_gradient(
  u: tf.Tensor,
  centred: tf.Tensor,
  sum_sq: tf.Tensor,
  inv_std: tf.Tensor,
  gain: tf.Tensor,
  scale: tf.Tensor,
  axes,
  *,
  center: bool,
  centred_factor: Optional[tf.Tensor] = None,
  centred_mean: Optional[tf.Tensor] = None,
) -> Tuple[tf.Tensor, tf.Tensor]:
  """NSConv's backward pass: the gradients of the kernel and the gain from that of `W_hat`.

  With W the sparse kernel (`kernel * mask`), c = W - mean(W) (c = W when not `center`),
  S = sum(c^2), s = g / sqrt(max(S, EPS)) per output channel and W_hat = s * c * M
  (`standardize_kernel`), and u = dL/dW_hat * M:

      dL/dg = sum(u * c) / sqrt(max(S, EPS))
      dL/dc = s * u + 2 * c * dL/dS,  dL/dS = -sum(u * c) * g / 2 * max(S, EPS)^(-3/2)
              (0 where S < EPS)
      dL/dW = dL/dc - mean(dL/dc)        (dL/dW = dL/dc when not `center`)

  The masked layer (`masked_standardized_kernel`) passes the centred
  kernel c itself. The in-backward update of a TFLite `train` step
  (`tflite_export.layer_updates`), which keeps no centred kernel, passes `W_hat` with
  `centred_factor = 1 / s` (0 where s is 0; on the active entries c = W_hat / s, and u is 0
  elsewhere) and the kept per-channel `centred_mean = mean(c)`, from which the mean of dL/dc
  is `s * mean(u) + 2 * dL/dS * mean(c)`.

  Args:
      u: float `dL/dW_hat * mask`, the kernel's shape.
      centred: c, or `W_hat` with `centred_factor` (the kernel's shape).
      sum_sq: S, per output channel (the kernel's rank, size 1 on `axes`).
      inv_std: `1 / sqrt(max(S, EPS))`, same shape.
      gain: g broadcast to that shape (`gain_shape`).
      scale: s = `gain * inv_std`.
      axes: the fan-in axes (`reduction_axes`).
      center: whether c is centred (the mean of dL/dc is removed).
      centred_factor: None, or the per-channel factor that turns `centred` into c.
      centred_mean: None (the mean of dL/dc is taken over the kernel), or the per-channel
          mean of c, from which that mean is computed per channel.

  Returns:
      `(dL/dW, dL/dg)`: the kernel's shape (not yet masked), and g's broadcast shape.
  """
  d_scale = tf.reduce_sum(u * centred, axis=axes, keepdims=True)  # dL/ds
  if centred_factor is not None:
    d_scale = d_scale * centred_factor
  d_gain = d_scale * inv_std
  eps = tf.constant(EPS, sum_sq.dtype)
  d_sum_sq = tf.where(
    sum_sq > eps, -0.5 * d_scale * gain * inv_std * inv_std * inv_std, tf.zeros_like(sum_sq)
  )
  if centred_factor is None:
    d_centred = scale * u + 2.0 * d_sum_sq * centred
  else:
    d_centred = scale * u + (2.0 * d_sum_sq * centred_factor) * centred
  if not center:
    return d_centred, d_gain
  if centred_mean is None:
    return d_centred - tf.reduce_mean(d_centred, axis=axes, keepdims=True), d_gain
  mean_d = scale * tf.reduce_mean(u, axis=axes, keepdims=True) + 2.0 * d_sum_sq * centred_mean
  return d_centred - mean_d, d_gain


def masked_standardized_kernel(
  kernel: tf.Tensor,
  mask: tf.Tensor,
  marked: tf.Tensor,
  bae_lambda: tf.Tensor,
  gain: tf.Tensor,
  depthwise: bool = False,
  center: bool = True,
) -> tf.Tensor:
  """NSConv kernel `standardize_kernel(kernel * mask, mask, gain)`, masked-kernel gradient.

  Same value as `standardize_kernel(fedmef_tf.sparse_layers.masked_kernel(kernel, mask,
  marked, bae_lambda), mask, gain, depthwise)` and the same gradients, but as one custom
  gradient that caches nothing of kernel size: the backward pass recomputes the channel
  statistics from `kernel` (a read of the variable, resident anyway) instead of keeping the
  centred kernel and its products alive from the forward pass (for ResNet18 that is tens of MB
  per copy).

  The gradients of W = kernel * mask and of the gain are NSConv's backward pass
  (`kernel_gradient`, from the recomputed centred kernel), and

      dL/dkernel = dL/dW * mask + 2 * bae_lambda * kernel * marked

  (the second term is BaE's penalty, `fedmef_tf.bae.penalty_gradient`). The masked layers
  (`fedmef_tf.sparse_layers.MaskedLayer` with `normalize=True`) make their kernel with it.

  Args:
      kernel: float32 raw kernel, shape as in `standardize_kernel`.
      mask: 0/1 float32, same shape.
      marked: 0/1 float32, same shape (BaE marked set).
      bae_lambda: float32 scalar.
      gain: per-output-channel gain, shape `(n_out,)` (see `standardize_kernel`).
      depthwise: whether the kernel is a depthwise kernel.
      center: subtract the per-channel mean (see `standardize_kernel`).

  Returns:
      W_hat, shape of `kernel`.
  """
  rank = kernel.shape.rank
  axes = list(reduction_axes(rank, depthwise))
  g_shape = gain_shape(kernel.shape, depthwise)
  mask = tf.stop_gradient(tf.cast(mask, kernel.dtype))
  marked = tf.stop_gradient(tf.cast(marked, kernel.dtype))
  bae_lambda = tf.stop_gradient(tf.cast(bae_lambda, kernel.dtype))
  eps = tf.constant(EPS, kernel.dtype)

  def stats(k, g):
    w = k * mask
    centred = w - tf.reduce_mean(w, axis=axes, keepdims=True) if center else w
    sum_sq = tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True)
    inv_std = tf.math.rsqrt(tf.maximum(sum_sq, eps))
    return centred, sum_sq, inv_std, tf.reshape(g, g_shape)

  @tf.custom_gradient
  def _kernel(k, g):
    ks, gs = tf.stop_gradient(k), tf.stop_gradient(g)
    centred, _, inv_std, g_b = stats(ks, gs)

    def grad(upstream):
      # The dependency on upstream keeps the executor from running this recomputation
      # (it needs forward tensors only) during the forward pass and holding its results.
      with tf.control_dependencies([upstream]):
        c, sum_sq, inv, gb = stats(tf.identity(ks), gs)
        penalty = bae.penalty_gradient(ks, marked, bae_lambda)
      u = upstream * mask
      d_w, d_gain = kernel_gradient(u, c, sum_sq, inv, gb, gb * inv, axes, center=center)
      d_k = d_w * mask + penalty
      return d_k, tf.reshape(d_gain, tf.shape(gs))

    return centred * (g_b * inv_std) * mask, grad

  return _kernel(kernel, gain)


def center_spatial(y: tf.Tensor) -> tf.Tensor:
  """`y - mean(y over height and width)`, per example and channel; caches nothing.

  Args:
      y: float tensor `[B, H, W, C]`.

  Returns:
      The centred tensor, `y`'s shape. Its gradient is `dy - mean(dy over H, W)` (the
      centring is a linear projection and its own adjoint), computed from `dy` alone.
  """

  @tf.custom_gradient
  def _center(v):
    v = tf.stop_gradient(v)

    def grad(dy):
      return dy - tf.reduce_mean(dy, axis=[1, 2], keepdims=True)

    return v - tf.reduce_mean(v, axis=[1, 2], keepdims=True), grad

  return _center(y)
