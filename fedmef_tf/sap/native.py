"""Native CPU kernels for SAP's activation cache: build, load, and call.

``fedmef_tf/sap/cc/sap_ops.cc`` implements the selection, compaction and bit packing of
:data:`fedmef_tf.sap.storage.PACKED` as fused CPU kernels (``FedmefSapCompress``,
``FedmefSapDecompress``, and ``FedmefBitActivation`` / ``FedmefBitActivationGrad`` for the
1-bit ReLU) with the same result bit for bit as the TensorFlow-op path
(tests/test_sap_native.py). They do the work in two or three passes over the tensor instead of
about ten, and need no int64 index tensor.

Build: ``python -m fedmef_tf.sap.native [--force]`` (``scripts/install.sh`` runs it) compiles
the library with the system C++ compiler against the installed TensorFlow headers into
``fedmef_tf/sap/cc/_sap_ops.so`` (``--force``: even when it is current). Without a compiler,
or when the library is missing or older than its source or built for another TensorFlow,
:mod:`fedmef_tf.sap` uses its TensorFlow ops (one warning is logged).

Where the native kernels are not used:

- inside TFF computations: TFF runs graphs in its own ``worker_binary``, which has its own
  TensorFlow and cannot load this library. TFF traces its TensorFlow computations in a
  ``tf.Graph`` context (not eagerly), which :func:`enabled` detects, and ``tff_programs``
  also builds its computations under :func:`portable`;
- where the current ``fedmef_tf.execution`` strategy has ``native_kernels=False``
  (:func:`portable` scopes such a strategy);
- in graphs traced outside eager mode in general (``tf.compat.v1`` graphs);
- in TFLite exports (their strategy has ``native_kernels=False`` and its own fixed-shape SAP
  storage);
- when a GPU is visible (the kernels are CPU-only);
- when the environment variable ``FEDMEF_NATIVE=0`` is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from typing import Optional

import tensorflow as tf
from absl import logging

from fedmef_tf import execution

__all__ = [
  'library_path',
  'build',
  'available',
  'enabled',
  'portable',
  'compress',
  'decompress',
  'bit_activation',
  'bit_activation_grad',
]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, 'cc', 'sap_ops.cc')
_LIBRARY = os.path.join(_HERE, 'cc', '_sap_ops.so')
_STAMP = _LIBRARY + '.tf-version'

_lock = threading.Lock()
_module = None
_load_tried = False
_gpu = None


def library_path() -> str:
  """Where :func:`build` writes the shared library."""
  return _LIBRARY


def _current() -> bool:
  """The library exists, is newer than its source and was built for this TensorFlow."""
  try:
    if os.path.getmtime(_LIBRARY) < os.path.getmtime(_SOURCE):
      return False
    with open(_STAMP, encoding='utf-8') as f:
      return f.read().strip() == tf.__version__
  except OSError:
    return False


def build(force: bool = False, quiet: bool = False) -> bool:
  """Compiles ``cc/sap_ops.cc`` into ``cc/_sap_ops.so``; returns whether the library is usable.

  Writes to a temporary file and renames it, so an interrupted build leaves no broken library.
  """
  if not force and _current():
    return True
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if compiler is None:
    if not quiet:
      print('sap.native: no C++ compiler (g++) found; SAP uses TensorFlow ops', file=sys.stderr)
    return False
  tmp = f'{_LIBRARY}.{os.getpid()}.tmp'
  cmd = (
    [compiler, '-shared', '-fPIC', '-O3', '-o', tmp, _SOURCE]
    + tf.sysconfig.get_compile_flags()
    + tf.sysconfig.get_link_flags()
  )
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    if os.path.exists(tmp):
      os.remove(tmp)
    if not quiet:
      print(
        f'sap.native: compiling {_SOURCE} failed; SAP uses TensorFlow ops\n'
        + result.stderr[-4000:],
        file=sys.stderr,
      )
    return False
  os.replace(tmp, _LIBRARY)
  with open(_STAMP + '.tmp', 'w', encoding='utf-8') as f:
    f.write(tf.__version__ + '\n')
  os.replace(_STAMP + '.tmp', _STAMP)
  return True


@tf.autograph.experimental.do_not_convert
def _load():
  global _module, _load_tried
  with _lock:
    if _load_tried:
      return _module
    _load_tried = True
    if os.environ.get('FEDMEF_NATIVE', '1') == '0':
      return None
    if not _current():
      logging.warning(
        'fedmef_tf.sap.native: %s is missing or stale; SAP uses the slower TensorFlow '
        'ops. Build it with `python -m fedmef_tf.sap.native`.',
        _LIBRARY,
      )
      return None
    try:
      _module = tf.load_op_library(_LIBRARY)
    except (tf.errors.NotFoundError, OSError) as e:  # e.g. built for another TensorFlow
      logging.warning(
        'fedmef_tf.sap.native: cannot load %s (%s); SAP uses TensorFlow ops.', _LIBRARY, e
      )
      _module = None
    return _module


@tf.autograph.experimental.do_not_convert
def available() -> bool:
  """The native kernels are built and loaded."""
  return _load() is not None


@tf.autograph.experimental.do_not_convert
def enabled() -> bool:
  """SAP should use the native kernels here: available, allowed by the current strategy
  (``fedmef_tf.execution.current().native_kernels``), outside graphs built for elsewhere
  and with no GPU visible."""
  return (
    execution.current().native_kernels
    # A graph built outside eager mode is made to be run elsewhere (TFF serialises its
    # TensorFlow computations from a tf.Graph context), with no native kernels.
    and tf.compat.v1.executing_eagerly_outside_functions()
    and available()
    and not _has_gpu()
  )


def _has_gpu() -> bool:
  # The kernels are CPU-only: with a GPU, pinning SAP to the host would copy every
  # activation across; the TensorFlow ops run on the GPU instead.
  global _gpu
  if _gpu is None:
    _gpu = bool(tf.config.list_physical_devices('GPU'))
  return _gpu


@contextlib.contextmanager
def portable():
  """Within this context SAP traces only standard TensorFlow ops: the current
  ``fedmef_tf.execution`` strategy with ``native_kernels=False``.

  For graphs that run elsewhere: TFF computations (executed by TFF's worker process),
  SavedModels and TFLite conversion.
  """
  with execution.scope(execution.current().replace(native_kernels=False)):
    yield


def _ops():
  module = _load()
  if module is None:
    raise RuntimeError('the native SAP kernels are not available')
  return module


@tf.autograph.experimental.do_not_convert
def compress(flat: tf.Tensor, k) -> 'tuple[tf.Tensor, tf.Tensor]':
  """``(values, packed)`` of the ``k`` largest-|x| entries of the 1-D float32 ``flat``.

  Same result as the TensorFlow path of ``fedmef_tf.sap.storage.PACKED.compress``.
  """
  module = _ops()
  return module.fedmef_sap_compress(flat, tf.cast(k, tf.int64))


@tf.autograph.experimental.do_not_convert
def decompress(values: tf.Tensor, packed: tf.Tensor, shape) -> tf.Tensor:
  """Dense ``x_pruned`` of ``shape`` from :func:`compress`'s output."""
  module = _ops()
  return module.fedmef_sap_decompress(values, packed, tf.cast(shape, tf.int32))


@tf.autograph.experimental.do_not_convert
def bit_activation(x: tf.Tensor, max_value: Optional[float]) -> 'tuple[tf.Tensor, tf.Tensor]':
  """``(y, packed)``: ReLU (capped at ``max_value`` unless None) and the packed mask of the
  entries it passes (``0 < x < max_value``), as :func:`fedmef_tf.sap.bitpack.pack_bits` packs it."""
  module = _ops()
  return module.fedmef_bit_activation(x, cap=0.0 if max_value is None else float(max_value))


@tf.autograph.experimental.do_not_convert
def bit_activation_grad(dy: tf.Tensor, packed: tf.Tensor) -> tf.Tensor:
  """``dy`` where the packed mask of :func:`bit_activation` is set, else 0."""
  module = _ops()
  return module.fedmef_bit_activation_grad(dy, packed)


def main(argv) -> int:
  """`python -m fedmef_tf.sap.native [--force]`: builds the library; exit 0 if it is usable."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    print(f'sap.native: error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  ok = build(force=flags.FLAGS.force)
  if ok:
    print(f'sap.native: built {_LIBRARY}')
  return 0 if ok else 1


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  # Defined only when run as a program: importing the module defines no flag.
  flags.DEFINE_boolean('force', False, 'Rebuild the library even when it is current.')
  app.run(main)
