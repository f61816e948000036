"""Tests of fedmef_tf.sap: scaled activation pruning ops, exact selection, 1-bit ReLU.

Specification (ALGORITHM.md, "Model", SAP): forward identical to the plain op; input gradient
exact; weight gradient computed from the input with all but its ceil((1 - gamma) * numel)
largest-|x| entries set to zero; gamma = 0 is the plain op. ReLU caches a 1-bit mask.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import sap


def _reference_keep(x: np.ndarray, gamma: float) -> np.ndarray:
  """Keep mask by sorting: k largest |x|, ties to the smallest flat index, zeros never kept."""
  flat = np.abs(x.reshape(-1))
  k = int(math.ceil(round((1.0 - gamma) * flat.size, 6)))
  order = np.argsort(-flat, kind='stable')  # descending, equal values by increasing index
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  keep &= flat != 0
  return keep.reshape(x.shape)


def _grads(fn, x, w, dy):
  x, w = tf.constant(x), tf.constant(w)
  with tf.GradientTape() as tape:
    tape.watch([x, w])
    y = fn(x, w)
  dx, dw = tape.gradient(y, [x, w], output_gradients=tf.constant(dy))
  return y.numpy(), dx.numpy(), dw.numpy()


_OPS = {
  'conv_same_s1': (
    lambda x, w, g: sap.sap_conv2d(x, w, 1, 'SAME', g),
    lambda x, w: tf.nn.conv2d(x, w, 1, 'SAME'),
    (3, 9, 9, 4),
    (3, 3, 4, 5),
  ),
  'conv_valid_s2': (
    lambda x, w, g: sap.sap_conv2d(x, w, (2, 2), 'VALID', g),
    lambda x, w: tf.nn.conv2d(x, w, 2, 'VALID'),
    (2, 9, 8, 3),
    (3, 3, 3, 6),
  ),
  'depthwise_same_s2': (
    lambda x, w, g: sap.sap_depthwise_conv2d(x, w, 2, 'SAME', g),
    lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 2, 2, 1], 'SAME'),
    (2, 8, 8, 6),
    (3, 3, 6, 1),
  ),
  'depthwise_valid_s1': (
    lambda x, w, g: sap.sap_depthwise_conv2d(x, w, 1, 'VALID', g),
    lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], 'VALID'),
    (2, 7, 7, 3),
    (3, 3, 3, 1),
  ),
  'matmul': (
    lambda x, w, g: sap.sap_matmul(x, w, g),
    lambda x, w: tf.matmul(x, w),
    (6, 20),
    (20, 7),
  ),
}


def _data(x_shape, w_shape, seed, relu=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  if relu:
    x = np.maximum(x, 0.0)
  w = rng.standard_normal(w_shape).astype(np.float32)
  return x, w


@pytest.mark.parametrize('name', sorted(_OPS))
def test_gamma_zero_is_the_plain_op(name):
  sap_fn, plain_fn, x_shape, w_shape = _OPS[name]
  x, w = _data(x_shape, w_shape, 0)
  y_plain = plain_fn(tf.constant(x), tf.constant(w)).numpy()
  dy = np.random.default_rng(1).standard_normal(y_plain.shape).astype(np.float32)
  y, dx, dw = _grads(lambda a, b: sap_fn(a, b, 0.0), x, w, dy)
  y0, dx0, dw0 = _grads(plain_fn, x, w, dy)
  np.testing.assert_array_equal(y, y0)
  np.testing.assert_array_equal(dx, dx0)
  np.testing.assert_array_equal(dw, dw0)


@pytest.mark.parametrize('gamma', [0.3, 0.7, 0.9])
@pytest.mark.parametrize('name', sorted(_OPS))
@pytest.mark.parametrize('relu', [False, True])
def test_forward_exact_input_grad_exact_weight_grad_from_pruned_input(name, gamma, relu):
  sap_fn, plain_fn, x_shape, w_shape = _OPS[name]
  x, w = _data(x_shape, w_shape, 2, relu=relu)
  y0 = plain_fn(tf.constant(x), tf.constant(w)).numpy()
  dy = np.random.default_rng(3).standard_normal(y0.shape).astype(np.float32)
  y, dx, dw = _grads(lambda a, b: sap_fn(a, b, gamma), x, w, dy)
  _, dx_plain, _ = _grads(plain_fn, x, w, dy)
  x_pruned = np.where(_reference_keep(x, gamma), x, 0.0).astype(np.float32)
  pruned_something = np.count_nonzero(x_pruned) < np.count_nonzero(x)
  # Half of a ReLU output is zero: at gamma 0.3 every nonzero entry is kept.
  assert pruned_something or (relu and gamma < 0.5)
  _, _, dw_pruned = _grads(plain_fn, x_pruned, w, dy)
  _, _, dw_dense = _grads(plain_fn, x, w, dy)
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, dx_plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_pruned, rtol=1e-5, atol=1e-5)
  if pruned_something:  # then it is not the dense gradient
    assert not np.allclose(dw, dw_dense, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('name', ['conv_same_s1', 'depthwise_same_s2', 'matmul'])
def test_gradients_in_tf_function_match_eager(name):
  sap_fn, _, x_shape, w_shape = _OPS[name]
  x, w = _data(x_shape, w_shape, 4, relu=True)
  wv = tf.Variable(w)

  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(tf.square(sap_fn(x, wv, 0.7)))
    return tape.gradient(loss, [x, wv])

  eager = step(tf.constant(x))
  graph = tf.function(step)(tf.constant(x))
  for a, b in zip(eager, graph):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_variable_kernel_gets_pruned_gradient():
  x, w = _data((2, 6, 6, 3), (3, 3, 3, 2), 5)
  wv = tf.Variable(w)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(sap.sap_conv2d(tf.constant(x), wv, 1, 'SAME', 0.5))
  dw = tape.gradient(loss, wv).numpy()
  x_pruned = np.where(_reference_keep(x, 0.5), x, 0.0).astype(np.float32)
  with tf.GradientTape() as tape:
    ref = tf.reduce_sum(tf.nn.conv2d(x_pruned, wv, 1, 'SAME'))
  np.testing.assert_allclose(dw, tape.gradient(ref, wv).numpy(), rtol=1e-5, atol=1e-5)


# -- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'n,gamma,expected',
  [(100, 0.7, 30), (10, 0.25, 8), (7, 0.5, 4), (1000, 0.9, 100), (5, 0.0, 5), (5, 1.0, 0)],
)
def test_keep_count_is_ceil_without_float_noise(n, gamma, expected):
  assert sap.keep_count(n, gamma) == expected
  assert int(sap.keep_count(tf.constant(n), gamma)) == expected


@pytest.mark.parametrize('gamma', [0.1, 0.5, 0.7, 0.95])
@pytest.mark.parametrize('kind', ['normal', 'ties', 'relu', 'tiny'])
def test_keep_mask_matches_sorted_reference(gamma, kind):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 7, 5, 3)).astype(np.float32)
  if kind == 'ties':
    x = np.round(x, 1)  # many equal magnitudes, also at the threshold
  elif kind == 'relu':
    x = np.maximum(x, 0.0)  # half zeros: the threshold can be zero
  elif kind == 'tiny':
    x = (x * 1e-30).astype(np.float32)  # subnormal magnitudes order like the others
  mask = sap.keep_mask(tf.constant(x), gamma).numpy()
  ref = _reference_keep(x, gamma)
  np.testing.assert_array_equal(mask, ref)
  k = sap.keep_count(x.size, gamma)
  assert mask.sum() == min(k, np.count_nonzero(x))


def test_keep_mask_large_tensor_exact_count_in_graph():
  x = tf.random.stateless_normal([64, 32, 32, 16], seed=[1, 2])
  mask = tf.function(lambda t: sap.keep_mask(t, 0.7))(x).numpy()
  k = sap.keep_count(int(np.prod(x.shape)), 0.7)
  assert mask.sum() == k
  mags = np.abs(x.numpy())
  assert mags[mask].min() >= mags[~mask].max()


def test_keep_threshold_is_kth_largest_magnitude():
  x = np.random.default_rng(7).standard_normal(1000).astype(np.float32)
  t = float(sap.keep_threshold(tf.constant(x), 0.75))
  assert t == np.sort(np.abs(x))[::-1][sap.keep_count(1000, 0.75) - 1]
  assert math.isinf(float(sap.keep_threshold(tf.constant(x), 1.0)))


def test_prune_input_zeroes_exactly_the_dropped_entries():
  x = np.random.default_rng(8).standard_normal((3, 11)).astype(np.float32)
  pruned = sap.prune_input(tf.constant(x), 0.6).numpy()
  np.testing.assert_array_equal(pruned, np.where(_reference_keep(x, 0.6), x, 0.0))


# -- bit packing ------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 4, 4, 8)])
def test_pack_unpack_round_trip_and_layout(shape):
  mask = np.random.default_rng(9).random(shape) > 0.4
  packed, packed_shape = sap.pack_bits(tf.constant(mask))
  n = int(np.prod(shape))
  assert packed.dtype == tf.uint8
  assert packed.shape == (math.ceil(n / 8),)
  np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.reshape(-1), bitorder='little'))
  np.testing.assert_array_equal(sap.unpack_bits(packed, packed_shape).numpy(), mask)
  np.testing.assert_array_equal(sap.unpack_bits(packed, tf.constant(shape, tf.int32)).numpy(), mask)


def test_pack_unpack_in_graph_with_unknown_shape():
  @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.bool)])
  def round_trip(m):
    packed, shape = sap.pack_bits(m)
    return sap.unpack_bits(packed, shape)

  mask = np.random.default_rng(10).random((5, 3)) > 0.5
  np.testing.assert_array_equal(round_trip(tf.constant(mask)).numpy(), mask)


def test_bytes_per_element():
  assert sap.bytes_per_element(0.0) == 4.0
  assert sap.bytes_per_element(0.7) == pytest.approx(4 * 0.3 + 0.125)


# -- 1-bit ReLU -------------------------------------------------------------------------------


@pytest.mark.parametrize('six', [False, True])
def test_bit_relu_forward_and_gradient_equal_relu(six):
  x = np.random.default_rng(11).standard_normal((4, 5, 6)).astype(np.float32) * 5.0
  x[0, 0, :3] = [0.0, 6.0, -0.0]  # the boundaries
  dy = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
  bit_fn, plain_fn = (sap.bit_relu6, tf.nn.relu6) if six else (sap.bit_relu, tf.nn.relu)
  xt = tf.constant(x)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xt)
    y, y0 = bit_fn(xt), plain_fn(xt)
  np.testing.assert_array_equal(y.numpy(), y0.numpy())
  np.testing.assert_array_equal(
    tape.gradient(y, xt, output_gradients=dy).numpy(),
    tape.gradient(y0, xt, output_gradients=dy).numpy(),
  )


def test_bit_relu_layer_config_round_trip_and_gradient():
  layer = sap.BitReLU(max_value=6.0, name='act')
  clone = sap.BitReLU.from_config(layer.get_config())
  assert clone.max_value == 6.0 and clone.name == 'act'
  assert sap.BitReLU().get_config()['max_value'] is None
  with pytest.raises(ValueError):
    sap.BitReLU(max_value=-1.0)
  inputs = tf.keras.Input((3,))
  model = tf.keras.Model(inputs, clone(inputs))
  x = tf.constant([[-1.0, 2.0, 7.0]])
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = model(x)
  np.testing.assert_array_equal(y.numpy(), [[0.0, 2.0, 6.0]])
  np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [[0.0, 1.0, 0.0]])


def test_invalid_arguments():
  x, w = _data((1, 4, 4, 2), (3, 3, 2, 2), 13)
  with pytest.raises(ValueError):
    sap.sap_conv2d(x, w, 1, 'SAME', 1.5)
  with pytest.raises(ValueError):
    sap.sap_conv2d(x, w, 1, 'FULL', 0.5)
  with pytest.raises(ValueError):
    sap.sap_conv2d(x, w, (1, 1, 1), 'SAME', 0.5)


@pytest.mark.parametrize('gamma', [0.7, 0.9])
@pytest.mark.parametrize('name', sorted(_OPS))
def test_simulated_strategy_gives_the_stored_gradients_bitwise(name, gamma):
  sap_fn, _, x_shape, w_shape = _OPS[name]
  x, w = _data(x_shape, w_shape, 4)  # about half of relu(x) is nonzero
  x[0, :2] = x[0, 2:4]  # duplicated magnitudes, so the tie rule is exercised
  fn = tf.function(lambda a, b: sap_fn(sap.bit_relu(a), b, gamma))
  y0 = fn(tf.constant(x), tf.constant(w)).numpy()
  dy = np.random.default_rng(5).standard_normal(y0.shape).astype(np.float32)
  stored = _grads(tf.function(lambda a, b: sap_fn(sap.bit_relu(a), b, gamma)), x, w, dy)
  with sap.strategy(sap.SIMULATED):
    assert sap.current_strategy() == sap.SIMULATED
    simulated = _grads(tf.function(lambda a, b: sap_fn(sap.bit_relu(a), b, gamma)), x, w, dy)
  assert sap.current_strategy() == sap.STORED
  _, _, dw_dense = _grads(lambda a, b: sap_fn(sap.bit_relu(a), b, 0.0), x, w, dy)
  assert not np.allclose(simulated[2], dw_dense)  # the pruned input, not the dense one
  for a, b in zip(stored, simulated):
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_unknown_strategy_is_refused():
  with pytest.raises(ValueError, match='strategy'):
    with sap.strategy('fast'):
      pass


@pytest.mark.parametrize('gamma', [0.0, 0.3, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize('kind', ['normal', 'relu', 'ties', 'constant', 'zeros'])
def test_simulated_keep_mask_equals_keep_mask(gamma, kind):
  rng = np.random.default_rng(6)
  x = rng.standard_normal(3000).astype(np.float32)
  if kind == 'relu':  # more zeros than gamma * n at gamma <= 0.5: t == 0
    x = np.maximum(x - 0.2, 0.0)
  elif kind == 'ties':  # few distinct magnitudes of both signs
    x = np.round(x * 2.0) / 2.0
  elif kind == 'constant':
    x = np.full(3000, -1.5, np.float32)
  elif kind == 'zeros':
    x = np.zeros(3000, np.float32)
  k = sap.keep_count(x.size, gamma)
  got = tf.function(sap.simulated_keep_mask)(tf.constant(x), tf.constant(k)).numpy()
  np.testing.assert_array_equal(got, _reference_keep(x, gamma))
  np.testing.assert_array_equal(got, sap.keep_mask(tf.constant(x), gamma).numpy())


# The public names of `fedmef_tf.sap`, one module per part behind them.
_PUBLIC = [
  'sap_conv2d',
  'sap_depthwise_conv2d',
  'depthwise_conv2d',
  'sap_matmul',
  'bit_relu',
  'bit_relu6',
  'BitReLU',
  'pack_bits',
  'unpack_bits',
  'keep_count',
  'keep_threshold',
  'keep_mask',
  'simulated_keep_mask',
  'prune_input',
  'bytes_per_element',
  'after',
  'PackedStorage',
  'PACKED',
  'STORED',
  'SIMULATED',
  'STRATEGIES',
  'strategy',
  'current_strategy',
]


def test_the_package_exports_every_public_name_of_its_parts():
  from fedmef_tf.sap import ops, relu, selection, storage  # pylint: disable=g-import-not-at-top

  assert set(_PUBLIC) <= set(sap.__all__)
  for name in _PUBLIC:
    assert getattr(sap, name) is not None
  from fedmef_tf.sap import BitReLU  # pylint: disable=g-import-not-at-top

  assert BitReLU is relu.BitReLU and sap.PACKED is storage.PACKED
  assert sap.sap_conv2d is ops.sap_conv2d and sap.keep_mask is selection.keep_mask
