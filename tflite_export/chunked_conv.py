"""Forward convolutions of a TFLite `train` graph with a bounded im2col workspace.

TFLite's CONV_2D kernel (the builtin one that a training graph gets: its filters are variable
reads, not constants) lowers every convolution that is not 1x1 with stride 1 to one GEMM over an
*im2col* buffer of `batch * H_out * W_out * k_h * k_w * C_in` floats, a temporary in the
interpreter's arena. On the small CNN at batch 32 that buffer is 9 MiB for the second
convolution alone (`32 * 16 * 16 * 288` floats), more than every activation that layer caches;
on ResNet18 it is 72 MiB for a first-stage convolution. It is the same for the FedMef and the
baseline export, and it decided the arena size of both (`python -m benchmarks.tflite_memory`:
the arena's peak was the second convolution's forward op in both CNN exports), so it hid the
activation memory that FedMef removes.

`conv2d` below, the `conv2d` of a TFLite export's execution strategy (`fedmef_tf.execution`:
the forward convolution of every masked conv layer; `tflite_export.train_module.tflite_strategy`
binds its budget with `bounded`), runs the batch in `n` slices, one after the other, each its
own CONV_2D, and concatenates the outputs; `n` is the smallest divisor of the batch for which
one slice's im2col buffer fits in `max_workspace_bytes` (or the whole batch, one example per
slice). The extra memory is one input slice (cut only once the previous slice's output
exists) and the output twice (the slices' outputs and their concatenation) instead of the whole
im2col buffer. Each example's output is computed by the same kernel from the same numbers as
one CONV_2D over the batch, so the values equal those of one CONV_2D up to the GEMM's
summation order.

The gradient is the one `tf.nn.conv2d` has, on the whole batch: `Conv2DBackpropInput`, and
the weight gradient of the current strategy, `conv2d_filter_grad` (`Conv2DBackpropFilter` by
default, in a TFLite export the builtin-op version of `tflite_export.filter_grad`); FedMef's SAP
convolutions define their own backward pass and use only the forward. A convolution that needs
no slicing (one slice) is one CONV_2D, with this gradient where the strategy's weight gradient
is not the default one and with `tf.nn.conv2d`'s registered one otherwise (exactly the graph of
an export without slicing).
Depthwise convolutions need no im2col and are left alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap

__all__ = ['DEFAULT_MAX_WORKSPACE_BYTES', 'bounded', 'im2col_bytes', 'slice_count', 'conv2d']

#: im2col budget per CONV_2D call: 1 MiB (the small CNN's second conv then runs in 16 slices of
#: 2 examples; a ResNet18 first-stage conv, 2.25 MiB per example, one example per slice).
DEFAULT_MAX_WORKSPACE_BYTES = 1 << 20


def _out_size(size: int, k: int, stride: int, padding: str) -> int:
  if padding == 'SAME':
    return -(-size // stride)
  return (size - k) // stride + 1


def im2col_bytes(
  x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int], padding: str
) -> int:
  """Bytes of TFLite's im2col buffer for one CONV_2D (0 where it uses none: 1x1, stride 1)."""
  b, h, w, c = x_shape
  kh, kw = int(w_shape[0]), int(w_shape[1])
  sh, sw = int(strides[1]), int(strides[2])
  if kh == 1 and kw == 1 and sh == 1 and sw == 1:
    return 0
  ho, wo = _out_size(h, kh, sh, padding), _out_size(w, kw, sw, padding)
  return 4 * b * ho * wo * kh * kw * c


def slice_count(batch: int, workspace: int, max_workspace_bytes: int) -> int:
  """Smallest divisor `n` of `batch` with `workspace / n <= max_workspace_bytes` (else batch)."""
  for n in range(1, batch + 1):
    if batch % n == 0 and workspace <= n * max_workspace_bytes:
      return n
  return batch


def conv2d(x, w, strides, padding: str, *, max_workspace_bytes: int = DEFAULT_MAX_WORKSPACE_BYTES):
  """`tf.nn.conv2d(x, w, strides, padding)` run in batch slices (same gradient).

  Args:
    x: float32 `[B, H, W, C_in]`; shapes must be fully known to be sliced (else one call).
    w: float32 `[k_h, k_w, C_in, C_out]`.
    strides: 4-tuple, NHWC order.
    padding: 'SAME' or 'VALID'.
    max_workspace_bytes: im2col budget of one slice.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  w = tf.convert_to_tensor(w, tf.float32)
  strides = tuple(int(s) for s in strides)
  if not (x.shape.is_fully_defined() and w.shape.is_fully_defined()):
    return execution.tf_conv2d(x, w, strides, padding)
  batch = int(x.shape[0])
  n = slice_count(
    batch, im2col_bytes(x.shape.as_list(), w.shape.as_list(), strides, padding), max_workspace_bytes
  )
  filter_grad = execution.current().conv2d_filter_grad
  if n == 1 and filter_grad is execution.tf_conv2d_filter_grad:
    return execution.tf_conv2d(x, w, strides, padding)  # one CONV_2D, its own gradient
  x_shape, w_shape = x.shape.as_list(), w.shape.as_list()

  @tf.custom_gradient
  def _conv(x, w):
    xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
    step = batch // n
    outputs = []
    for i in range(n):
      if not outputs:
        part = xs[:step]
      else:
        # Slice i is cut only once output i-1 exists (a data dependency: the converter drops
        # control dependencies): a GATHER of rows whose indices carry a zero computed from
        # output i-1. A STRIDED_SLICE of `xs` has no such input; the converter cut every slice
        # first and held them all, a second copy of the whole input.
        rows = sap.after(tf.range(i * step, (i + 1) * step), outputs[-1], always=True)
        part = tf.gather(xs, rows)
      outputs.append(execution.tf_conv2d(part, ws, strides, padding))
    y = tf.concat(outputs, axis=0)

    def grad(dy):
      dx = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=x_shape, filter=ws, out_backprop=dy, strides=strides, padding=padding
      )
      dw = filter_grad(xs, dy, w_shape, strides, padding)
      return dx, dw

    return y, grad

  return _conv(x, w)


def bounded(max_workspace_bytes: int = DEFAULT_MAX_WORKSPACE_BYTES):
  """`conv2d` with the budget `max_workspace_bytes` bound: a strategy's `conv2d`,
  `(x, w, strides4, padding) -> y`.

  Raises:
    ValueError: the budget is not positive.
  """
  if max_workspace_bytes < 1:
    raise ValueError(f'max_workspace_bytes must be positive, got {max_workspace_bytes}')
  return functools.partial(conv2d, max_workspace_bytes=max_workspace_bytes)
