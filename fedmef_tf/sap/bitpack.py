"""Bit packing of SAP's boolean masks: 8 elements per byte.

The SAP ops keep their keep mask, and the 1-bit activations their pass mask, packed
(:func:`pack_bits`, ``ceil(n / 8)`` bytes for ``n`` elements) between the forward and the
backward pass, and unpack them (:func:`unpack_bits`) in the backward pass. Element ``i`` of the
flattened mask is bit ``i % 8`` of byte ``i // 8`` (``numpy.packbits(..., bitorder='little')``).
"""

import math
import sys
from typing import Tuple

import tensorflow as tf

__all__ = ['pack_bits', 'unpack_bits', 'shape_of']

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
# The uint64 multiply tricks of pack_bits / unpack_bits read 8 bytes as one little-endian word.
_LITTLE_ENDIAN = sys.byteorder == 'little'


def shape_of(x: tf.Tensor):
  """Static shape as a list of ints when fully known, else the dynamic int32 shape."""
  if x.shape.is_fully_defined():
    return x.shape.as_list()
  return tf.shape(x, out_type=tf.int32)


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
  shape = shape_of(mask)
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
