"""TensorFlow Federated computations and programs for FedMef.

The public names, re-exported here (tfmot's pattern) and imported on first use, so that
`import tff_programs` imports neither TensorFlow nor TFF and starts no TFF worker:

* `build_fedmef_process`, `make_model_fn`, `ALGORITHMS` (`tff_programs.fedmef_process`; what
  each algorithm is made of: `fedmef_tf.algorithms`);
* `LocalRuntime`, `RemoteRuntime`, `make_runtime` (`tff_programs.runtime`: the owner of the TFF
  worker; use one as a context manager around any federated computation);
* `make_client_data` (`tff_programs.client_data`), `load_sql_client_data`
  (`tff_programs.user_data`);
* `RunConfig` (`tff_programs.training_loop`, whose `run(config)` is a whole training run, as
  `python -m tff_programs.train` does it);
* the modules `fedmef_process`, `runtime`, `client_data`, `user_data`, `training_loop`.
"""

from fedmef_tf.lazy_exports import lazy_exports

_EXPORTS = {
  'build_fedmef_process': 'fedmef_process',
  'make_model_fn': 'fedmef_process',
  'ALGORITHMS': 'fedmef_process',
  'LocalRuntime': 'runtime',
  'RemoteRuntime': 'runtime',
  'make_runtime': 'runtime',
  'make_client_data': 'client_data',
  'load_sql_client_data': 'user_data',
  'RunConfig': 'training_loop',
}
_MODULES = ('fedmef_process', 'runtime', 'client_data', 'user_data', 'training_loop')

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
