"""Scaled activation pruning (SAP) of FedMef (Huang et al., CVPR 2024, arXiv 2403.14737).

SAP cuts the activation memory of the backward pass. A layer ``y = op(x, w)`` (convolution,
depthwise convolution or matrix product) computes its forward pass with the dense input ``x``,
but caches for the backward pass only the ``k = ceil((1 - gamma) * numel(x))`` entries of ``x``
with the largest magnitude (one threshold over the whole tensor, batch included). The backward
pass then

- computes the input gradient exactly (it needs only ``w`` and ``dy``), and
- computes the weight gradient from ``x_pruned``: ``x`` with every entry that was not kept set
  to zero.

Storage of the kept entries (what the gradient function holds between forward and backward):

- ``values``: the kept entries of ``x`` in flat (row-major) order, float32, ``4 * k`` bytes;
- ``packed``: a 1-bit keep mask, 8 elements per uint8 byte, ``ceil(numel / 8)`` bytes.

That is ``4 * (1 - gamma) + 1/8`` bytes per input element instead of the 4 bytes of a plain op
(1.325 bytes at gamma = 0.7). int32 indices would cost ``8 * (1 - gamma)`` bytes per element
and lose against the bitmask for every gamma below 31/32. A threshold plus values (no mask) is
not enough on its own: the positions of the kept values cannot be recovered once ``x`` is freed.
The dense ``x_pruned`` is rebuilt only inside the gradient function, one layer at a time.

Selection is exact and O(n): ``|x|`` is bit-cast to int32 (for non-negative floats the integer
order of the bit patterns is the float order), and the k-th largest pattern is found by two
histogram passes (``tf.math.bincount``), one over the high 16 bits, one over the low 16 bits of
the entries in the selected high bin. No sort or top-k over millions of entries is done.

Ties: entries with ``|x|`` strictly above the threshold are all kept; among the entries equal
to the threshold, the ones with the smallest flat index are kept, so that exactly ``k`` entries
are kept. (After a ReLU many entries are exactly zero; when the threshold is zero some zeros are
"kept", which changes nothing numerically but keeps the count and the memory exact.)
NaN entries sort above +inf.

ReLU: a plain ``tf.nn.relu`` keeps its float output alive for its own gradient, which would
cancel the saving. :func:`bit_relu`, :func:`bit_relu6` and :class:`BitReLU` cache only a packed
1-bit mask (``1/8`` byte per element).

Memory care (measured with the allocator's peak, see ``fedmef_tf.memory``): the forward pass of
every custom gradient works on ``tf.stop_gradient`` copies of its inputs, so that an eager tape
does not record (and keep alive) the selection internals, and no gradient function refers to
``x`` or to the layer output.

``gamma`` is a Python float in ``[0, 1]``; ``gamma == 0`` takes the plain op (exactly the
plain gradients, no overhead).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import tensorflow as tf

__all__ = [
    "sap_conv2d",
    "sap_depthwise_conv2d",
    "sap_matmul",
    "bit_relu",
    "bit_relu6",
    "BitReLU",
    "pack_bits",
    "unpack_bits",
    "keep_count",
    "keep_threshold",
    "keep_mask",
    "prune_input",
    "bytes_per_element",
]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def pack_bits(mask: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Packs a boolean tensor into bytes, 8 elements per byte.

    Element ``i`` of the flattened (row-major) mask goes to bit ``i % 8`` (least significant
    first) of byte ``i // 8``; the last byte is padded with zero bits.

    Args:
        mask: bool tensor of any shape, ``n`` elements.

    Returns:
        ``(packed, shape)``: ``packed`` is a uint8 tensor of shape ``[ceil(n / 8)]`` and
        ``shape`` the int32 shape of ``mask`` (a 1-D tensor), for :func:`unpack_bits`.
    """
    mask = tf.convert_to_tensor(mask, dtype=tf.bool)
    shape = tf.shape(mask, out_type=tf.int32)
    flat = tf.reshape(mask, [-1])
    n = tf.size(flat, out_type=tf.int32)
    pad = (-n) % 8
    flat = tf.pad(tf.cast(flat, tf.uint8), [[0, pad]])
    bytes_ = tf.reshape(flat, [-1, 8]) * tf.constant(_BIT_WEIGHTS, tf.uint8)
    packed = tf.reduce_sum(bytes_, axis=1)  # distinct powers of two: no carry, fits in uint8
    return packed, shape


