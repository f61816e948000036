"""Depthwise convolution gradients of a TFLite `train` graph from builtin ops only.

TFLite has builtin kernels for the depthwise convolution itself (`DEPTHWISE_CONV_2D`) but not
for its gradients: `DepthwiseConv2dNativeBackpropFilter` and `DepthwiseConv2dNativeBackpropInput`
are select-TF operators, so a MobileNetV2 `train` graph made with them needs the select-TF-ops
runtime. The functions here compute the same values from builtins.

Weight gradient (`depthwise_filter_grad`), channel multiplier m, output channel `c * m + k`:

    dW[i, j, c, k] = sum over batch and output positions r, q of
                     x[b, r*s_h + i - p_t, q*s_w + j - p_l, c] * dy[b, r, q, c*m + k]

one kernel tap at a time: the input rows and columns the tap reads are cut from `x` (a GATHER
of the rows whose indices carry a zero computed from the previous tap's result, so the cuts run
one after the other, then a strided slice of the columns), padded back to the output's size
where the tap reaches into the padding, multiplied with `dy` and summed over batch and
positions. Working memory: one tap's cut of `x` and its product with `dy`.

Input gradient (`depthwise_input_grad`): a depthwise convolution of `dy` with the spatially
flipped kernel. For stride s, `dy` is first spread out with s - 1 zero rows (columns) after
each row (column), then padded by `k - 1 - p` before and whatever completes the input's size
after, and convolved with stride 1, 'VALID'. Ops: RESHAPE, PAD, STRIDED_SLICE, REVERSE_V2,
DEPTHWISE_CONV_2D (one per channel multiplier entry, summed).

`depthwise_conv2d` is `tf.nn.depthwise_conv2d` with these two as its gradient;
`BUILTIN_DEPTHWISE_OPS` holds all three as the `depthwise` part of an execution strategy
(`fedmef_tf.execution.Strategy`, set by `tflite_export.train_module.tflite_strategy`). The values
equal TF's up to the order of the sums.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap
from tflite_export import filter_grad

__all__ = [
  'depthwise_filter_grad',
  'depthwise_input_grad',
  'depthwise_conv2d',
  'BUILTIN_DEPTHWISE_OPS',
]


def _static(t: tf.Tensor) -> bool:
  return t.shape.is_fully_defined()


@tf.autograph.experimental.do_not_convert  # static Python loops over kernel taps
def depthwise_filter_grad(
  x: tf.Tensor, dy: tf.Tensor, w_shape: Sequence[int], strides: Sequence[int], padding: str
) -> tf.Tensor:
  """`DepthwiseConv2dNativeBackpropFilter(x, w_shape, dy, strides, padding)` from builtins.

  Args:
    x: float32 `[B, H, W, C]` with a fully known shape (else the TF op is used).
    dy: float32 `[B, H_out, W_out, C * m]`.
    w_shape: `[k_h, k_w, C, m]` (ints).
    strides: 4-tuple, NHWC order (dilation 1).
    padding: 'SAME' or 'VALID'.

  Returns:
    float32 `[k_h, k_w, C, m]`.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  dy = tf.convert_to_tensor(dy, tf.float32)
  w_shape = [int(d) for d in w_shape]
  if not (_static(x) and _static(dy)):
    return tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
      input=x, filter_sizes=w_shape, out_backprop=dy, strides=strides, padding=padding
    )
  batch, h, w, c = x.shape.as_list()
  _, h_out, w_out, _ = dy.shape.as_list()
  k_h, k_w, _, m = w_shape
  s_h, s_w = int(strides[1]), int(strides[2])
  p_t = filter_grad.pad_before(h, h_out, k_h, s_h, padding)
  p_l = filter_grad.pad_before(w, w_out, k_w, s_w, padding)
  dy_split = tf.reshape(dy, [batch, h_out, w_out, c, m])
  taps, previous = [], dy_split  # the first cut waits for dy, each later one for the tap before
  for i in range(k_h):
    r0, r1 = filter_grad.tap_range(h, h_out, i, s_h, p_t)
    for j in range(k_w):
      c0, c1 = filter_grad.tap_range(w, w_out, j, s_w, p_l)
      if r0 > r1 or c0 > c1:  # the tap reads only padding
        taps.append(tf.zeros([c, m], tf.float32))
        continue
      rows = sap.after(
        tf.range(r0 * s_h + i - p_t, r1 * s_h + i - p_t + 1, s_h), previous, always=True
      )
      col_start = c0 * s_w + j - p_l
      part = tf.gather(x, rows, axis=1)[:, :, col_start : c1 * s_w + j - p_l + 1 : s_w, :]
      if (r0, r1, c0, c1) != (0, h_out - 1, 0, w_out - 1):
        part = tf.pad(part, [[0, 0], [r0, h_out - 1 - r1], [c0, w_out - 1 - c1], [0, 0]])
      part = tf.reshape(part, [batch, h_out, w_out, c, 1])
      previous = tf.reduce_sum(part * dy_split, axis=[0, 1, 2])  # [C, m]
      taps.append(previous)
  return tf.reshape(tf.stack(taps), [k_h, k_w, c, m])


