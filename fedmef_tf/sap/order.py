"""The order of SAP's backward pass in graphs that drop control dependencies.

In a graph the executor runs any op as soon as its inputs exist, so the SAP ops and the 1-bit
activations pin their order with control dependencies (`fedmef_tf.sap.ops`,
`fedmef_tf.sap.relu`):

- forward: the selection runs before the op, so ``x`` dies with the op;
- backward: the masks are unpacked and ``x_pruned`` rebuilt only once ``dy`` exists (without
  this every layer's rebuild runs during the forward pass, all at once), the weight gradient is
  taken, and only then the input gradient, so no two layers hold a rebuilt input together.

The TFLite converter drops control dependencies; where the current strategy asks for data
dependencies (``fedmef_tf.execution.Strategy.data_dependencies``, set by ``tflite_export``)
the same order is carried by data dependencies (:func:`after`: a zero computed from the tensor
waited for is added to the smallest input of the op that must wait).
"""

import tensorflow as tf

from fedmef_tf import execution

__all__ = ['after']


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
