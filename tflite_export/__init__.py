"""Export of trained FedMef models to TFLite with on-device training signatures.

The public names, re-exported here (tfmot's pattern) and imported on first use:
`export_model`, `load_source`, `convert` (`tflite_export.export`), and the module `export`.
"""

from fedmef_tf.lazy_exports import lazy_exports

_EXPORTS = {'export_model': 'export', 'load_source': 'export', 'convert': 'export'}
_MODULES = ('export',)

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