def _spread(t: tf.Tensor, stride: int, axis: int) -> tf.Tensor:
  """`t` `[B, H, W, C]` with `stride - 1` zero rows (axis 1) or columns (axis 2) after each
  row or column, the trailing ones cut: `(n - 1) * stride + 1` along `axis`."""
  if stride == 1:
    return t
  b, h, w, c = t.shape.as_list()
  if axis == 1:
    t = tf.pad(tf.reshape(t, [b, h, 1, w * c]), [[0, 0], [0, 0], [0, stride - 1], [0, 0]])
    t = tf.reshape(t, [b, h * stride, w, c])
    return t[:, : (h - 1) * stride + 1]
  t = tf.pad(tf.reshape(t, [b * h, w, 1, c]), [[0, 0], [0, 0], [0, stride - 1], [0, 0]])
  t = tf.reshape(t, [b, h, w * stride, c])
  return t[:, :, : (w - 1) * stride + 1]


def _fit(t: tf.Tensor, axis: int, before: int, after: int) -> tf.Tensor:
  """Pads (positive) or cuts (negative) `before` / `after` entries of `axis` of a 4-D tensor."""
  if before < 0 or after < 0:
    n = t.shape[axis]
    start, stop = max(-before, 0), n - max(-after, 0)
    t = t[:, start:stop] if axis == 1 else t[:, :, start:stop]
  if before > 0 or after > 0:
    pads = [[0, 0]] * 4
    pads[axis] = [max(before, 0), max(after, 0)]
    t = tf.pad(t, pads)
  return t


@tf.autograph.experimental.do_not_convert
def depthwise_input_grad(
  dy: tf.Tensor, w: tf.Tensor, x_shape: Sequence[int], strides: Sequence[int], padding: str
) -> tf.Tensor:
  """`DepthwiseConv2dNativeBackpropInput(x_shape, w, dy, strides, padding)` from builtins.

  Args:
    dy: float32 `[B, H_out, W_out, C * m]` with a fully known shape (else the TF op is used).
    w: float32 `[k_h, k_w, C, m]`, fully known shape.
    x_shape: `[B, H, W, C]` (ints).
    strides: 4-tuple, NHWC order (dilation 1).
    padding: 'SAME' or 'VALID'.

  Returns:
    float32 `[B, H, W, C]`.
  """
  dy = tf.convert_to_tensor(dy, tf.float32)
  w = tf.convert_to_tensor(w, tf.float32)
  static_shape = isinstance(x_shape, (list, tuple)) and all(isinstance(d, int) for d in x_shape)
  if not (static_shape and _static(dy) and _static(w)):
    return tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
      input_sizes=x_shape, filter=w, out_backprop=dy, strides=strides, padding=padding
    )
  _, h, wd, _ = [int(d) for d in x_shape]
  _, h_out, w_out, _ = dy.shape.as_list()
  k_h, k_w, _, m = w.shape.as_list()
  s_h, s_w = int(strides[1]), int(strides[2])
  p_t = filter_grad.pad_before(h, h_out, k_h, s_h, padding)
  p_l = filter_grad.pad_before(wd, w_out, k_w, s_w, padding)
  flipped = tf.reverse(w, axis=[0, 1])
  total = None
  for k in range(m):
    part = dy if m == 1 else dy[:, :, :, k::m]  # output channels c * m + k
    part = _spread(_spread(part, s_h, 1), s_w, 2)
    top = k_h - 1 - p_t
    left = k_w - 1 - p_l
    part = _fit(part, 1, top, h + k_h - 1 - top - part.shape[1])
    part = _fit(part, 2, left, wd + k_w - 1 - left - part.shape[2])
    kernel = flipped if m == 1 else flipped[:, :, :, k : k + 1]
    out = tf.nn.depthwise_conv2d(part, kernel, [1, 1, 1, 1], 'VALID')
    total = out if total is None else total + out
  return total


def depthwise_conv2d(x: tf.Tensor, w: tf.Tensor, strides: Sequence[int], padding: str) -> tf.Tensor:
  """`tf.nn.depthwise_conv2d(x, w, strides, padding)` whose gradients are the builtin-op
  `depthwise_input_grad` and `depthwise_filter_grad` above.

  Args:
    x: float32 `[B, H, W, C]`; w: float32 `[k_h, k_w, C, m]`; strides: 4-tuple NHWC;
    padding: 'SAME' or 'VALID'.
  """
  strides = [int(s) for s in strides]

  @tf.custom_gradient
  def _op(x, w):
    y = tf.nn.depthwise_conv2d(x, w, strides, padding)

    def grad(dy):
      x_shape = x.shape.as_list() if _static(x) else tf.shape(x)
      return (
        depthwise_input_grad(dy, w, x_shape, strides, padding),
        depthwise_filter_grad(x, dy, w.shape.as_list(), strides, padding),
      )

    return y, grad

  return _op(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(w, tf.float32))


#: The three depthwise ops of masked depthwise layers, from builtin TFLite ops.
BUILTIN_DEPTHWISE_OPS = execution.DepthwiseOps(
  conv=depthwise_conv2d, input_grad=depthwise_input_grad, filter_grad=depthwise_filter_grad
)
