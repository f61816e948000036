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
(1.325 bytes at gamma = 0.7). Values with int32 indices would cost ``8 * (1 - gamma)`` bytes
per element and lose against values with the bitmask for every gamma below 31/32. A threshold
plus values (no mask) is not enough on its own: the positions of the kept values cannot be
recovered once ``x`` is freed. The dense ``x_pruned`` is rebuilt only inside the gradient
function, one layer at a time.

Selection is exact and O(n): ``|x|`` is bit-cast to int32 (for non-negative floats the integer
order of the bit patterns is the float order), and the k-th largest pattern is found by two
histogram passes (``Bincount``), one over the high 16 bits, one over the low 16 bits of the
entries in the selected high bin. No sort or top-k over millions of entries is done.

Ties: entries with ``|x|`` strictly above the threshold ``t`` (the k-th largest ``|x|``) are
all kept. If ``t > 0``, the entries equal to ``t`` with the smallest flat indices are added so
that exactly ``k`` entries are kept (float32 duplicates are common among millions of entries).
If ``t == 0`` (more than ``gamma * n`` entries are exactly zero, as after a ReLU), only the
nonzero entries are kept, fewer than ``k``: a kept zero would cost memory and change nothing
in the weight gradient. So the kept count is ``min(k, count_nonzero(x))``, exactly.
Inputs are assumed finite (a NaN is never kept).

ReLU: a plain ``tf.nn.relu`` keeps its float output alive for its own gradient, which would
cancel the saving. :func:`bit_relu`, :func:`bit_relu6` and :class:`BitReLU` cache only a packed
1-bit mask (``1/8`` byte per element).