def unpack_bits(packed: tf.Tensor, shape) -> tf.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor of shape ``[ceil(n / 8)]``.
        shape: the shape of the original mask (1-D int tensor or a list of ints), ``n``
            elements in total.

    Returns:
        bool tensor of shape ``shape``.
    """
    packed = tf.convert_to_tensor(packed, dtype=tf.uint8)
    shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
    n = tf.reduce_prod(shape)
    bits = tf.bitwise.bitwise_and(packed[:, None], tf.constant(_BIT_WEIGHTS, tf.uint8))
    flat = tf.not_equal(tf.reshape(bits, [-1])[:n], 0)
    return tf.reshape(flat, shape)


# ---------------------------------------------------------------------------------------------
# Exact top-|x| selection
# ---------------------------------------------------------------------------------------------


def keep_count(n, gamma: float):
    """Number of entries SAP keeps: ``ceil((1 - gamma) * n)``.

    The product is rounded to 6 decimals before the ceiling so that float noise
    (``(1 - 0.7) * 100 = 30.000000000000004``) does not add an entry.

    Args:
        n: element count, a Python int or a scalar int tensor.
        gamma: drop ratio in ``[0, 1]``.

    Returns:
        A Python int if ``n`` is a Python int, else an int32 scalar tensor.
    """
    if isinstance(n, int):
        return int(math.ceil(round((1.0 - gamma) * n, 6)))
    n64 = tf.cast(n, tf.float64)
    k = tf.math.ceil(tf.round((1.0 - gamma) * n64 * 1e6) / 1e6)
    return tf.cast(k, tf.int32)


def _abs_bits(x_flat: tf.Tensor) -> tf.Tensor:
    """int32 bit patterns of ``|x|``; their integer order is the order of ``|x|``."""
    return tf.bitwise.bitwise_and(
        tf.bitcast(x_flat, tf.int32), tf.constant(0x7FFFFFFF, tf.int32))


def _select_from_top(hist: tf.Tensor, need: tf.Tensor):
    """Largest bin ``b`` with ``#(entries in bins >= b) >= need`` and ``#(bins > b)``."""
    cum_desc = tf.cumsum(hist, reverse=True)  # cum_desc[i] = entries in bins >= i
    b = tf.reduce_sum(tf.cast(cum_desc >= need, tf.int32)) - 1
    b = tf.maximum(b, 0)
    above = cum_desc[b] - hist[b]
    return b, above


def _threshold_bits(bits: tf.Tensor, k: tf.Tensor):
    """Bit pattern ``t`` of the k-th largest entry, ``#(bits > t)`` and ``#(bits == t)``.

    Args:
        bits: int32 ``[n]``, non-negative.
        k: int32 scalar, ``1 <= k <= n``.
    """
    hi = tf.bitwise.right_shift(bits, 16)  # 0 .. 32767
    hist_hi = tf.math.bincount(hi, minlength=32768, maxlength=32768, dtype=tf.int32)
    b, above_b = _select_from_top(hist_hi, k)
    need = k - above_b
    lo_in_b = tf.where(tf.equal(hi, b), tf.bitwise.bitwise_and(bits, 0xFFFF), 65536)
    hist_lo = tf.math.bincount(lo_in_b, minlength=65536, maxlength=65536, dtype=tf.int32)
    l, above_l = _select_from_top(hist_lo, need)
    t = tf.bitwise.bitwise_or(tf.bitwise.left_shift(b, 16), l)
    return t, above_b + above_l, hist_lo[l]


def keep_mask(x: tf.Tensor, gamma: float) -> tf.Tensor:
    """Boolean mask of the ``ceil((1 - gamma) * numel(x))`` largest-|x| entries.

    Exactly that many entries are True; ties at the threshold go to the smallest flat index.

    Args:
        x: float32 tensor of any shape.
        gamma: drop ratio in ``[0, 1]``.

    Returns:
        bool tensor with the shape of ``x``.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    flat = tf.reshape(x, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    k = keep_count(n, gamma)
    return tf.reshape(_keep_mask_flat(flat, k), tf.shape(x))


def _keep_mask_flat(flat: tf.Tensor, k) -> tf.Tensor:
    k = tf.convert_to_tensor(k, tf.int32)

    def none_kept():
        return tf.zeros_like(flat, dtype=tf.bool)

    def select():
        bits = _abs_bits(flat)
        t, n_gt, n_eq = _threshold_bits(bits, k)
        ties = k - n_gt  # 1 .. n_eq entries equal to t are kept

        def all_ties():
            return tf.greater_equal(bits, t)

        def first_ties():
            eq = tf.equal(bits, t)
            rank = tf.cumsum(tf.cast(eq, tf.int32))  # 1-based rank among the ties
            return tf.logical_or(tf.greater(bits, t),
                                 tf.logical_and(eq, tf.less_equal(rank, ties)))

        return tf.cond(tf.equal(ties, n_eq), all_ties, first_ties)

    return tf.cond(tf.greater(k, 0), select, none_kept)


def keep_threshold(x: tf.Tensor, gamma: float) -> tf.Tensor:
    """Magnitude of the k-th largest ``|x|``, ``k = ceil((1 - gamma) * numel(x))``.

    Every entry with ``|x|`` above it is kept by SAP; of the entries equal to it, the ones with
    the smallest flat index are kept.

    Args:
        x: float32 tensor of any shape.
        gamma: drop ratio in ``[0, 1)``.

    Returns:
        float32 scalar (``+inf`` when nothing is kept).
    """
    flat = tf.reshape(tf.convert_to_tensor(x, tf.float32), [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    k = tf.convert_to_tensor(keep_count(n, gamma), tf.int32)
    return tf.cond(
        tf.greater(k, 0),
        lambda: tf.bitcast(_threshold_bits(_abs_bits(flat), k)[0], tf.float32),
        lambda: tf.constant(float("inf")))


def prune_input(x: tf.Tensor, gamma: float) -> tf.Tensor:
    """``x`` with all but its ``ceil((1 - gamma) * numel)`` largest-|x| entries set to zero.

    The reference for what the SAP weight gradient sees. Shape and dtype of ``x``.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    return tf.where(keep_mask(x, gamma), x, tf.zeros_like(x))


