"""Packaging for fedmef-tf: FedMef (memory-efficient federated dynamic pruning) in TensorFlow.

The exact, tested set of dependencies is requirements.lock, installed by scripts/install.sh with
--no-deps (TensorFlow Federated 0.87 cannot be resolved by pip from its own metadata today).
The ranges below are what the code needs; the lock is what was tested.
"""

import setuptools

setuptools.setup(
  name='fedmef-tf',
  version='0.1.0',
  description='FedMef: memory-efficient federated dynamic pruning (CVPR 2024) for TensorFlow',
  packages=['fedmef_tf', 'fedmef_tf.sap', 'tff_programs', 'tflite_export', 'benchmarks'],
  # The C++ source of the native SAP kernels; `python -m fedmef_tf.sap.native` builds them.
  package_data={'fedmef_tf.sap': ['cc/sap_ops.cc']},
  python_requires='>=3.9,<3.12',
  install_requires=[
    'tensorflow==2.14.1',
    'tensorflow-federated==0.87.0',
    'tensorflow-model-optimization==0.7.5',
    'numpy~=1.25.2',
    'absl-py==1.4.0',
    # LiteRT, the runtime Android apps ship (stock, no select-TF ops): tflite_export.verify
    # --runtime=litert and the tests that show an export runs on it.
    'ai-edge-litert==2.3.0',
    'matplotlib',
  ],
  extras_require={'test': ['pytest', 'pytest-timeout', 'ruff']},
)
