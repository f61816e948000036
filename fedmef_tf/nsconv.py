"""Normalized sparse convolution (NSConv): scaled weight standardisation of a sparse kernel.

FedMef (Huang et al., CVPR 2024) removes BatchNorm and keeps activations centred by standardising
each output channel of every (sparse) convolution kernel, as in scaled weight standardisation
(Brock et al., 2021), with the statistics taken over the whole fan-in, pruned zeros included:

    W_hat[o] = g[o] * (W[o] - mean(W[o])) / sqrt(max(N * var(W[o]), 1e-4)) * M[o]

where N is the fan-in of output channel o (k_h * k_w * C_in for Conv2D, k_h * k_w for
DepthwiseConv2D, d_in for Dense), `var` is the population variance (divide by N) and the mask M
is applied again so that pruned entries stay exactly zero in the kernel the op uses.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import tensorflow as tf

__all__ = ["standardize_kernel", "EPS", "reduction_axes", "gain_shape"]

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
            raise ValueError(f"depthwise kernels have rank 4, got {rank}")
        return (0, 1)
    return tuple(range(rank - 1))


def standardize_kernel(
    kernel: tf.Tensor,
    mask: tf.Tensor,
    gain: tf.Tensor,
    depthwise: bool = False,
    *,
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
    mean = tf.reduce_mean(kernel, axis=axes, keepdims=True)
    centred = kernel - mean
    sum_sq = tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True)  # == N * var
    inv_std = tf.math.rsqrt(tf.maximum(sum_sq, tf.cast(EPS, kernel.dtype)))
    scale = tf.reshape(gain, gain_shape(kernel.shape, depthwise)) * inv_std
    w_hat = centred * scale * mask
    if return_scale:
        return w_hat, scale
    return w_hat