def _compress(x: tf.Tensor, gamma: float):
    """Kept values (``[k]`` float32) and packed keep mask (``[ceil(n/8)]`` uint8) of ``x``."""
    flat = tf.reshape(x, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    mask = _keep_mask_flat(flat, keep_count(n, gamma))
    values = tf.boolean_mask(flat, mask)
    packed, _ = pack_bits(mask)
    return values, packed


def _decompress(values: tf.Tensor, packed: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Dense ``x_pruned`` of shape ``shape`` from :func:`_compress`'s output."""
    n = tf.reduce_prod(shape)
    mask = unpack_bits(packed, tf.reshape(n, [1]))
    idx = tf.where(mask)  # [k, 1] int64, transient
    flat = tf.scatter_nd(idx, values, tf.cast(tf.reshape(n, [1]), tf.int64))
    return tf.reshape(flat, shape)


def bytes_per_element(gamma: float) -> float:
    """Bytes SAP caches per input element: ``4 * (1 - gamma) + 1/8`` (4.0 at gamma = 0)."""
    if gamma <= 0.0:
        return 4.0
    return 4.0 * (1.0 - gamma) + 0.125


# ---------------------------------------------------------------------------------------------
# SAP ops
# ---------------------------------------------------------------------------------------------


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
    raise ValueError(f"strides must be an int or have 1, 2 or 4 entries, got {strides}")


def _check(gamma: float, padding: str = "SAME"):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def sap_conv2d(x, w, strides, padding: str, gamma: float) -> tf.Tensor:
    """2-D convolution whose weight gradient sees only the largest-|x| entries of its input.

    Args:
        x: float32 ``[B, H, W, C_in]`` (NHWC).
        w: float32 ``[k_h, k_w, C_in, C_out]`` (a tensor or a variable).
        strides: int or ``(s_h, s_w)`` or a 4-tuple in NHWC order.
        padding: ``'SAME'`` or ``'VALID'``.
        gamma: drop ratio in ``[0, 1]``; 0 is the plain ``tf.nn.conv2d``.

    Returns:
        float32 ``[B, H_out, W_out, C_out]``, equal to ``tf.nn.conv2d(x, w, strides, padding)``.
        Gradient: exact with respect to ``x``; with respect to ``w`` it is the filter gradient of
        the pruned input. Caches ``4*(1-gamma) + 1/8`` bytes per element of ``x`` plus ``w``.
    """
    _check(gamma, padding)
    s = _strides4(strides)
    if gamma == 0.0:
        return tf.nn.conv2d(x, w, s, padding)
    x = tf.convert_to_tensor(x, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)

    @tf.custom_gradient
    def _op(x, w):
        xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
        y = tf.nn.conv2d(xs, ws, s, padding)
        x_shape = tf.shape(xs)
        values, packed = _compress(xs, gamma)

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=x_shape, filter=ws, out_backprop=dy, strides=s, padding=padding)
            x_pruned = _decompress(values, packed, x_shape)
            dw = tf.raw_ops.Conv2DBackpropFilter(
                input=x_pruned, filter_sizes=tf.shape(ws), out_backprop=dy, strides=s,
                padding=padding)
            return dx, dw

        return y, grad

    return _op(x, w)


def sap_depthwise_conv2d(x, w, strides, padding: str, gamma: float) -> tf.Tensor:
    """Depthwise convolution (channel multiplier 1) with SAP on its weight gradient.

    Args:
        x: float32 ``[B, H, W, C]`` (NHWC).
        w: float32 ``[k_h, k_w, C, 1]``.
        strides: int or ``(s_h, s_w)`` or a 4-tuple in NHWC order (equal in H and W).
        padding: ``'SAME'`` or ``'VALID'``.
        gamma: drop ratio in ``[0, 1]``; 0 is the plain ``tf.nn.depthwise_conv2d``.

    Returns:
        float32 ``[B, H_out, W_out, C]``, equal to the plain depthwise convolution; gradients as
        in :func:`sap_conv2d`.
    """
    _check(gamma, padding)
    s = _strides4(strides)
    if gamma == 0.0:
        return tf.nn.depthwise_conv2d(x, w, s, padding)
    x = tf.convert_to_tensor(x, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)

    @tf.custom_gradient
    def _op(x, w):
        xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
        y = tf.nn.depthwise_conv2d(xs, ws, s, padding)
        x_shape = tf.shape(xs)
        values, packed = _compress(xs, gamma)

        def grad(dy):
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=x_shape, filter=ws, out_backprop=dy, strides=s, padding=padding)
            x_pruned = _decompress(values, packed, x_shape)
            dw = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=x_pruned, filter_sizes=tf.shape(ws), out_backprop=dy, strides=s,
                padding=padding)
            return dx, dw

        return y, grad

    return _op(x, w)


