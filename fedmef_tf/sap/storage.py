"""What SAP keeps between the forward and the backward pass: the storage variants.

Storage of the kept entries of a layer's input ``x`` (what the gradient function holds):

- ``values``: the kept entries of ``x`` in flat (row-major) order, float32, ``4 * k`` bytes;
- ``packed``: a 1-bit keep mask, 8 elements per uint8 byte, ``ceil(numel / 8)`` bytes
  (:mod:`fedmef_tf.sap.bitpack`).

That is ``4 * (1 - gamma) + 1/8`` bytes per input element instead of the 4 bytes of a plain op
(:func:`bytes_per_element`; 1.325 bytes at gamma = 0.7). Values with int32 indices would cost
``8 * (1 - gamma)`` bytes per element and lose against values with the bitmask for every gamma
below 31/32. A threshold plus values (no mask) is not enough on its own: the positions of the
kept values cannot be recovered once ``x`` is freed. The dense ``x_pruned`` is rebuilt only
inside the gradient function, one layer at a time.

Storage (the ``sap_storage`` of the current :mod:`fedmef_tf.execution` strategy, read by every
SAP op and 1-bit activation when it is traced; :func:`strategy` scopes one by name):

- :data:`STORED` (default, :data:`PACKED`, a :class:`PackedStorage`): the storage above, the
  memory saving is real;
- :data:`SIMULATED`: the same mathematics without the saving, for simulations that measure
  accuracy, not memory (the TFF simulation, whose worker has no native kernels). The kept set
  is the same (same threshold, same tie rule), selected by
  :func:`fedmef_tf.sap.selection.simulated_keep_mask`, and the gradient function keeps the
  dense ``x_pruned = where(keep, x, 0)`` instead of values and a packed mask, and a 1-bit
  activation keeps its float output instead of a packed mask. Forward values, kept sets and
  gradients are bitwise those of :data:`STORED` (tests/test_sap.py); what goes is the
  compaction, the packing and the rebuild (``tf.where``, ``GatherNd``, ``SparseToDense``);
- any other :class:`fedmef_tf.execution.ActivationStorage` (a TFLite export's static-shape
  values and indices, ``tflite_export.static_sap``): the ops with that storage.

Two implementations of :data:`PACKED`, bit for bit (tests/test_sap_native.py):

- native CPU kernels (:mod:`fedmef_tf.sap.native`, built by ``scripts/install.sh``): the
  selection, compaction and packing in three passes over ``x`` (two radix histograms and a
  write), the rebuild in two (a popcount and a write), and the 1-bit ReLU in one pass each
  way. Working memory besides the outputs: per-block histograms (512 KiB per block, one block
  per intra-op thread). Used in plain TensorFlow on CPU, wherever the library is built and
  the current strategy's ``native_kernels`` allows them;
- TensorFlow ops (everywhere else: TFF computations, which run in TFF's own worker process,
  GPUs, and machines without a C++ compiler): about ten elementwise passes over ``x`` plus two
  ``tf.where`` (one per direction). Working memory: forward, one int32 tensor of ``n`` (the
  histogram key) at a time, then the bool mask with the int64 indices of the kept entries;
  backward, ``x_pruned`` (4 bytes per element) with those indices.
"""

import contextlib
import math

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf.sap import bitpack
from fedmef_tf.sap import native
from fedmef_tf.sap import order
from fedmef_tf.sap import selection

__all__ = [
  'STORED',
  'SIMULATED',
  'STRATEGIES',
  'strategy',
  'current_strategy',
  'PackedStorage',
  'PACKED',
  'resolve',
  'bytes_per_element',
]

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


class PackedStorage(execution.ActivationStorage):
  """The :data:`STORED` storage: kept values and a packed 1-bit keep mask (module docstring);
  1-bit activations keep a packed pass mask. Uses the native kernels of
  :mod:`fedmef_tf.sap.native` where they are enabled (the same output bit for bit)."""

  def compress(self, x: tf.Tensor, gamma: float):
    """Kept values (``[k]`` float32, flat order) and packed keep mask (``[ceil(n/8)]``
    uint8) of ``x``."""
    flat = tf.reshape(x, [-1])
    n = flat.shape[0] if flat.shape[0] is not None else tf.size(flat, out_type=tf.int32)
    if native.enabled():
      return native.compress(flat, selection.keep_count(n, gamma))
    mask = selection.keep_mask_flat(flat, selection.keep_count(n, gamma))
    values = tf.gather_nd(flat, tf.where(mask))  # [k] (the int64 indices are transient)
    packed, _ = bitpack.pack_bits(mask)
    return values, packed

  def decompress(self, values: tf.Tensor, packed: tf.Tensor, shape) -> tf.Tensor:
    """Dense ``x_pruned`` of shape ``shape`` from :meth:`compress`'s output.

    Transient memory besides the 4-byte output: the unpacked bool mask (plus its uint8
    source, 2 bytes per element) and the int64 indices of the kept entries (8 bytes per
    kept entry).
    """
    if native.enabled():
      return native.decompress(values, packed, shape)
    mask = bitpack.unpack_bits(packed, shape)
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
    """:func:`fedmef_tf.sap.bitpack.pack_bits`'s output for the bool pass mask."""
    return bitpack.pack_bits(mask)

  def load_mask(self, stored: tf.Tensor, shape, dy: tf.Tensor) -> tf.Tensor:
    """The bool pass mask unpacked from :meth:`store_mask`'s output, once ``dy`` exists."""
    return bitpack.unpack_bits(order.after(stored, dy), shape)


#: The :data:`STORED` storage.
PACKED = PackedStorage()


def resolve(name_or_storage) -> execution.ActivationStorage:
  """The storage object of a strategy's ``sap_storage`` other than SIMULATED: :data:`PACKED`
  for :data:`STORED`, any other storage as it is."""
  return PACKED if name_or_storage == STORED else name_or_storage


def bytes_per_element(gamma: float) -> float:
  """Bytes SAP caches per input element: ``4 * (1 - gamma) + 1/8`` (4.0 at gamma = 0)."""
  if gamma <= 0.0:
    return 4.0
  return 4.0 * (1.0 - gamma) + 0.125
