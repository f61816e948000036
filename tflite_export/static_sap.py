"""On-device storage of SAP's kept activations: static shapes, few transients.

`fedmef_tf.sap` (FedMef's scaled activation pruning, Huang et al., CVPR 2024) stores the input
`x` of a SAP layer for the backward pass as the kept values plus a packed 1-bit keep mask, found
by an exact histogram selection. Traced into a TFLite `train` graph that storage does not save
memory, it costs memory:

* `tf.boolean_mask` and `tf.where` have data-dependent output shapes; in TFLite such tensors are
  *dynamic*, allocated on the heap when the op runs and held until the interpreter is destroyed
  (the arena planner does not release them after their last use);
* without them (a static-shape rewrite with cumulative sums for the tie ranks and the value
  slots) the selection still makes several 4-byte-per-element transients (`|x|` bits, casts,
  two cumulative sums, a reshaped copy of `x`), all alive next to `x` itself, because TFLite's
  RESHAPE, CAST and BITCAST copy.

`tflite_export.memprobe` measures what these transients cost against this module's storage
(docs/ANDROID.md has the figures).

This module's storages, `TOPK` (the default) and `RADIX` (the same stored format and kept set,
selected by radix histograms instead of TOPK_V2: faster on large inputs, with larger
transients; `RadixStorage`), are the `sap_storage` of a TFLite export's execution strategy
(`tflite_export.train_module.tflite_strategy`, `fedmef_tf.execution`; `--sap_storage`). `TOPK`:

* keep set: `tf.math.top_k(|x|, k)` over the flattened input, `k = ceil((1 - gamma) * n)`
  (TFLite's builtin TOPK_V2, which needs O(k) extra memory);
* stored: the `k` kept values (float32: TOPK_V2's own values output where `x` is a ReLU
  output, gathered from `x` otherwise) and their flat indices (int32): `8 * (1 - gamma)` bytes
  per input element (2.4 at gamma 0.7, against 4 for a dense copy and 1.325 for values plus
  bitmask);
* rebuild in the backward pass: `scatter_nd(indices, values, [n])`, one layer at a time (the
  values wait for the layer's output gradient, `fedmef_tf.sap.after`; without it the
  converter rebuilt every layer's input at the start of the backward pass).

The kept set is the same as `fedmef_tf.sap`'s (the `k` largest `|x|`); entries tied with the
k-th largest may be chosen differently (only matters for exactly equal magnitudes; ties at
zero, the common case after a ReLU, change nothing since zeros add nothing to the weight
gradient). Forward outputs and input gradients are unchanged. The cost is time: TOPK_V2 over
millions of entries makes a FedMef `train` call several times slower than the baseline's.
"""

from __future__ import annotations

import math

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap

__all__ = [
  'TopKStorage',
  'RadixStorage',
  'TOPK',
  'RADIX',
  'STORAGES',
  'DEFAULT_STORAGE',
  'storage',
  'known_nonnegative',
  'stored_bytes_per_element',
]


def stored_bytes_per_element(gamma: float) -> float:
  """Bytes this storage keeps per input element: `8 * (1 - gamma)` (values and indices)."""
  return 8.0 * (1.0 - float(gamma))


#: Ops whose (float) outputs are never negative, and ops that pass their input through unchanged.
_NONNEGATIVE_OPS = ('Relu', 'Relu6', 'FedmefBitActivation')
_PASS_THROUGH_OPS = ('Identity', 'IdentityN', 'StopGradient')


def known_nonnegative(x: tf.Tensor, max_depth: int = 16) -> bool:
  """True if the graph shows that `x` is a ReLU / ReLU6 output (through identities).

  Only a structural check of a traced graph (False for eager tensors and anything else), so a
  False is always safe: the selection then ranks `|x|`.
  """
  t = x
  for _ in range(max_depth):
    op = getattr(t, 'op', None)
    if op is None or tf.executing_eagerly():
      return False
    if op.type in _NONNEGATIVE_OPS:
      return True
    if op.type not in _PASS_THROUGH_OPS:
      return False
    t = op.inputs[t.value_index if op.type == 'IdentityN' else 0]
  return False