def sap_matmul(x, w, gamma: float) -> tf.Tensor:
    """Matrix product ``x @ w`` with SAP on the weight gradient.

    Args:
        x: float32 ``[B, N]``.
        w: float32 ``[N, M]``.
        gamma: drop ratio in ``[0, 1]``; 0 is the plain ``tf.matmul``.

    Returns:
        float32 ``[B, M]``; ``dx = dy @ w^T`` exactly, ``dw = x_pruned^T @ dy``.
    """
    _check(gamma)
    if gamma == 0.0:
        return tf.matmul(x, w)
    x = tf.convert_to_tensor(x, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)

    @tf.custom_gradient
    def _op(x, w):
        xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
        y = tf.matmul(xs, ws)
        x_shape = tf.shape(xs)
        values, packed = _compress(xs, gamma)

        def grad(dy):
            dx = tf.matmul(dy, ws, transpose_b=True)
            x_pruned = _decompress(values, packed, x_shape)
            dw = tf.matmul(x_pruned, dy, transpose_a=True)
            return dx, dw

        return y, grad

    return _op(x, w)


# ---------------------------------------------------------------------------------------------
# 1-bit ReLU
# ---------------------------------------------------------------------------------------------


def _bit_activation(x, max_value):
    x = tf.convert_to_tensor(x, tf.float32)

    @tf.custom_gradient
    def _op(x):
        xs = tf.stop_gradient(x)
        if max_value is None:
            y = tf.nn.relu(xs)
            pass_mask = tf.greater(xs, 0.0)
        else:
            y = tf.minimum(tf.nn.relu(xs), max_value)
            pass_mask = tf.logical_and(tf.greater(xs, 0.0), tf.less(xs, max_value))
        packed, shape = pack_bits(pass_mask)

        def grad(dy):
            return tf.where(unpack_bits(packed, shape), dy, tf.zeros_like(dy))

        return y, grad

    return _op(x)


def bit_relu(x) -> tf.Tensor:
    """ReLU whose gradient is computed from a packed 1-bit mask of ``x > 0``.

    Args:
        x: float32 tensor of any shape.

    Returns:
        ``tf.nn.relu(x)``; caches ``1/8`` byte per element (not the float output).
    """
    return _bit_activation(x, None)


def bit_relu6(x) -> tf.Tensor:
    """ReLU6 (``min(max(x, 0), 6)``) with a packed 1-bit mask of ``0 < x < 6`` for its gradient.

    Args:
        x: float32 tensor of any shape.

    Returns:
        ``tf.nn.relu6(x)``; caches ``1/8`` byte per element.
    """
    return _bit_activation(x, 6.0)


class BitReLU(tf.keras.layers.Layer):
    """Keras ReLU (optionally capped at ``max_value``) that caches a 1-bit mask for backward.

    Args:
        max_value: None for ReLU, 6.0 for ReLU6 (any positive float caps the output).
    """

    def __init__(self, max_value=None, **kwargs):
        super().__init__(**kwargs)
        if max_value is not None and max_value <= 0:
            raise ValueError(f"max_value must be positive or None, got {max_value}")
        self.max_value = None if max_value is None else float(max_value)

    def call(self, inputs):
        return _bit_activation(inputs, self.max_value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"max_value": self.max_value})
        return config
