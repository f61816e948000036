"""Convolution weight gradients of a TFLite `train` graph from builtin ops only.

TFLite has no builtin kernel for `Conv2DBackpropFilter`; a converted training graph runs it as a
select-TF op (the Flex delegate). Such a node costs more than its own buffers: its outputs are
TensorFlow tensors that the interpreter treats as dynamic, so the arena is planned in stretches
that end at every select-TF node and grows, stretch after stretch, during the first `train`
call (each growth a copy of the arena into a larger buffer, both resident for a moment), and the
TensorFlow allocator behind those kernels keeps and touches its own pages. In the small CNN's
FedMef export the four weight gradients were the last select-TF nodes of the `train` graph.

`conv2d_filter_grad` (the `conv2d_filter_grad` of a TFLite export's execution strategy,
`fedmef_tf.execution`, unless the export asks for the select-TF op) computes the same gradient,
one kernel tap at a time:

    dW[i, j] = sum over batch and output positions of x[b, r*s_h + i - p_t, c*s_w + j - p_l]
               (outer product) dy[b, r, c]

For tap `(i, j)` the input rows and columns that the tap reads (zero padding left out) are cut
from `x` (a GATHER of the rows, its indices carrying a zero computed from the previous tap's
result so that the cuts run one after the other, then a strided slice of the columns), padded
back to the output's size where the tap reaches into the padding, and multiplied with `dy`
(`dy^T @ cut` per example, `[C_out, P] @ [P, C_in]` with P = H_out * W_out, then summed over
the batch; `dy^T` is made once per layer). Working memory: one tap's cut of `x`
(at most the output's positions times `C_in`) and the row gather before it. The values equal
`Conv2DBackpropFilter`'s up to the order of the sums.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap

__all__ = ['conv2d_filter_grad', 'pad_before', 'tap_range']


def pad_before(size: int, out: int, k: int, stride: int, padding: str) -> int:
  """Zero padding TF puts before the first input position ('SAME': half, rounded down)."""
  if padding == 'VALID':
    return 0
  return max((out - 1) * stride + k - size, 0) // 2


def tap_range(size: int, out: int, tap: int, stride: int, pad: int) -> Tuple[int, int]:
  """Output positions `[first, last]` at which kernel offset `tap` reads an input position
  inside `[0, size)` (input position `o * stride + tap - pad`); `first > last` if none."""
  first = max(0, -(-(pad - tap) // stride))
  last = min(out - 1, (size - 1 + pad - tap) // stride)
  return first, last


@tf.autograph.experimental.do_not_convert  # static Python loops over kernel taps
def conv2d_filter_grad(
  x: tf.Tensor, dy: tf.Tensor, w_shape: Sequence[int], strides: Sequence[int], padding: str
) -> tf.Tensor:
  """`Conv2DBackpropFilter(x, w_shape, dy, strides, padding)` from builtin TFLite ops.

  Args:
    x: float32 `[B, H, W, C_in]` with a fully known shape (else the TF op is used).
    dy: float32 `[B, H_out, W_out, C_out]`.
    w_shape: `[k_h, k_w, C_in, C_out]` (list of ints).
    strides: 4-tuple, NHWC order (dilation 1).
    padding: 'SAME' or 'VALID'.

  Returns:
    float32 `[k_h, k_w, C_in, C_out]`.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  dy = tf.convert_to_tensor(dy, tf.float32)
  w_shape = [int(d) for d in w_shape]
  if not (x.shape.is_fully_defined() and dy.shape.is_fully_defined()):
    return execution.tf_conv2d_filter_grad(x, dy, w_shape, strides, padding)
  batch, h, w, c_in = x.shape.as_list()
  _, h_out, w_out, c_out = dy.shape.as_list()
  k_h, k_w = w_shape[0], w_shape[1]
  s_h, s_w = int(strides[1]), int(strides[2])
  p_t = pad_before(h, h_out, k_h, s_h, padding)
  p_l = pad_before(w, w_out, k_w, s_w, padding)
  # Per example, dy^T made once per layer: `[B, C_out, P]` (P = H_out * W_out). BATCH_MATMUL
  # runs one GEMM per example, and its GEMM library packs both operands into a workspace that
  # it keeps at its largest size: with the whole batch as one product (P * B rows) that was
  # 7.5 MiB for the small CNN's stem at batch 32; per example it is B times smaller.
  dy_t = tf.transpose(tf.reshape(dy, [batch, h_out * w_out, c_out]), [0, 2, 1])
  taps, previous = [], dy_t  # the first cut waits for dy, each later one for the tap before
  for i in range(k_h):
    r0, r1 = tap_range(h, h_out, i, s_h, p_t)
    for j in range(k_w):
      c0, c1 = tap_range(w, w_out, j, s_w, p_l)
      if r0 > r1 or c0 > c1:  # the tap reads only padding
        taps.append(tf.zeros([c_out, c_in], tf.float32))
        continue
      if (k_h, k_w, s_h, s_w) == (1, 1, 1, 1):
        part = x  # the one tap reads x as it is: no cut
      else:
        rows = sap.after(
          tf.range(r0 * s_h + i - p_t, r1 * s_h + i - p_t + 1, s_h), previous, always=True
        )
        col_start = c0 * s_w + j - p_l
        part = tf.gather(x, rows, axis=1)[:, :, col_start : c1 * s_w + j - p_l + 1 : s_w, :]
        if (r0, r1, c0, c1) != (0, h_out - 1, 0, w_out - 1):
          part = tf.pad(part, [[0, 0], [r0, h_out - 1 - r1], [c0, w_out - 1 - c1], [0, 0]])
      per_example = tf.matmul(dy_t, tf.reshape(part, [batch, h_out * w_out, c_in]))
      previous = tf.reduce_sum(per_example, axis=0)  # [C_out, C_in]
      taps.append(previous)
  return tf.transpose(tf.reshape(tf.stack(taps), [k_h, k_w, c_out, c_in]), [0, 1, 3, 2])
