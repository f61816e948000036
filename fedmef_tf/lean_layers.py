"""The residual sum and the global average pooling of FedMef models, caching no activation.

TF's own `AddV2` / `Mean` gradients call `tf.shape(input)` when the batch size is unknown (as in
a Keras `fit` graph); whether that keeps the input alive is up to graph pruning (in a TF 2.14
`tf.function` step we measured no difference), so these layers make it a property of the code
rather than of the optimiser: their gradient functions refer to nothing but the (tiny) input
shape. `fedmef_tf.sparsify` puts them in place of Keras' `Add` and `GlobalAveragePooling2D` in
both variants, so that a measured difference between the variants is due to NSConv + SAP +
BitReLU + no BatchNorm only.
"""

import tensorflow as tf

__all__ = ['ResidualAdd', 'GlobalAvgPool']


@tf.keras.utils.register_keras_serializable(package='fedmef_tf')
class ResidualAdd(tf.keras.layers.Layer):
  """Sum of two tensors of the same shape whose gradient caches nothing.

  Input: a list `[a, b]`, equal shapes. Output: `a + b`. Gradient: the upstream gradient to
  both (no shape lookup on the inputs).
  """

  def call(self, inputs):
    a, b = inputs

    @tf.custom_gradient
    def _add(x, y):
      def grad(dy):
        return dy, dy

      return tf.stop_gradient(x) + tf.stop_gradient(y), grad

    return _add(a, b)

  def compute_output_shape(self, input_shape):
    return input_shape[0]


@tf.keras.utils.register_keras_serializable(package='fedmef_tf')
class GlobalAvgPool(tf.keras.layers.Layer):
  """Mean over height and width whose gradient caches only the input's shape.

  Input `[B, H, W, C]` -> output `[B, C]`. Gradient: `dy / (H * W)` broadcast to the input.
  """

  def call(self, inputs):
    @tf.custom_gradient
    def _pool(x):
      xs = tf.stop_gradient(x)
      shape = tf.shape(xs)  # int32 [4], the only thing the gradient keeps
      count = tf.cast(shape[1] * shape[2], xs.dtype)

      def grad(dy):
        return tf.broadcast_to((dy / count)[:, None, None, :], shape)

      return tf.reduce_mean(xs, axis=[1, 2]), grad

    return _pool(inputs)

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    return tf.TensorShape([input_shape[0], input_shape[3]])
