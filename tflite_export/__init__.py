"""Export of trained FedMef models to TFLite with on-device training signatures.

The public names, re-exported here (tfmot's pattern) and imported on first use:
`export_model`, `load_source`, `convert` (`tflite_export.export`), and the module `export`.
"""

import importlib

_EXPORTS = {'export_model': 'export', 'load_source': 'export', 'convert': 'export'}
_MODULES = ('export',)

__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name):
  if name in _MODULES:
    return importlib.import_module(f'{__name__}.{name}')
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(__all__))
