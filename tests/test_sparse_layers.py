"""Specification tests of fedmef_tf.sparse_layers: the masked layer contract of docs/DESIGN.md."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import masks
from fedmef_tf import sparse_layers as sl

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(normalize=False, sap_gamma=0.0, num_classes=5):
  """Conv -> ReLU -> depthwise (x2) -> ReLU -> GAP -> dense, all masked."""
  inp = tf.keras.Input((8, 8, 3))
  h = sl.MaskedConv2D(6, 3, padding='same', normalize=normalize, sap_gamma=sap_gamma, name='conv')(
    inp
  )
  h = tf.keras.layers.ReLU()(h)
  h = sl.MaskedDepthwiseConv2D(
    3,
    strides=2,
    padding='same',
    depth_multiplier=2,
    normalize=normalize,
    sap_gamma=sap_gamma,
    name='dw',
  )(h)
  h = tf.keras.layers.ReLU()(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  out = sl.MaskedDense(num_classes, sap_gamma=sap_gamma, normalize=normalize, name='head')(h)
  return tf.keras.Model(inp, out)


def _data(n=16, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, size=(n,)).astype(np.int32)
  return tf.constant(x), tf.constant(y)


def _slots(opt, var):
  """Optimizer slot variables (momentum, Adam m and v) of one model variable."""
  idx = opt._index_dict[opt._var_key(var)]  # pylint: disable=protected-access
  out = []
  for attr in ('momentums', '_momentums', '_velocities'):
    slots = getattr(opt, attr, None)
    if slots:
      out.append(slots[idx])
  return out


def test_variables_of_the_contract():
  model = _model(normalize=True)
  conv, dw, head = masks.prunable_layers(model)
  for layer in (conv, dw, head):
    trainable = {v.name.split('/')[-1].split(':')[0] for v in layer.trainable_weights}
    frozen = {v.name.split('/')[-1].split(':')[0] for v in layer.non_trainable_weights}
    assert trainable == {'kernel', 'bias', 'gain'}
    assert frozen == {'mask', 'marked', 'bae_lambda'}
    for v in (layer.mask, layer.marked):
      assert v.shape == layer.kernel.shape and v.dtype == tf.float32
    assert layer.bae_lambda.shape == () and float(layer.bae_lambda) == 0.0
    np.testing.assert_array_equal(layer.gain.numpy(), 1.0)
  assert conv.kernel.shape == (3, 3, 3, 6) and conv.gain.shape == (6,)
  assert dw.kernel.shape == (3, 3, 6, 2) and dw.gain.shape == (12,) and dw.bias.shape == (12,)
  assert head.kernel.shape == (12, 5) and head.gain.shape == (5,)
  plain = _model(normalize=False)
  assert all(layer.gain is None for layer in masks.prunable_layers(plain))


def test_output_shapes_match_compute_output_shape():
  x, _ = _data(4)
  for layer in (
    sl.MaskedConv2D(5, (3, 2), strides=(2, 1), padding='valid'),
    sl.MaskedConv2D(5, 3, strides=2, padding='same'),
    sl.MaskedDepthwiseConv2D(3, strides=2, padding='valid', depth_multiplier=3),
  ):
    y = layer(x)
    assert tuple(y.shape) == tuple(layer.compute_output_shape(x.shape))
  dense = sl.MaskedDense(7)
  z = dense(tf.zeros((2, 4, 3)))
  assert z.shape == (2, 4, 7) == tuple(dense.compute_output_shape((2, 4, 3)))


def test_plain_layers_match_keras_ops():
  x, _ = _data(4)
  conv = sl.MaskedConv2D(4, 3, strides=2, padding='same')
  ref = tf.keras.layers.Conv2D(4, 3, strides=2, padding='same')
  ref.build(x.shape)
  conv.build(x.shape)
  conv.kernel.assign(ref.kernel)
  conv.bias.assign(tf.random.normal((4,)))
  ref.bias.assign(conv.bias)
  np.testing.assert_allclose(conv(x), ref(x), rtol=1e-5, atol=1e-5)
  mask = (np.random.default_rng(0).random(conv.kernel.shape) < 0.5).astype(np.float32)
  conv.set_mask(mask)
  ref.kernel.assign(ref.kernel * mask)
  np.testing.assert_allclose(conv(x), ref(x), rtol=1e-5, atol=1e-5)


def test_set_mask_zeroes_kernel_and_validates():
  layer = sl.MaskedDense(3)
  layer.build((None, 4))
  before = layer.kernel.numpy().copy()
  mask = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], np.float32)
  layer.set_bae(np.ones((4, 3)), 0.5)
  layer.set_mask(mask)
  np.testing.assert_array_equal(layer.kernel.numpy(), before * mask)
  np.testing.assert_array_equal(layer.marked.numpy(), mask)  # marked kept inside the mask
  with pytest.raises(ValueError):
    layer.set_mask(np.ones((3, 4)))
  with pytest.raises(ValueError):
    sl.MaskedConv2D(2, 3, padding='full')
  with pytest.raises(ValueError):
    sl.MaskedDense(2, sap_gamma=1.5)
  with pytest.raises(ValueError):
    sl.MaskedDepthwiseConv2D(3, strides=(1, 2))


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize(
  'make_opt',
  [
    lambda: tf.keras.optimizers.SGD(0.1),
    lambda: tf.keras.optimizers.SGD(0.1, momentum=0.9),
    lambda: tf.keras.optimizers.Adam(0.01),
  ],
  ids=['sgd', 'momentum', 'adam'],
)
def test_masked_entries_stay_zero_with_optimizers(normalize, make_opt):
  model = _model(normalize=normalize)
  masks.init_sparse(model, 0.4, seed=2)
  # A BaE marked set inside the mask must not leak outside it either.
  layers = masks.prunable_layers(model)
  sl.set_bae(model, [layer.mask.numpy() for layer in layers], 0.01)
  opt = make_opt()
  x, y = _data()
  for step in range(4):
    with tf.GradientTape() as tape:
      loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    gmap = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    for layer in layers:
      g = gmap[id(layer.kernel)].numpy()
      off = layer.mask.numpy() == 0
      assert np.all(g[off] == 0.0), f'step {step}: gradient at pruned entries'
      assert np.any(g[~off] != 0.0)
    opt.apply_gradients(zip(grads, model.trainable_variables))
  for layer in layers:
    off = layer.mask.numpy() == 0
    assert off.sum() > 0
    kernel = layer.kernel.numpy()
    assert np.all(kernel[off] == 0.0)
    assert np.count_nonzero(kernel[~off]) == (~off).sum()
    slots = _slots(opt, layer.kernel)
    if isinstance(opt, tf.keras.optimizers.Adam):
      assert len(slots) == 2
    for slot in slots:
      s = slot.numpy()
      assert np.all(s[off] == 0.0)
      assert np.any(s[~off] != 0.0)


def test_model_fit_keeps_masks_and_learns():
  tf.keras.utils.set_random_seed(0)
  model = _model(normalize=True, sap_gamma=0.5)
  masks.init_sparse(model, 0.5, seed=0)
  x, y = _data(32)
  model.compile(tf.keras.optimizers.Adam(0.02), LOSS)
  hist = model.fit(x, y, batch_size=16, epochs=15, verbose=0)
  assert hist.history['loss'][-1] < hist.history['loss'][0]
  for layer in masks.prunable_layers(model):
    assert np.all(layer.kernel.numpy()[layer.mask.numpy() == 0] == 0.0)


def test_fit_takes_the_sap_ops_and_predict_does_not(monkeypatch):
  from fedmef_tf import sap  # pylint: disable=import-outside-toplevel

  calls = []
  for op in ('sap_conv2d', 'sap_depthwise_conv2d', 'sap_matmul'):
    original = getattr(sap, op)

    def counted(*args, _op=op, _original=original, **kwargs):
      calls.append(_op)
      return _original(*args, **kwargs)

    monkeypatch.setattr(sap, op, counted)
  model = _model(normalize=True, sap_gamma=0.5)
  x, y = _data(8)
  model.compile(tf.keras.optimizers.SGD(0.01), LOSS)
  model.predict(x, verbose=0)
  model.evaluate(x, y, verbose=0)
  assert calls == []
  model.fit(x, y, epochs=1, verbose=0)
  assert sorted(set(calls)) == ['sap_conv2d', 'sap_depthwise_conv2d', 'sap_matmul']


def test_bae_gradient_term():
  model = _model(normalize=True)
  masks.init_sparse(model, 0.5, seed=3)
  layers = masks.prunable_layers(model)
  rng = np.random.default_rng(0)
  marked = [(rng.random(layer.kernel.shape) < 0.3).astype(np.float32) for layer in layers]
  x, y = _data()
  lam = 0.37

  def kernel_grads():
    with tf.GradientTape() as tape:
      loss = LOSS(y, model(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, [layer.kernel for layer in layers])]

  plain = kernel_grads()
  sl.set_bae(model, marked, lam)
  with_bae = kernel_grads()
  for layer, m, g0, g1 in zip(layers, marked, plain, with_bae):
    expected = 2.0 * lam * layer.kernel.numpy() * m * layer.mask.numpy()
    assert np.any(expected != 0.0)
    np.testing.assert_allclose(g1 - g0, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.marked.numpy(), m * layer.mask.numpy())
    assert float(layer.bae_lambda.numpy()) == pytest.approx(lam)
  sl.clear_bae(model)
  for layer, g0, g2 in zip(layers, plain, kernel_grads()):
    np.testing.assert_allclose(g2, g0, rtol=1e-6, atol=1e-7)
    assert np.all(layer.marked.numpy() == 0.0) and float(layer.bae_lambda.numpy()) == 0.0


def test_bae_alone_shrinks_marked_weights_under_sgd_in_fit():
  # A loss with zero task gradient leaves only the BaE term: w <- w - lr * 2 lambda w on the
  # marked entries, nothing elsewhere.
  model = _model()
  masks.init_sparse(model, 0.5, seed=4)
  layers = masks.prunable_layers(model)
  marked = [
    layer.mask.numpy() * (np.arange(layer.mask.numpy().size) % 2 == 0).reshape(layer.kernel.shape)
    for layer in layers
  ]
  sl.set_bae(model, marked, 0.25)
  before = [layer.kernel.numpy().copy() for layer in layers]
  model.compile(tf.keras.optimizers.SGD(0.1), lambda yt, yp: 0.0 * tf.reduce_sum(yp))
  x, y = _data(8)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  for layer, m, w0 in zip(layers, marked, before):
    expected = w0 * (1.0 - 0.1 * 2 * 0.25 * m)
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_sap_forward_equal_and_weight_gradient_pruned():
  model = _model(normalize=True, sap_gamma=0.7)
  masks.init_sparse(model, 0.5, seed=7)
  x, y = _data()
  np.testing.assert_allclose(
    model(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-6
  )
  layers = masks.prunable_layers(model)

  def grads(training):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = LOSS(y, model(x, training=training))
    return tape.gradient(loss, [x] + [layer.kernel for layer in layers])

  g_sap, g_plain = grads(True), grads(False)
  np.testing.assert_allclose(g_sap[0], g_plain[0], rtol=1e-4, atol=1e-6)  # input exact
  assert not np.allclose(g_sap[1].numpy(), g_plain[1].numpy())  # weight gradient pruned
  for layer, g in zip(layers, g_sap[1:]):
    assert np.all(g.numpy()[layer.mask.numpy() == 0] == 0.0)


def test_symbolic_training_flag():
  layer = sl.MaskedDense(3, sap_gamma=0.5)
  x = tf.random.normal((4, 6))

  @tf.function
  def run(flag):
    return layer(x, training=flag)

  np.testing.assert_allclose(run(tf.constant(True)), run(tf.constant(False)), rtol=1e-6)


def test_get_config_from_config_round_trip():
  for layer in (
    sl.MaskedConv2D(
      8,
      (3, 1),
      strides=2,
      padding='same',
      use_bias=False,
      normalize=True,
      sap_gamma=0.7,
      kernel_initializer='he_normal',
      name='c',
    ),
    sl.MaskedDepthwiseConv2D(
      5, strides=2, padding='valid', depth_multiplier=2, normalize=True, sap_gamma=0.3, name='d'
    ),
    sl.MaskedDense(4, activation='relu', normalize=False, name='e'),
  ):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def _assert_same_weights(a, b):
  def short(v):  # the .keras loader does not always restore the layer-name prefix
    return v.name.split('/')[-1]

  assert [short(v) for v in a.weights] == [short(v) for v in b.weights]
  for va, vb in zip(a.weights, b.weights):
    np.testing.assert_array_equal(va.numpy(), vb.numpy())


@pytest.mark.parametrize('fmt', ['h5', 'tf'])
def test_save_load_weights_with_masks(tmp_path, fmt):
  model = _model(normalize=True, sap_gamma=0.5)
  masks.init_sparse(model, 0.3, seed=8)
  layers = masks.prunable_layers(model)
  sl.set_bae(model, [layer.mask.numpy() for layer in layers], 0.01)
  path = str(tmp_path / ('w.h5' if fmt == 'h5' else 'ckpt'))
  model.save_weights(path)
  other = _model(normalize=True, sap_gamma=0.5)
  other.load_weights(path)
  _assert_same_weights(model, other)
  assert masks.layer_nnz(other) == masks.layer_nnz(model)


def test_model_save_load_keras_format(tmp_path):
  model = _model(normalize=True, sap_gamma=0.5)
  masks.init_sparse(model, 0.3, seed=9)
  x, _ = _data(4)
  path = str(tmp_path / 'm.keras')
  model.save(path)
  loaded = tf.keras.models.load_model(path, custom_objects=sl.CUSTOM_OBJECTS)
  _assert_same_weights(model, loaded)
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
  assert [type(l) for l in masks.prunable_layers(loaded)] == [
    sl.MaskedConv2D,
    sl.MaskedDepthwiseConv2D,
    sl.MaskedDense,
  ]


def test_assign_masks_and_set_bae_validate_counts():
  model = _model()
  with pytest.raises(ValueError):
    sl.assign_masks(model, [np.ones((3, 3, 3, 6))])
  with pytest.raises(ValueError):
    sl.set_bae(model, [None], 0.1)
  with pytest.raises(ValueError):
    sl.set_bae(model, [None, None, None], -1.0)
  new = [np.zeros(layer.kernel.shape, np.float32) for layer in masks.prunable_layers(model)]
  for m in new:
    m.reshape(-1)[::3] = 1.0
  sl.assign_masks(model, new)
  for layer, m in zip(masks.prunable_layers(model), new):
    np.testing.assert_array_equal(layer.mask.numpy(), m)
    assert np.all(layer.kernel.numpy()[m == 0] == 0.0)