class TopKStorage(execution.ActivationStorage):
  """SAP's kept activations as top-k values and int32 indices of static shape; a 1-bit
  activation's pass mask as a plain bool tensor (module docstring)."""

  def compress(self, x: tf.Tensor, gamma: float):
    """Kept values and their flat indices, both of static shape `[k]`.

    Args:
      x: float32 tensor with a fully known shape, `n` elements.
      gamma: SAP drop ratio in `(0, 1]`.

    Returns:
      `(values, indices)`: float32 `[k]` and int32 `[k]`, `k = ceil((1 - gamma) * n)`.
      Inputs of unknown shape are stored as `fedmef_tf.sap.PACKED` stores them.
    """
    if not x.shape.is_fully_defined():
      return sap.PACKED.compress(x, gamma)
    flat = tf.reshape(x, [-1])
    k = sap.keep_count(int(flat.shape[0]), gamma)
    if known_nonnegative(x):
      # After a ReLU |x| is x: ranking x itself saves the input-sized ABS output, and the
      # ranked values are the kept values (no GATHER, whose k-sized output would sit next to
      # TOPK_V2's own values output at the forward pass's largest point).
      return tf.math.top_k(flat, k=k, sorted=False)
    _, indices = tf.math.top_k(tf.abs(flat), k=k, sorted=False)
    return tf.gather(flat, indices), indices

  def decompress(self, values: tf.Tensor, indices: tf.Tensor, shape) -> tf.Tensor:
    """Dense `x_pruned` of shape `shape` (a list of ints) from `compress`'s output."""
    if indices.dtype != tf.int32:  # `fedmef_tf.sap.PACKED`'s storage (unknown shape)
      return sap.PACKED.decompress(values, indices, shape)
    n = math.prod(shape)
    return tf.reshape(tf.scatter_nd(indices[:, None], values, [n]), shape)

  def store_mask(self, mask: tf.Tensor):
    """The bool pass mask of a 1-bit activation (BitReLU), kept as it is: 1 byte per element.

    `fedmef_tf.sap.pack_bits` packs 8 per byte with uint64 shifts and bitwise ANDs, which
    TFLite runs only as select-TF ops. Their outputs are TensorFlow tensors that the
    interpreter keeps from one call to the next and plans around (every select-TF node ends a
    stretch of the arena plan), which cost more than the 7/8 byte per element the packing
    saves (`tflite_export.memprobe` shows both on the small CNN's export).
    """
    return mask, None

  def load_mask(self, stored: tf.Tensor, shape, dy: tf.Tensor) -> tf.Tensor:
    """`store_mask`'s output (the SELECT of the ReLU gradient reads `dy` and runs late
    anyway)."""
    del shape, dy
    return stored


#: The storage of a TFLite export's SAP ops and 1-bit activations.
TOPK = TopKStorage()


#: Bins of the two radix passes of `RadixStorage`: the high 16 bits of a non-negative float32
#: pattern (sign bit clear: 0 .. 32767), then the low 16 bits.
_HI_BINS = 32768
_LO_BINS = 65536


def _counts(index: tf.Tensor, ones: tf.Tensor, size: int) -> tf.Tensor:
  """Histogram of the int32 `index` (values `0 .. size - 1`) as SCATTER_ND of `ones`, which
  adds the updates of repeated indices (TFLite's builtin as TF's `scatter_nd` does)."""
  return tf.scatter_nd(index[:, None], ones, [size])


def _bin_from_top(hist: tf.Tensor, need: tf.Tensor):
  """Largest bin `b` with `#(entries in bins >= b) >= need` (0 if none), and `#(bins > b)`."""
  from_top = tf.cumsum(hist, reverse=True)
  b = tf.maximum(tf.reduce_sum(tf.cast(from_top >= need, tf.int32)) - 1, 0)
  return b, from_top[b] - hist[b]