Memory care (measured with the allocator's peak, see ``fedmef_tf.memory``): the forward pass of
every custom gradient works on ``tf.stop_gradient`` copies of its inputs, so that an eager tape
does not record (and keep alive) the selection internals, and no gradient function refers to
``x`` or to the layer output. In a graph the executor runs any op as soon as its inputs exist,
so the order is pinned with control dependencies:

- forward: the selection runs before the op, so ``x`` dies with the op;
- backward: the masks are unpacked and ``x_pruned`` rebuilt only once ``dy`` exists (without
  this every layer's rebuild runs during the forward pass, all at once), the weight gradient is
  taken, and only then the input gradient, so no two layers hold a rebuilt input together.

The TFLite converter drops control dependencies; where the current strategy asks for data
dependencies (``fedmef_tf.execution.Strategy.data_dependencies``, set by ``tflite_export``)
the same order is carried by data dependencies (:func:`after`: a zero computed from the tensor
waited for is added to the smallest input of the op that must wait).

Two implementations of the same storage, bit for bit (tests/test_sap_native.py):

- native CPU kernels (:mod:`fedmef_tf.sap_native`, built by ``scripts/install.sh``): the
  selection, compaction and packing in three passes over ``x`` (two radix histograms and a
  write), the rebuild in two (a popcount and a write), and the 1-bit ReLU in one pass each
  way. Working memory besides the outputs: per-block histograms (512 KiB per block, one block
  per intra-op thread). Used in plain TensorFlow on CPU, wherever the library is built and
  the current strategy's ``native_kernels`` allows them;
- TensorFlow ops (everywhere else: TFF computations, which run in TFF's own worker process,
  GPUs, and machines without a C++ compiler): about ten elementwise passes over ``x`` plus two
  ``tf.where`` (one per direction). Working memory: forward, one int32 tensor of ``n`` (the
  histogram key) at a time, then the bool mask with the int64 indices of the kept entries;
  backward, ``x_pruned`` (4 bytes per element) with those indices. On 2 CPU cores about 55 ms
  per 6.3M-element activation (forward and backward together), several times MobileNetV2's
  1x1 and depthwise convolutions on the same tensor.

Storage (the ``sap_storage`` of the current :mod:`fedmef_tf.execution` strategy, read by every
SAP op and 1-bit activation when it is traced; :func:`strategy` scopes one by name):

- :data:`STORED` (default, :data:`PACKED`): the storage above, the memory saving is real;
- :data:`SIMULATED`: the same mathematics without the saving, for simulations that measure
  accuracy, not memory (the TFF simulation, whose worker has no native kernels). The kept set
  is the same (same threshold, same tie rule), selected by :func:`simulated_keep_mask` (one
  histogram pass instead of two, a ``top_k`` over the entries of the threshold's bin), and
  the gradient function keeps the dense ``x_pruned = where(keep, x, 0)`` instead of values
  and a packed mask, and a 1-bit activation keeps its float output instead of a packed mask.
  Forward values, kept sets and gradients are bitwise those of :data:`STORED`
  (tests/test_sap.py); what goes is the compaction, the packing and the rebuild
  (``tf.where``, ``GatherNd``, ``SparseToDense``);
- any other :class:`fedmef_tf.execution.ActivationStorage` (a TFLite export's static-shape
  values and indices, ``tflite_export.static_sap``): the ops above with that storage.

The forward convolution of :func:`sap_conv2d` and its weight gradient are the strategy's
``conv2d`` and ``conv2d_filter_grad``.

``gamma`` is a Python float in ``[0, 1]``; ``gamma == 0`` takes the plain op (exactly the
plain gradients, no overhead).
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Sequence, Tuple, Union

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap_native

__all__ = [
  'sap_conv2d',
  'sap_depthwise_conv2d',
  'depthwise_conv2d',
  'sap_matmul',
  'bit_relu',
  'bit_relu6',
  'BitReLU',
  'pack_bits',
  'unpack_bits',
  'keep_count',
  'keep_threshold',
  'keep_mask',
  'simulated_keep_mask',
  'prune_input',
  'bytes_per_element',
  'after',
  'PackedStorage',
  'PACKED',
  'STORED',
  'SIMULATED',
  'STRATEGIES',
  'strategy',
  'current_strategy',
]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
# The uint64 multiply tricks of pack_bits / unpack_bits read 8 bytes as one little-endian word.
_LITTLE_ENDIAN = sys.byteorder == 'little'


def _shape_of(x: tf.Tensor):
  """Static shape as a list of ints when fully known, else the dynamic int32 shape."""
  if x.shape.is_fully_defined():
    return x.shape.as_list()
  return tf.shape(x, out_type=tf.int32)


# ---------------------------------------------------------------------------------------------
# Backward-pass order in graphs that drop control dependencies
# ---------------------------------------------------------------------------------------------


@tf.autograph.experimental.do_not_convert
def after(t: tf.Tensor, dep: tf.Tensor, *, always: bool = False) -> tf.Tensor:
  """``t`` unchanged, or (where the current strategy's ``data_dependencies`` is set, or if
  ``always``) ``t`` plus a zero computed from ``dep``, so that whatever consumes the result
  runs only once ``dep`` exists.

  The zero is ``cast(d > d, t.dtype)`` for the first entry ``d`` of ``dep``: exactly 0, NaN
  or not. Costs one copy of ``t`` (pick the smaller tensor). Without data dependencies the
  callers' control dependencies order the TF graph and ``t`` is returned as it is.
  """
  if not (always or execution.current().data_dependencies):
    return t
  first = tf.reshape(tf.slice(tf.reshape(dep, [-1]), [0], [1]), [])
  return t + tf.cast(tf.greater(first, first), t.dtype)


# ---------------------------------------------------------------------------------------------
# Storage: stored (memory saving) or simulated (same numerics, plain-layer cost)
# ---------------------------------------------------------------------------------------------

#: SAP caches the kept values and a packed 1-bit mask (the memory saving is real).
STORED = execution.STORED
#: SAP caches the dense pruned input and activations their float output: same numerics.
SIMULATED = execution.SIMULATED
STRATEGIES = execution.SAP_STORAGES


@contextlib.contextmanager
def strategy(name: str):
  """Within the block, SAP ops and 1-bit activations traced here use the storage ``name``:
  the current :mod:`fedmef_tf.execution` strategy with ``sap_storage=name``.

  Args:
      name: :data:`STORED` or :data:`SIMULATED` (module docstring).

  Raises:
      ValueError: unknown strategy.
  """
  if name not in STRATEGIES:
    raise ValueError(f'SAP strategy must be one of {STRATEGIES}, got {name!r}')
  with execution.scope(execution.current().replace(sap_storage=name)):
    yield


def current_strategy():
  """The storage SAP ops traced now use: ``execution.current().sap_storage`` (STORED,
  SIMULATED or an :class:`fedmef_tf.execution.ActivationStorage`)."""
  return execution.current().sap_storage


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def pack_bits(mask: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Packs a boolean tensor into bytes, 8 elements per byte.

  Element ``i`` of the flattened (row-major) mask goes to bit ``i % 8`` (least significant
  first, as ``numpy.packbits(..., bitorder='little')``) of byte ``i // 8``; the last byte is
  padded with zero bits.

  Implementation: the mask is cast to uint8, each group of 8 bytes is bit-cast to one uint64
  and multiplied by ``0x0102040810204080``, which gathers the eight 0/1 bytes into the top
  byte. Transient memory: about 3 bytes per element.

  Args:
      mask: bool tensor of any shape, ``n`` elements.

  Returns:
      ``(packed, shape)``: ``packed`` is a uint8 tensor of shape ``[ceil(n / 8)]`` and
      ``shape`` the shape of ``mask`` for :func:`unpack_bits` (a list of ints when it is
      statically known, else a 1-D int32 tensor).
  """
  mask = tf.convert_to_tensor(mask, dtype=tf.bool)
  shape = _shape_of(mask)
  flat = tf.cast(tf.reshape(mask, [-1]), tf.uint8)
  n_static = flat.shape[0]
  if n_static is None or n_static % 8:
    n = tf.size(flat, out_type=tf.int32)
    flat = tf.pad(flat, [[0, (-n) % 8]])
  if not _LITTLE_ENDIAN:
    weighted = tf.reshape(flat, [-1, 8]) * tf.constant(_BIT_WEIGHTS, tf.uint8)
    return tf.reduce_sum(weighted, axis=1), shape  # distinct powers of two: no carry
  words = tf.bitcast(tf.reshape(flat, [-1, 8]), tf.uint64)
  gathered = words * tf.constant(0x0102040810204080, tf.uint64)
  packed = tf.cast(tf.bitwise.right_shift(gathered, tf.constant(56, tf.uint64)), tf.uint8)
  return packed, shape


def unpack_bits(packed: tf.Tensor, shape) -> tf.Tensor:
  """Inverse of :func:`pack_bits`.

  Args:
      packed: uint8 tensor of shape ``[ceil(n / 8)]``.
      shape: the shape of the original mask (1-D int tensor or a list of ints), ``n``
          elements in total.

  Returns:
      bool tensor of shape ``shape``. Transient memory: about 2 bytes per element.
  """
  packed = tf.convert_to_tensor(packed, dtype=tf.uint8)
  # Each byte is replicated into the 8 bytes of a uint64 and byte j keeps only bit j; on a
  # little-endian host byte j of the word is element 8 * i + j after the bitcast.
  if _LITTLE_ENDIAN:
    words = tf.cast(packed, tf.uint64) * tf.constant(0x0101010101010101, tf.uint64)
    words = tf.bitwise.bitwise_and(words, tf.constant(0x8040201008040201, tf.uint64))
    flat = tf.cast(tf.reshape(tf.bitcast(words, tf.uint8), [-1]), tf.bool)
  else:
    bits = tf.bitwise.bitwise_and(packed[:, None], tf.constant(_BIT_WEIGHTS, tf.uint8))
    flat = tf.cast(tf.reshape(bits, [-1]), tf.bool)
  if isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape):
    n = math.prod(shape)
    if n != flat.shape[0]:
      flat = flat[:n]
    return tf.reshape(flat, shape)
  shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
  flat = flat[: tf.reduce_prod(shape)]
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
  """int32 bit patterns of ``|x|``; their integer order is the order of ``|x|``.

  ``tf.bitcast`` shares the buffer of ``tf.abs``'s output, and the integer op that consumes
  it can overwrite that buffer in place: one transient 4-byte-per-element tensor.
  """
  return tf.bitcast(tf.abs(x_flat), tf.int32)


def _histogram(arr: tf.Tensor, size: int) -> tf.Tensor:
  """Counts of the values ``0 .. size-1`` in the non-negative int32 ``arr``; larger values
  are ignored (``tf.raw_ops.Bincount`` skips them, with no extra pass for a maximum)."""
  return tf.raw_ops.Bincount(arr=arr, size=size, weights=tf.constant([], tf.int32))


def _select_from_top(hist: tf.Tensor, need: tf.Tensor):
  """Largest bin ``b`` with ``#(entries in bins >= b) >= need`` and ``#(bins > b)``."""
  cum_desc = tf.cumsum(hist, reverse=True)  # cum_desc[i] = entries in bins >= i
  b = tf.reduce_sum(tf.cast(cum_desc >= need, tf.int32)) - 1
  b = tf.maximum(b, 0)
  above = cum_desc[b] - hist[b]
  return b, above


def _threshold_bits(flat: tf.Tensor, k: tf.Tensor):
  """Bit pattern ``t`` of the k-th largest ``|x|``, ``#(|x| > t)`` and ``#(|x| == t)``.

  Two histogram passes of 16 bits each over the int32 patterns of ``|x|``. The second pass
  bins ``bits XOR (b << 16)``: entries of the selected high bin ``b`` map to their low 16 bits,
  all others to values >= 65536, which the histogram ignores. The patterns are recomputed
  for each pass (one cheap ``abs``) rather than kept, and the second pass waits for the first,
  so the selection holds one transient int32 tensor of ``n`` entries at a time.

  Args:
      flat: float32 ``[n]``.
      k: int32 scalar, ``1 <= k <= n``.
  """
  hist_hi = _histogram(tf.bitwise.right_shift(_abs_bits(flat), 16), 32768)
  b, above_b = _select_from_top(hist_hi, k)
  b_shifted = tf.bitwise.left_shift(b, 16)
  with tf.control_dependencies([hist_hi]):
    bits = _abs_bits(flat)
  hist_lo = _histogram(tf.bitwise.bitwise_xor(bits, b_shifted), 65536)
  l, above_l = _select_from_top(hist_lo, k - above_b)
  t = tf.bitwise.bitwise_or(b_shifted, l)
  return t, above_b + above_l, hist_lo[l]


def keep_mask(x: tf.Tensor, gamma: float) -> tf.Tensor:
  """Boolean mask of the ``ceil((1 - gamma) * numel(x))`` largest-|x| entries.

  ``min(k, count_nonzero(x))`` entries are True, ``k = ceil((1 - gamma) * numel(x))``; ties at
  a nonzero threshold go to the smallest flat index, zeros are never kept (module docstring).

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
  """Keep mask of the ``k`` largest-|x| entries of the 1-D ``flat`` (ties: smallest index)."""
  if isinstance(k, int) and k == 0:
    return tf.zeros_like(flat, dtype=tf.bool)
  static_k = isinstance(k, int)
  k = tf.convert_to_tensor(k, tf.int32)

  def none_kept():
    return tf.zeros_like(flat, dtype=tf.bool)

  def select():
    t, n_gt, n_eq = _threshold_bits(flat, k)
    ties = k - n_gt  # 1 .. n_eq entries equal to t are to be kept
    t_float = tf.bitcast(t, tf.float32)
    # |x| compared with t as floats (same order as the bit patterns), written without a
    # float |x| temporary: x >= t or x <= -t.

    def nonzero():  # t == 0: zeros carry nothing, keep only the n_gt nonzero entries
      return tf.not_equal(flat, 0.0)

    def all_ties():
      return tf.logical_or(flat >= t_float, flat <= -t_float)

    def first_ties():  # the first `ties` entries equal to t, by flat index
      idx = tf.where(tf.equal(tf.abs(flat), t_float))[:ties]  # int64 [ties, 1], small
      first = tf.raw_ops.SparseToDense(
        sparse_indices=idx,
        output_shape=tf.shape(flat, out_type=tf.int64),
        sparse_values=True,
        default_value=False,
        validate_indices=False,
      )
      return tf.logical_or(tf.logical_or(flat > t_float, flat < -t_float), first)

    return tf.case(
      [(tf.equal(t, 0), nonzero), (tf.equal(ties, n_eq), all_ties)],
      default=first_ties,
      exclusive=False,
    )

  if static_k:
    return select()
  return tf.cond(tf.greater(k, 0), select, none_kept)


def simulated_keep_mask(flat: tf.Tensor, k) -> tf.Tensor:
  """The keep mask of :func:`keep_mask` for the 1-D ``flat`` and count ``k``, with one
  histogram pass (the SIMULATED strategy's selection).

  The high 16 bits of ``|x|``'s pattern are histogrammed and the bin ``b`` holding the k-th
  largest entry found, as in the stored form. The nonzero entries of bin ``b`` (a small share
  of ``n`` unless the data are degenerate: a constant tensor puts all of them there) are
  gathered and ``tf.math.top_k`` over them gives the exact threshold ``t``. The tie rule is
  the same: every entry with ``|x| >= t`` is kept, then those equal to ``t`` after the first
  ``ties`` (by flat index) are dropped again by a scatter (skipped when there are none, the
  usual case); if ``t == 0`` only the nonzero entries are kept. Bitwise the same mask as
  :func:`keep_mask` (tests/test_sap.py).

  Args:
      flat: float32 ``[n]``.
      k: int or int32 scalar, ``0 <= k <= n``.

  Returns:
      bool ``[n]``.
  """
  k = tf.convert_to_tensor(k, tf.int32)
  k1 = tf.maximum(k, 1)
  bits = _abs_bits(flat)
  hi = tf.bitwise.right_shift(bits, 16)
  b, above = _select_from_top(_histogram(hi, 32768), k1)
  cand_idx = tf.where(tf.equal(hi, b))[:, 0]  # int64 flat indices of bin b, increasing
  cand = tf.gather(bits, cand_idx)
  nonzero = tf.greater(cand, 0)  # zeros (bin 0) are never kept
  cand_idx, cand = tf.boolean_mask(cand_idx, nonzero), tf.boolean_mask(cand, nonzero)
  # A zero appended: when fewer than `need` nonzero entries remain, t is 0.
  cand0 = tf.concat([cand, tf.zeros([1], tf.int32)], 0)
  need = tf.minimum(k1 - above, tf.size(cand0))
  t = tf.math.top_k(cand0, need, sorted=True).values[need - 1]
  ties = need - tf.reduce_sum(tf.cast(tf.greater(cand, t), tf.int32))
  # Integer patterns: bits >= max(t, 1) is |x| >= t for t > 0 and x != 0 for t == 0; k == 0
  # keeps nothing (no finite float has the pattern 0x7FFFFFFF).
  t_eff = tf.where(tf.greater(k, 0), tf.maximum(t, 1), tf.constant(0x7FFFFFFF, tf.int32))
  keep = tf.greater_equal(bits, t_eff)
  # The entries equal to t after the first `ties` (by flat index) are dropped again; none
  # when t == 0, since the candidates hold no zero.
  excess = tf.boolean_mask(cand_idx, tf.equal(cand, t))[ties:]
  # Almost always there is none, and the scatter would still copy the whole mask.
  return tf.cond(
    tf.size(excess) > 0,
    lambda: tf.tensor_scatter_nd_update(keep, excess[:, None], tf.zeros_like(excess, tf.bool)),
    lambda: keep,
  )


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
    lambda: tf.bitcast(_threshold_bits(flat, k)[0], tf.float32),
    lambda: tf.constant(float('inf')),
  )


def prune_input(x: tf.Tensor, gamma: float) -> tf.Tensor:
  """``x`` with all but its ``ceil((1 - gamma) * numel)`` largest-|x| entries set to zero.

  The reference for what the SAP weight gradient sees. Shape and dtype of ``x``.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  return tf.where(keep_mask(x, gamma), x, tf.zeros_like(x))


class PackedStorage(execution.ActivationStorage):
  """The :data:`STORED` storage: kept values and a packed 1-bit keep mask (module docstring);
  1-bit activations keep a packed pass mask. Uses the native kernels of
  :mod:`fedmef_tf.sap_native` where they are enabled (the same output bit for bit)."""

  def compress(self, x: tf.Tensor, gamma: float):
    """Kept values (``[k]`` float32, flat order) and packed keep mask (``[ceil(n/8)]``
    uint8) of ``x``."""
    flat = tf.reshape(x, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    if sap_native.enabled():
      return sap_native.compress(flat, keep_count(n, gamma))
    mask = _keep_mask_flat(flat, keep_count(n, gamma))
    values = tf.gather_nd(flat, tf.where(mask))  # [k] (the int64 indices are transient)
    packed, _ = pack_bits(mask)
    return values, packed

  def decompress(self, values: tf.Tensor, packed: tf.Tensor, shape) -> tf.Tensor:
    """Dense ``x_pruned`` of shape ``shape`` from :meth:`compress`'s output.

    Transient memory besides the 4-byte output: the unpacked bool mask (plus its uint8
    source, 2 bytes per element) and the int64 indices of the kept entries (8 bytes per
    kept entry).
    """
    if sap_native.enabled():
      return sap_native.decompress(values, packed, shape)
    mask = unpack_bits(packed, shape)
    idx = tf.where(tf.reshape(mask, [-1]))  # [k, 1] int64
    n = math.prod(shape) if isinstance(shape, list) else tf.reduce_prod(shape)
    # SparseToDense writes the kept values in one pass (ScatterNd is several times slower).
    flat = tf.raw_ops.SparseToDense(
      sparse_indices=idx,
      output_shape=tf.reshape(tf.cast(n, tf.int64), [1]),
      sparse_values=values,
      default_value=tf.constant(0.0, values.dtype),
      validate_indices=False,
    )
    return tf.reshape(flat, shape)

  def store_mask(self, mask: tf.Tensor):
    """:func:`pack_bits`'s output for the bool pass mask."""
    return pack_bits(mask)

  def load_mask(self, stored: tf.Tensor, shape, dy: tf.Tensor) -> tf.Tensor:
    """The bool pass mask unpacked from :meth:`store_mask`'s output, once ``dy`` exists."""
    return unpack_bits(after(stored, dy), shape)


#: The :data:`STORED` storage.
PACKED = PackedStorage()


def _storage(name_or_storage) -> execution.ActivationStorage:
  """The storage object of a strategy's ``sap_storage`` other than SIMULATED."""
  return PACKED if name_or_storage == STORED else name_or_storage


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
  if storage == SIMULATED:
    return _simulated_op(
      x, tf.convert_to_tensor(w, tf.float32), gamma, forward, input_grad, filter_grad
    )
  storage = _storage(storage)
  w = tf.convert_to_tensor(w, tf.float32)

  @tf.custom_gradient
  def _op(x, w):
    xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
    x_shape, w_shape = _shape_of(xs), _shape_of(ws)
    values, packed = storage.compress(xs, gamma)
    with tf.control_dependencies([values, packed]):
      y = forward(xs, ws)

    def grad(dy):
      with tf.control_dependencies([dy]):
        x_pruned = storage.decompress(after(values, dy), packed, x_shape)
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
          dx = input_grad(dy, after(ws, dw), x_shape)
        else:
          dx = input_grad(after(dy, dw), ws, x_shape)
      return dx, dw

    return y, grad

  return _op(x, w)


@tf.autograph.experimental.do_not_convert
def _simulated_op(x, w, gamma, forward, input_grad, filter_grad):
  """:func:`_sap_op` under the SIMULATED strategy: the gradient function keeps the dense
  ``x_pruned`` (the same kept set as the stored form) and ``w``."""

  @tf.custom_gradient
  def _op(x, w):
    xs, ws = tf.stop_gradient(x), tf.stop_gradient(w)
    x_shape, w_shape = _shape_of(xs), _shape_of(ws)
    flat = tf.reshape(xs, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    keep = simulated_keep_mask(flat, keep_count(n, gamma))
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


# ---------------------------------------------------------------------------------------------
# 1-bit ReLU
# ---------------------------------------------------------------------------------------------


def _activate(x, max_value):
  if max_value is None:
    return tf.nn.relu(x)
  return tf.nn.relu6(x) if max_value == 6.0 else tf.minimum(tf.nn.relu(x), max_value)


def _pass_mask(y, max_value):
  """Where the activation passes its gradient, from its output ``y``."""
  if max_value is None:
    return tf.greater(y, 0.0)
  return tf.logical_and(tf.greater(y, 0.0), tf.less(y, max_value))


@tf.autograph.experimental.do_not_convert  # plain TF ops, no tensor-dependent Python flow
def _bit_activation(x, max_value):
  x = tf.convert_to_tensor(x, tf.float32)
  storage = execution.current().sap_storage

  if storage == SIMULATED:

    @tf.custom_gradient
    def _simulated(x):  # the pass mask is read from the float output, kept as it is
      y = _activate(tf.stop_gradient(x), max_value)

      def grad(dy):
        return tf.where(_pass_mask(y, max_value), dy, 0.0)

      return y, grad

    return _simulated(x)

  storage = _storage(storage)
  if storage is PACKED and sap_native.enabled():  # the packed mask from the native kernel

    @tf.custom_gradient
    def _native(x):
      y, packed = sap_native.bit_activation(tf.stop_gradient(x), max_value)

      def grad(dy):
        return sap_native.bit_activation_grad(dy, packed)

      return y, grad

    return _native(x)

  @tf.custom_gradient
  def _op(x):
    # The mask is read from the output (0 < y < max_value iff 0 < x < max_value), so that
    # x is consumed by the activation alone and can die (or be overwritten in place) there.
    y = _activate(tf.stop_gradient(x), max_value)
    packed, shape = storage.store_mask(_pass_mask(y, max_value))
    with tf.control_dependencies([packed]):  # consumers of y wait: no overlap of transients
      y = tf.identity(y)

    def grad(dy):
      # Without the dependency on dy the executor would unpack every layer's mask as
      # soon as the forward pass made it, all at once (it depends on forward tensors only).
      with tf.control_dependencies([dy]):
        keep = storage.load_mask(packed, shape, dy)
      return tf.where(keep, dy, 0.0)

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
      raise ValueError(f'max_value must be positive or None, got {max_value}')
    self.max_value = None if max_value is None else float(max_value)

  def call(self, inputs):
    return _bit_activation(inputs, self.max_value)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update({'max_value': self.max_value})
    return config
