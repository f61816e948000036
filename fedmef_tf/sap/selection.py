"""SAP's selection: which entries of a layer's input the weight gradient sees.

SAP keeps, for the weight gradient, the ``k = ceil((1 - gamma) * numel(x))`` entries of ``x``
with the largest magnitude (one threshold over the whole tensor, batch included;
:func:`keep_count`, :func:`keep_mask`, :func:`keep_threshold`, :func:`prune_input`).

Selection is exact and O(n): ``|x|`` is bit-cast to int32 (for non-negative floats the integer
order of the bit patterns is the float order), and the k-th largest pattern is found by two
histogram passes (``Bincount``), one over the high 16 bits, one over the low 16 bits of the
entries in the selected high bin. No sort or top-k over millions of entries is done. The
SIMULATED storage selects the same set with one histogram pass (:func:`simulated_keep_mask`).

Ties: entries with ``|x|`` strictly above the threshold ``t`` (the k-th largest ``|x|``) are
all kept. If ``t > 0``, the entries equal to ``t`` with the smallest flat indices are added so
that exactly ``k`` entries are kept (float32 duplicates are common among millions of entries).
If ``t == 0`` (more than ``gamma * n`` entries are exactly zero, as after a ReLU), only the
nonzero entries are kept, fewer than ``k``: a kept zero would cost memory and change nothing
in the weight gradient. So the kept count is ``min(k, count_nonzero(x))``, exactly.
Inputs are assumed finite (a NaN is never kept).
"""

import math

import tensorflow as tf

__all__ = [
  'keep_count',
  'keep_mask',
  'keep_mask_flat',
  'simulated_keep_mask',
  'keep_threshold',
  'prune_input',
]


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
  return tf.reshape(keep_mask_flat(flat, k), tf.shape(x))


def keep_mask_flat(flat: tf.Tensor, k) -> tf.Tensor:
  """Keep mask of the ``k`` largest-|x| entries of the 1-D ``flat`` (the tie rule of the module
  docstring); ``k`` a Python int or an int32 scalar, ``0 <= k <= n``."""
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
