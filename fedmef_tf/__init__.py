"""FedMef in plain TensorFlow/Keras: masks, sparse layers, NSConv, SAP, models, memory model.

The public names, re-exported here (tfmot's pattern) and imported on first use, so that
`import fedmef_tf` stays light; this package never imports TensorFlow Federated:

* `build_model`, `MODEL_NAMES`, `VARIANTS`, `CUSTOM_OBJECTS` (`fedmef_tf.models`);
* `sparsify`, `ConversionError` (`fedmef_tf.conversion`): a stock Keras model made FedMef;
* `custom_object_scope`, `save_model`, `load_model` (`fedmef_tf.model_io`);
* `init_sparse`, `global_density`, `prunable_layers`, `erk_densities` (`fedmef_tf.masks`);
* `analytic_footprint`, `measure_train_step_peak` (`fedmef_tf.memory`);
* the modules `algorithms` (the catalogue of the algorithms: variant, SAP, BaE, mask policy),
  `conversion`, `data`, `losses`, `masks`, `memory`, `model_io`, `models`.
"""

from fedmef_tf.lazy_exports import lazy_exports

_EXPORTS = {
  'build_model': 'models',
  'MODEL_NAMES': 'models',
  'VARIANTS': 'models',
  'CUSTOM_OBJECTS': 'models',
  'sparsify': 'conversion',
  'ConversionError': 'conversion',
  'custom_object_scope': 'model_io',
  'save_model': 'model_io',
  'load_model': 'model_io',
  'init_sparse': 'masks',
  'global_density': 'masks',
  'prunable_layers': 'masks',
  'erk_densities': 'masks',
  'analytic_footprint': 'memory',
  'measure_train_step_peak': 'memory',
}
_MODULES = ('algorithms', 'conversion', 'data', 'losses', 'masks', 'memory', 'model_io', 'models')

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
