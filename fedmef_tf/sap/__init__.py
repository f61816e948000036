"""Scaled activation pruning (SAP) of FedMef (Huang et al., CVPR 2024, arXiv 2403.14737).

SAP cuts the activation memory of the backward pass. A layer ``y = op(x, w)`` (convolution,
depthwise convolution or matrix product) computes its forward pass with the dense input ``x``,
but caches for the backward pass only the ``k = ceil((1 - gamma) * numel(x))`` entries of ``x``
with the largest magnitude (one threshold over the whole tensor, batch included). The backward
pass computes the input gradient exactly and the weight gradient from ``x_pruned``: ``x`` with
every entry that was not kept set to zero. Cached: the kept values and a packed 1-bit keep
mask, ``4 * (1 - gamma) + 1/8`` bytes per input element instead of 4.

One module per part; this package re-exports their public names (imported on first use, so
that ``python -m fedmef_tf.sap.native`` and ``import fedmef_tf.sap`` stay light):

* :mod:`fedmef_tf.sap.selection`: which entries are kept, the tie rule, exact O(n) selection
  (``keep_count``, ``keep_mask``, ``keep_threshold``, ``simulated_keep_mask``, ``prune_input``);
* :mod:`fedmef_tf.sap.bitpack`: masks packed 8 per byte (``pack_bits``, ``unpack_bits``);
* :mod:`fedmef_tf.sap.storage`: what the gradient function keeps, by the current
  ``fedmef_tf.execution`` strategy's ``sap_storage`` (``STORED``, ``SIMULATED``,
  ``STRATEGIES``, ``strategy``, ``current_strategy``, ``PackedStorage``, ``PACKED``,
  ``bytes_per_element``);
* :mod:`fedmef_tf.sap.order`: the backward pass's order where control dependencies are
  dropped (``after``);
* :mod:`fedmef_tf.sap.ops`: the SAP ops (``sap_conv2d``, ``sap_depthwise_conv2d``,
  ``sap_matmul``, and the plain ``depthwise_conv2d`` of the masked depthwise layer);
* :mod:`fedmef_tf.sap.relu`: ReLU / ReLU6 that cache a 1-bit mask (``bit_relu``,
  ``bit_relu6``, ``BitReLU``);
* :mod:`fedmef_tf.sap.native` (with ``cc/sap_ops.cc``): the native CPU kernels of the packed
  storage and of the 1-bit ReLU, bit for bit the TensorFlow ops' results.
"""

from fedmef_tf.lazy_exports import lazy_exports

_EXPORTS = {
  'sap_conv2d': 'ops',
  'sap_depthwise_conv2d': 'ops',
  'depthwise_conv2d': 'ops',
  'sap_matmul': 'ops',
  'bit_relu': 'relu',
  'bit_relu6': 'relu',
  'BitReLU': 'relu',
  'pack_bits': 'bitpack',
  'unpack_bits': 'bitpack',
  'keep_count': 'selection',
  'keep_threshold': 'selection',
  'keep_mask': 'selection',
  'simulated_keep_mask': 'selection',
  'prune_input': 'selection',
  'bytes_per_element': 'storage',
  'after': 'order',
  'PackedStorage': 'storage',
  'PACKED': 'storage',
  'STORED': 'storage',
  'SIMULATED': 'storage',
  'STRATEGIES': 'storage',
  'strategy': 'storage',
  'current_strategy': 'storage',
}
_MODULES = ('bitpack', 'native', 'ops', 'order', 'relu', 'selection', 'storage')

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
