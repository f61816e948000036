"""The native SAP kernels (fedmef_tf/sap/cc/sap_ops.cc) give exactly what the TensorFlow ops give.

Every comparison runs the same function twice: once as is (native kernels) and once inside
`sap_native.portable()` (TensorFlow ops only), and asserts bitwise-equal results.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import sap
from fedmef_tf.sap import native as sap_native

HAVE_COMPILER = bool(os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++'))

needs_native = pytest.mark.skipif(
  not sap_native.available(), reason='native SAP kernels not built (no C++ compiler)'
)


def _cases():
  rng = np.random.default_rng(0)
  for n in (1, 7, 8, 9, 100, 4099, 3 * 65536 + 5):
    normal = rng.standard_normal(n).astype(np.float32)
    yield f'normal{n}', normal
    yield f'relu{n}', np.maximum(normal, 0.0)  # about half zeros
    yield f'ties{n}', (np.round(normal * 4) / 4).astype(np.float32)  # many equal |x|
    yield f'zeros{n}', np.zeros(n, np.float32)
  # one large tensor so that the kernels split it into several blocks
  yield 'blocks', np.maximum(rng.standard_normal(1 << 20), 0).astype(np.float32)


CASES = list(_cases())
GAMMAS = (0.3, 0.5, 0.7, 0.9, 0.999, 1.0)


def test_native_kernels_are_built_where_a_compiler_exists():
  if not HAVE_COMPILER:
    pytest.skip('no C++ compiler on this machine')
  if os.environ.get('FEDMEF_NATIVE') == '0':
    pytest.skip('FEDMEF_NATIVE=0')
  # scripts/install.sh builds the library; a failed build would silently cost speed.
  assert sap_native.available(), f'{sap_native.library_path()} missing or stale'


def test_the_build_program_takes_force_as_a_flag():
  """`python -m fedmef_tf.sap.native` (scripts/install.sh) with absl flags, no import warning."""
  if not HAVE_COMPILER:
    pytest.skip('no C++ compiler on this machine')
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, '-W', 'error::RuntimeWarning', '-m', 'fedmef_tf.sap.native']
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'built' in done.stdout and 'RuntimeWarning' not in done.stderr
  bad = subprocess.run(
    cmd + ['--forse'], capture_output=True, text=True, env=env, check=False, timeout=300
  )
  assert bad.returncode != 0 and 'forse' in bad.stderr


@needs_native
@pytest.mark.parametrize('gamma', GAMMAS)
def test_compress_matches_tensorflow_ops(gamma):
  for name, x in CASES:
    values, packed = sap.PACKED.compress(tf.constant(x), gamma)
    with sap_native.portable():
      ref_values, ref_packed = sap.PACKED.compress(tf.constant(x), gamma)
    np.testing.assert_array_equal(values.numpy(), ref_values.numpy(), err_msg=name)
    np.testing.assert_array_equal(packed.numpy(), ref_packed.numpy(), err_msg=name)
    # the kept count is exact: min(k, nonzeros)
    k = sap.keep_count(x.size, gamma)
    assert values.shape[0] == min(k, int(np.count_nonzero(x))), name


@needs_native
@pytest.mark.parametrize('gamma', (0.5, 0.9))
def test_decompress_rebuilds_the_pruned_input(gamma):
  for name, x in CASES:
    shape = [x.size]
    values, packed = sap.PACKED.compress(tf.constant(x), gamma)
    rebuilt = sap.PACKED.decompress(values, packed, shape).numpy()
    with sap_native.portable():
      ref = sap.PACKED.decompress(values, packed, shape).numpy()
    np.testing.assert_array_equal(rebuilt, ref, err_msg=name)
    np.testing.assert_array_equal(
      rebuilt, sap.prune_input(tf.constant(x), gamma).numpy(), err_msg=name
    )
    assert not np.signbit(rebuilt[rebuilt == 0]).any(), name  # +0.0 where dropped


@needs_native
def test_decompress_rejects_inconsistent_inputs():
  values, packed = sap.PACKED.compress(tf.constant(np.arange(1, 17, dtype=np.float32)), 0.5)
  with pytest.raises(tf.errors.InvalidArgumentError, match='entries'):
    sap_native.decompress(values[:-1], packed, [16])
  with pytest.raises(tf.errors.InvalidArgumentError, match='bytes'):
    sap_native.decompress(values, packed, [40])


@needs_native
@pytest.mark.parametrize('max_value', (None, 6.0, 0.5))
def test_bit_activation_matches_tensorflow_ops(max_value):
  rng = np.random.default_rng(1)
  x = tf.constant((rng.standard_normal((3, 5, 7, 11)) * 4).astype(np.float32))
  dy = tf.constant(rng.standard_normal((3, 5, 7, 11)).astype(np.float32))
  x = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0], [0, 0, 0, 1]], [0.0, 6.0])  # edges

  def run():
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = sap.BitReLU(max_value)(x)
    return y, tape.gradient(y, x, output_gradients=dy)

  y, dx = run()
  with sap_native.portable():
    ref_y, ref_dx = run()
  np.testing.assert_array_equal(y.numpy(), ref_y.numpy())
  np.testing.assert_array_equal(dx.numpy(), ref_dx.numpy())
  y_nan = sap_native.bit_activation(tf.constant([np.nan, -1.0, 2.0]), max_value)[0].numpy()
  assert np.isnan(y_nan[0])  # a non-finite input is not hidden


@needs_native
def test_sap_conv_gradients_match_tensorflow_ops():
  rng = np.random.default_rng(2)
  x = tf.constant(np.maximum(rng.standard_normal((4, 9, 9, 6)), 0).astype(np.float32))
  w = tf.constant(rng.standard_normal((3, 3, 6, 5)).astype(np.float32))

  @tf.function
  def grads(x, w):
    with tf.GradientTape() as tape:
      tape.watch([x, w])
      y = sap.sap_conv2d(sap.bit_relu(x), w, 1, 'SAME', 0.7)
      loss = tf.reduce_sum(tf.sin(y))
    return tape.gradient(loss, [x, w])

  dx, dw = grads(x, w)
  with sap_native.portable():
    ref_dx, ref_dw = tf.function(grads.python_function)(x, w)
  np.testing.assert_array_equal(dx.numpy(), ref_dx.numpy())
  np.testing.assert_array_equal(dw.numpy(), ref_dw.numpy())


@needs_native
def test_portable_graphs_have_only_standard_ops():
  x = tf.TensorSpec([2, 8, 8, 4], tf.float32)
  w = tf.constant(np.ones((3, 3, 4, 4), np.float32))

  def f(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = sap.sap_conv2d(sap.bit_relu6(x), w, 1, 'SAME', 0.7)
    return tape.gradient(y, x)

  def op_types(fn):
    graph = tf.function(fn).get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for func in graph.as_graph_def().library.function:
      types |= {node.op for node in func.node_def}
    return types

  native = {t for t in op_types(f) if t.startswith('Fedmef')}
  assert native == {
    'FedmefSapCompress',
    'FedmefSapDecompress',
    'FedmefBitActivation',
    'FedmefBitActivationGrad',
  }
  with sap_native.portable():
    assert not {t for t in op_types(f) if t.startswith('Fedmef')}


@needs_native
def test_graphs_built_outside_eager_mode_have_only_standard_ops():
  # TFF serialises its TensorFlow computations from a tf.Graph context and runs them in its
  # own worker process, which cannot load the native library.
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.float32, [2, 8, 8, 4])
    y = sap.sap_conv2d(sap.bit_relu(x), tf.ones([3, 3, 4, 4]), 1, 'SAME', 0.7)
    tf.gradients(y, x)
  assert not {op.type for op in graph.get_operations() if op.type.startswith('Fedmef')}
