"""The 1-bit ReLU and ReLU6: activations that cache a mask instead of their output.

A plain ``tf.nn.relu`` keeps its float output alive for its own gradient, which would cancel
SAP's saving on the next layer's input. :func:`bit_relu`, :func:`bit_relu6` and
:class:`BitReLU` cache only the pass mask (where the gradient goes through), packed 8 per byte
(``1/8`` byte per element) under the :data:`fedmef_tf.sap.storage.STORED` storage, by the
native kernel of :mod:`fedmef_tf.sap.native` where it is enabled; under SIMULATED they keep
their float output, and under any other storage its ``store_mask`` / ``load_mask``.
"""

import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf.sap import native
from fedmef_tf.sap import storage as storage_lib

__all__ = ['bit_relu', 'bit_relu6', 'BitReLU']


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

  if storage == storage_lib.SIMULATED:

    @tf.custom_gradient
    def _simulated(x):  # the pass mask is read from the float output, kept as it is
      y = _activate(tf.stop_gradient(x), max_value)

      def grad(dy):
        return tf.where(_pass_mask(y, max_value), dy, 0.0)

      return y, grad

    return _simulated(x)

  storage = storage_lib.resolve(storage)
  if storage is storage_lib.PACKED and native.enabled():  # the packed mask from the native kernel

    @tf.custom_gradient
    def _native(x):
      y, packed = native.bit_activation(tf.stop_gradient(x), max_value)

      def grad(dy):
        return native.bit_activation_grad(dy, packed)

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