class RadixStorage(TopKStorage):
  """SAP's kept activations as `TopKStorage` stores them (values and int32 indices, static
  shape `[k]`), selected by two radix histograms over the float32 bit patterns instead of
  TOPK_V2.

  Selection, all TFLite builtins (BITCAST, FLOOR_DIV, SCATTER_ND as a histogram, CUMSUM,
  compares): the bit pattern of `|x|` (for non-negative floats the integer order of the
  patterns is the order of the values) is binned by its high 16 bits, the bin holding the k-th
  largest found from the top, and the entries of that bin binned by their low 16 bits; that
  gives the k-th largest pattern `t`, `#(|x| > t)` and `#(|x| == t)`. Kept: every entry above
  `t` and the first entries equal to `t` by flat index, as many as `k` needs (no zero is kept:
  a zero threshold keeps only the nonzeros, and the unused slots hold value 0 at index 0).
  That is `fedmef_tf.sap.keep_mask`'s set exactly, ties included (subnormal magnitudes are
  ranked by their bit patterns, where TF's CPU kernels, which flush them to zero, see zeros).
  Compaction: the cumulative sum of the keep mask is each kept entry's slot, and SCATTER_ND
  adds the flat indices and values of the kept entries to their slots (the other entries add
  0). Where every entry equal to `t` is kept (or none, at a zero threshold), the keep mask is
  one compare; only a threshold shared by entries of which some are kept and some not ranks the
  tied entries (a cumulative sum), in the other branch of an IF.

  Inputs of fewer than `min_elements` entries use `TopKStorage`'s TOPK_V2.
  """

  def __init__(self, min_elements: int = 0):
    self.min_elements = int(min_elements)

  def compress(self, x: tf.Tensor, gamma: float):
    """Kept values and flat indices, float32 `[k]` and int32 `[k]` (`TopKStorage.compress`)."""
    if not x.shape.is_fully_defined() or x.shape.num_elements() < self.min_elements:
      return super().compress(x, gamma)
    flat = tf.reshape(x, [-1])
    n = int(flat.shape[0])
    k = sap.keep_count(n, gamma)
    if k == 0:
      return tf.zeros([0], tf.float32), tf.zeros([0], tf.int32)
    # ABS also for a ReLU output: -0.0 (which a ReLU may give) has the sign bit set.
    bits = tf.bitcast(tf.abs(flat), tf.int32)
    hi = tf.math.floordiv(bits, _LO_BINS)
    # Built from the data so that the converter does not fold it into an n-entry constant.
    ones = tf.cast(hi >= 0, tf.int32)
    b, above_b = _bin_from_top(_counts(hi, ones, _HI_BINS), k)
    in_bin = tf.cast(tf.equal(hi, b), tf.int32)
    hist_lo = _counts(tf.math.floormod(bits, _LO_BINS), in_bin, _LO_BINS)
    lo_t, above_lo = _bin_from_top(hist_lo, k - above_b)
    t = b * _LO_BINS + lo_t
    ties = tf.where(tf.equal(t, 0), 0, k - above_b - above_lo)
    n_eq = hist_lo[lo_t]

    def first_ties():
      eq = tf.cast(tf.equal(bits, t), tf.int32)
      return tf.cast(bits > t, tf.int32) + eq * tf.cast(tf.cumsum(eq) <= ties, tf.int32)

    # Every entry equal to t is kept, or none (a zero threshold): one compare.
    keep = tf.cond(
      tf.logical_or(tf.equal(ties, n_eq), tf.equal(ties, 0)),
      lambda: tf.cast(bits > t - tf.cast(ties > 0, tf.int32), tf.int32),
      first_ties,
    )
    # Inclusive ranks: a kept entry goes to slot 1 .. k, the others add 0 to some slot.
    slot = tf.cumsum(keep)
    position = tf.cumsum(ones, exclusive=True)
    indices = _counts(slot, keep * position, k + 1)[1:]
    values = _counts(slot, flat * tf.cast(keep, tf.float32), k + 1)[1:]
    return values, indices


#: Below this many input entries TOPK_V2 is the faster selection (its cost grows as
#: `n log k`, the radix passes' fixed cost is that of their 98304 bins).
RADIX_MIN_ELEMENTS = 65536

#: Radix-histogram selection for SAP inputs of at least `RADIX_MIN_ELEMENTS` entries, TOPK_V2
#: for smaller ones.
RADIX = RadixStorage(RADIX_MIN_ELEMENTS)

#: The storages an export can choose (`--sap_storage`), by name.
STORAGES = {'topk': TOPK, 'radix': RADIX}
#: The storage of an export that names none.
DEFAULT_STORAGE = 'topk'


def storage(name: str) -> TopKStorage:
  """The storage called `name` in `STORAGES`; ValueError for another name."""
  if name not in STORAGES:
    raise ValueError(f'sap_storage must be one of {sorted(STORAGES)}, got {name!r}')
  return STORAGES[name]
