"""`tflite_export.static_sap.RadixStorage`: SAP's kept set by radix histograms in TFLite builtins.

It must keep exactly `fedmef_tf.sap.keep_mask`'s set (ties included, zeros never) in TF and in
the TFLite interpreter, use no select-TF op, and give an export whose `train` steps equal those
of the TOPK_V2 export.
"""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import models
from fedmef_tf import sap
from tflite_export import export
from tflite_export import select_ops
from tflite_export import static_sap

N = 4096
#: Radix selection for every input size (the default uses TOPK_V2 below a size).
EVERY_SIZE = static_sap.RadixStorage(min_elements=0)


def _inputs():
  """Inputs of `N` entries: continuous values, many ties, ties split by the threshold, a zero
  threshold, negative zeros only."""
  rng = np.random.default_rng(0)
  cases = {
    'normal': rng.standard_normal(N),
    'integers': rng.integers(-3, 4, N).astype(float),
    'split_ties': rng.integers(-1, 2, N) * 0.5,
    'mostly_zero': np.where(rng.random(N) < 0.9, 0.0, rng.standard_normal(N)),
    'negative_zeros': -np.zeros(N),
    # (normal floats: TF's CPU kernels flush subnormals to zero in `keep_mask`'s compares)
    'tiny_and_huge': rng.choice([1e-30, -3e-29, 7.0, -1e30, 0.0], N),
  }
  return {name: x.astype(np.float32) for name, x in cases.items()}


def _dense(values, indices):
  out = np.zeros(N, np.float32)
  np.add.at(out, indices, values)
  return out


def _check(x, gamma, values, indices):
  k = sap.keep_count(N, gamma)
  assert values.shape == (k,) and indices.shape == (k,) and indices.dtype == np.int32
  expected = sap.keep_mask(tf.constant(x), gamma).numpy()
  kept = np.zeros(N, bool)
  kept[indices[values != 0]] = True
  np.testing.assert_array_equal(kept, expected & (x != 0))
  np.testing.assert_array_equal(_dense(values, indices), np.where(expected, x, 0.0))


def _tflite(fn):
  spec = tf.TensorSpec([N], tf.float32, name='x')
  concrete = tf.function(fn, input_signature=[spec]).get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  flatbuffer = converter.convert()
  assert select_ops.select_tf_ops(flatbuffer) == []
  return tf.lite.Interpreter(model_content=flatbuffer).get_signature_runner()


@pytest.mark.parametrize('gamma', [0.7, 0.3, 0.999])
def test_radix_keeps_the_set_of_keep_mask_in_tf(gamma):
  compress = tf.function(lambda x: EVERY_SIZE.compress(x, gamma))
  for name, x in _inputs().items():
    values, indices = compress(tf.constant(x))
    try:
      _check(x, gamma, values.numpy(), indices.numpy())
    except AssertionError as e:
      raise AssertionError(f'{name}: {e}') from e


@pytest.mark.parametrize('gamma,relu', [(0.7, False), (0.3, False), (0.7, True)])
def test_radix_keeps_the_set_of_keep_mask_in_tflite_builtins(gamma, relu):
  def compress(x):
    values, indices = EVERY_SIZE.compress(tf.nn.relu(x) if relu else x, gamma)
    return {'values': values, 'indices': indices}

  runner = _tflite(compress)
  for name, x in _inputs().items():
    out = runner(x=x)
    try:
      _check(np.maximum(x, 0.0) if relu else x, gamma, out['values'], out['indices'])
    except AssertionError as e:
      raise AssertionError(f'{name}: {e}') from e


def test_radix_rebuilds_with_the_topk_storage_decompress():
  x = _inputs()['normal']
  got = EVERY_SIZE.decompress(*EVERY_SIZE.compress(tf.constant(x), 0.7), [64, 64])
  expected = sap.prune_input(tf.constant(x.reshape(64, 64)), 0.7)
  np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_small_inputs_use_topk_and_large_ones_the_radix_passes():
  def op_types(storage, n):
    fn = tf.function(lambda x: storage.compress(x, 0.7))
    graph = fn.get_concrete_function(tf.TensorSpec([n], tf.float32)).graph
    return {op.type for op in graph.get_operations()}

  small = static_sap.RADIX.min_elements - 1
  assert 'TopKV2' in op_types(static_sap.RADIX, small)
  assert 'TopKV2' not in op_types(static_sap.RADIX, small + 1)
  assert 'ScatterNd' in op_types(static_sap.RADIX, small + 1)
  assert 'TopKV2' not in op_types(EVERY_SIZE, 16)
  assert static_sap.storage('radix') is static_sap.RADIX
  with pytest.raises(ValueError, match='sap_storage'):
    static_sap.storage('sort')


def test_radix_export_trains_as_the_topk_export(tmp_path):
  """The same fresh cnn exported with each storage: no select-TF op, and the same losses and
  weights over a few `train` calls (the kept sets are equal up to ties at zero)."""
  paths = {}
  for storage in ('topk', 'radix'):
    model, config = export.load_source(model='cnn', variant='fedmef', density=0.2, gamma=0.7)
    path = str(tmp_path / f'{storage}.tflite')
    report = export.export_model(
      model,
      config,
      path,
      batch_size=8,
      measure_memory=False,
      sap_storage=storage,
    )
    assert not report.needs_select_tf_ops
    assert report.metadata['sap_storage'] == storage
    paths[storage] = path
  rng = np.random.default_rng(5)
  runners = {s: tf.lite.Interpreter(model_path=p) for s, p in paths.items()}
  losses = {s: [] for s in paths}
  for _ in range(3):
    x = rng.random((8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    for s, interpreter in runners.items():
      losses[s].append(float(interpreter.get_signature_runner('train')(x=x, y=y)['loss']))
  np.testing.assert_allclose(losses['radix'], losses['topk'], rtol=1e-5)
  weights = {s: i.get_signature_runner('get_weights')() for s, i in runners.items()}
  for name, value in weights['topk'].items():
    np.testing.assert_allclose(weights['radix'][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  with pytest.raises(export.ExportError, match='--sap_storage'):
    export.export_model(
      models.build_model('cnn', 'fedmef', density=0.2),
      {'model': 'cnn', 'variant': 'fedmef'},
      str(tmp_path / 'bad.tflite'),
      measure_memory=False,
      sap_storage='sort',
    )
