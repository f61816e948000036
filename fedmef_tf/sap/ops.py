"""The SAP ops: convolution, depthwise convolution and matrix product with a pruned weight gradient.

A layer ``y = op(x, w)`` computes its forward pass with the dense input ``x``, but caches for
the backward pass only the kept entries of ``x`` (:mod:`fedmef_tf.sap.selection`, stored as the
current strategy's storage says, :mod:`fedmef_tf.sap.storage`). The backward pass then

- computes the input gradient exactly (it needs only ``w`` and ``dy``), and
- computes the weight gradient from ``x_pruned``: ``x`` with every entry that was not kept set
  to zero.

Memory care (measured with the allocator's peak, see ``fedmef_tf.memory``): the forward pass of
every custom gradient works on ``tf.stop_gradient`` copies of its inputs, so that an eager tape
does not record (and keep alive) the selection internals, and no gradient function refers to
``x`` or to the layer output; the order of the passes is pinned as
:mod:`fedmef_tf.sap.order` describes.

The forward convolution of :func:`sap_conv2d` and its weight gradient are the current
strategy's ``conv2d`` and ``conv2d_filter_grad``; the depthwise ops are its ``depthwise``.
``gamma`` is a Python float in ``[0, 1]``; ``gamma == 0`` takes the plain op (exactly the
plain gradients, no overhead).
"""

from typing import Sequence, Union

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf.sap import bitpack
from fedmef_tf.sap import order
from fedmef_tf.sap import selection
from fedmef_tf.sap import storage as storage_lib

__all__ = ['sap_conv2d', 'sap_depthwise_conv2d', 'depthwise_conv2d', 'sap_matmul']


def _strides4(strides: Union[int, Sequence[int]]):
  if isinstance(strides, int):
    return [1, strides, strides, 1]
  strides = list(strides)
  if len(strides) == 1:
    return [1, strides[0], strides[0], 1]
  if len(strides) == 2:
    return [1, strides[0], strides[1], 1]
  if len(strides) == 4:
    return strides
  raise ValueError(f'strides must be an int or have 1, 2 or 4 entries, got {strides}')


def _check(gamma: float, padding: str = 'SAME'):
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma must be in [0, 1], got {gamma}')
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def _sap_op(x, w, gamma, forward, input_grad, filter_grad, input_grad_kernel=None):
  """Wraps ``y = forward(x, w)`` in a custom gradient that caches the SAP-compressed ``x``.

  Args:
      x, w: float32 tensors.
      gamma: drop ratio in ``(0, 1]``.
      forward: ``(x, w) -> y``.
      input_grad: ``(dy, w, x_shape) -> dx``, must not need ``x``.
      filter_grad: ``(x_pruned, dy, w_shape) -> dw``.
      input_grad_kernel: None, or ``dw -> kernel``: the kernel of the input gradient, made
          after the weight gradient ``dw`` (the same values as ``w``), instead of keeping
          ``w`` from the forward pass.

  Storage of ``x``: the current strategy's ``sap_storage`` (:mod:`fedmef_tf.execution`).

  Scheduling (what makes the saving real in a graph): the selection runs before the forward op
  (so ``x`` dies with the op instead of waiting for the selection); in the backward pass the
  dense ``x_pruned`` is rebuilt only once ``dy`` exists, the weight gradient is taken, and only
  then is ``dx`` computed, so that no two layers hold a rebuilt input at the same time.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  storage = execution.current().sap_storage
  if storage == storage_lib.SIMULATED:
    return _simulated_op(
      x, tf.convert_to_tensor(w, tf.float32), gamma, forward, input_grad, filter_grad
    )
  storage = storage_lib.resolve(storage)
  w = tf.convert_to_tensor(w, tf.float32)

  @tf.custom_gradient
  def _op(x, w):
    xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
    x_shape, w_shape = bitpack.shape_of(xs), bitpack.shape_of(ws)
    values, packed = storage.compress(xs, gamma)
    with tf.control_dependencies([values, packed]):
      y = forward(xs, ws)

    def grad(dy):
      with tf.control_dependencies([dy]):
        x_pruned = storage.decompress(order.after(values, dy), packed, x_shape)
      dw = filter_grad(x_pruned, dy, w_shape)
      with tf.control_dependencies([dw]):
        if input_grad_kernel is not None:  # the kernel, made again after dw
          dx = input_grad(dy, input_grad_kernel(dw), x_shape)
        # Else the copy that carries the dependency: the smaller of w and dy.
        elif (
          ws.shape.num_elements() is not None
          and dy.shape.num_elements() is not None
          and ws.shape.num_elements() <= dy.shape.num_elements()
        ):
          dx = input_grad(dy, order.after(ws, dw), x_shape)
        else:
          dx = input_grad(order.after(dy, dw), ws, x_shape)
      return dx, dw

    return y, grad

  return _op(x, w)


@tf.autograph.experimental.do_not_convert
def _simulated_op(x, w, gamma, forward, input_grad, filter_grad):
  """:func:`_sap_op` under the SIMULATED storage: the gradient function keeps the dense
  ``x_pruned`` (the same kept set as the stored form) and ``w``."""

  @tf.custom_gradient
  def _op(x, w):
    xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
    x_shape, w_shape = bitpack.shape_of(xs), bitpack.shape_of(ws)
    flat = tf.reshape(xs, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    keep = selection.simulated_keep_mask(flat, selection.keep_count(n, gamma))
    x_pruned = tf.reshape(tf.where(keep, flat, tf.zeros_like(flat)), x_shape)
    y = forward(xs, ws)

    def grad(dy):
      return input_grad(dy, ws, x_shape), filter_grad(x_pruned, dy, w_shape)

    return y, grad

  return _op(x, w)


def sap_conv2d(x, w, strides, padding: str, gamma: float, *, input_grad_kernel=None) -> tf.Tensor:
  """2-D convolution whose weight gradient sees only the largest-|x| entries of its input.

  The forward convolution is the current strategy's ``conv2d`` and the weight gradient its
  ``conv2d_filter_grad`` (:mod:`fedmef_tf.execution`; ``tf.nn.conv2d`` and
  ``Conv2DBackpropFilter`` by default).

  Args:
      x: float32 ``[B, H, W, C_in]`` (NHWC).
      w: float32 ``[k_h, k_w, C_in, C_out]`` (a tensor or a variable).
      strides: int or ``(s_h, s_w)`` or a 4-tuple in NHWC order.
      padding: ``'SAME'`` or ``'VALID'``.
      gamma: drop ratio in ``[0, 1]``; 0 is the plain convolution.
      input_grad_kernel: None, or ``dw -> kernel``: makes the kernel of the input gradient
          (the same values as ``w``) after the weight gradient ``dw`` instead of keeping
          ``w`` from the forward pass. Ignored when ``gamma == 0``.

  Returns:
      float32 ``[B, H_out, W_out, C_out]``, equal to ``tf.nn.conv2d(x, w, strides, padding)``.
      Gradient: exact with respect to ``x``; with respect to ``w`` it is the filter gradient of
      the pruned input. Caches ``4*(1-gamma) + 1/8`` bytes per element of ``x`` plus ``w``.
  """
  _check(gamma, padding)
  s = _strides4(strides)
  ex = execution.current()
  if gamma == 0.0:
    return ex.conv2d(x, w, s, padding)
  return _sap_op(
    x,
    w,
    gamma,
    forward=lambda x, w: ex.conv2d(x, w, s, padding),
    input_grad=lambda dy, w, x_shape: tf.raw_ops.Conv2DBackpropInput(
      input_sizes=x_shape, filter=w, out_backprop=dy, strides=s, padding=padding
    ),
    filter_grad=lambda xp, dy, w_shape: ex.conv2d_filter_grad(xp, dy, w_shape, s, padding),
    input_grad_kernel=input_grad_kernel,
  )


def depthwise_conv2d(x, w, strides, padding: str) -> tf.Tensor:
  """The plain depthwise convolution of a masked depthwise layer, with the depthwise ops of
  the current strategy (`fedmef_tf.execution.Strategy.depthwise`; TF's by default)."""
  return execution.current().depthwise.conv(x, w, _strides4(strides), padding)


def sap_depthwise_conv2d(
  x, w, strides, padding: str, gamma: float, *, input_grad_kernel=None
) -> tf.Tensor:
  """Depthwise convolution (channel multiplier 1) with SAP on its weight gradient.

  Args:
      x: float32 ``[B, H, W, C]`` (NHWC).
      w: float32 ``[k_h, k_w, C, 1]``.
      strides: int or ``(s_h, s_w)`` or a 4-tuple in NHWC order (equal in H and W).
      padding: ``'SAME'`` or ``'VALID'``.
      gamma: drop ratio in ``[0, 1]``; 0 is the plain ``tf.nn.depthwise_conv2d``.
      input_grad_kernel: as in :func:`sap_conv2d`.

  Returns:
      float32 ``[B, H_out, W_out, C]``, equal to the plain depthwise convolution; gradients as
      in :func:`sap_conv2d`.
  """
  _check(gamma, padding)
  s = _strides4(strides)
  ops = execution.current().depthwise
  if gamma == 0.0:
    return ops.conv(x, w, s, padding)
  return _sap_op(
    x,
    w,
    gamma,
    forward=lambda x, w: tf.nn.depthwise_conv2d(x, w, s, padding),  # its gradient is below
    input_grad=lambda dy, w, x_shape: ops.input_grad(dy, w, x_shape, s, padding),
    filter_grad=lambda xp, dy, w_shape: ops.filter_grad(xp, dy, w_shape, s, padding),
    input_grad_kernel=input_grad_kernel,
  )


def sap_matmul(x, w, gamma: float, *, input_grad_kernel=None) -> tf.Tensor:
  """Matrix product ``x @ w`` with SAP on the weight gradient.

  Args:
      x: float32 ``[B, N]``.
      w: float32 ``[N, M]``.
      gamma: drop ratio in ``[0, 1]``; 0 is the plain ``tf.matmul``.
      input_grad_kernel: as in :func:`sap_conv2d`.

  Returns:
      float32 ``[B, M]``; ``dx = dy @ w^T`` exactly, ``dw = x_pruned^T @ dy``.
  """
  _check(gamma)
  if gamma == 0.0:
    return tf.matmul(x, w)
  return _sap_op(
    x,
    w,
    gamma,
    forward=lambda x, w: tf.matmul(x, w),
    input_grad=lambda dy, w, x_shape: tf.matmul(dy, w, transpose_b=True),
    filter_grad=lambda xp, dy, w_shape: tf.matmul(xp, dy, transpose_a=True),
    input_grad_kernel=input_grad_kernel,
  )
