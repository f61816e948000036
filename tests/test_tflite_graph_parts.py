"""Pieces of the TFLite train graph traced in TF: batch-sliced convolutions, SAP's ranking,
the builtin-op weight gradient, the static SAP storage and the in-backward kernel updates, each
on its own and as parts of the export's execution strategy (`fedmef_tf.execution`).

`tflite_export.chunked_conv` must give `tf.nn.conv2d`'s values and gradients; the static SAP
storage may rank `x` instead of `|x|` only where the graph shows `x` cannot be negative.
"""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import sap
from fedmef_tf.sap import native as sap_native
from fedmef_tf import sparse_layers
from tflite_export import chunked_conv
from tflite_export import filter_grad
from tflite_export import layer_updates
from tflite_export import static_sap
from tflite_export import train_module


@pytest.mark.parametrize(
  'batch,size,c_in,c_out,k,stride,padding',
  [
    (8, 9, 3, 5, 3, 1, 'SAME'),
    (6, 16, 4, 8, 3, 2, 'SAME'),
    (4, 11, 5, 3, 3, 2, 'VALID'),
    (6, 7, 2, 4, 1, 2, 'SAME'),
  ],
)
def test_sliced_conv_equals_conv2d_with_the_same_gradients(
  batch, size, c_in, c_out, k, stride, padding
):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((batch, size, size, c_in)), tf.float32)
  w = tf.Variable(rng.standard_normal((k, k, c_in, c_out)).astype(np.float32))
  strides = (1, stride, stride, 1)
  # A budget of one example's im2col buffer: one example per slice.
  budget = chunked_conv.im2col_bytes([1, size, size, c_in], [k, k], strides, padding)
  assert chunked_conv.slice_count(batch, budget * batch, budget) == batch

  @tf.function
  def both(x):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      ref = tf.nn.conv2d(x, w, strides, padding)
      got = chunked_conv.conv2d(x, w, strides, padding, max_workspace_bytes=budget)
      up = tf.sin(ref)  # any upstream gradient
      ref_loss, got_loss = tf.reduce_sum(up * ref), tf.reduce_sum(up * got)
    grads = [tape.gradient(loss, [x, w]) for loss in (ref_loss, got_loss)]
    return ref, got, grads

  ref, got, ((dx_ref, dw_ref), (dx_got, dw_got)) = both(x)
  np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx_got.numpy(), dx_ref.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw_got.numpy(), dw_ref.numpy(), rtol=1e-5, atol=1e-4)
  graph = both.get_concrete_function(x).graph
  convs = [op for op in graph.get_operations() if op.type == 'Conv2D']
  assert len(convs) == 1 + batch  # the reference, plus one per slice


def test_slice_count_is_the_smallest_fitting_divisor():
  assert chunked_conv.slice_count(32, 9 << 20, 1 << 20) == 16  # 9 slices would not divide 32
  assert chunked_conv.slice_count(32, 1 << 20, 1 << 20) == 1
  assert chunked_conv.slice_count(12, 10, 3) == 4
  assert chunked_conv.slice_count(7, 100, 1) == 7  # cannot fit: one example per slice
  for batch, work, budget in [(32, 9000, 700), (24, 5000, 1000), (10, 99, 10)]:
    n = chunked_conv.slice_count(batch, work, budget)
    assert batch % n == 0
    assert all(batch % m or work > m * budget for m in range(1, n))


def test_im2col_bytes_follows_tflite_conv():
  # 1x1 stride 1 is a plain GEMM on the input: no buffer.
  assert chunked_conv.im2col_bytes([32, 16, 16, 64], [1, 1, 64, 8], (1, 1, 1, 1), 'SAME') == 0
  # The small CNN's second conv at batch 32: 32 * 16 * 16 * (3 * 3 * 32) floats = 9 MiB.
  assert (
    chunked_conv.im2col_bytes([32, 32, 32, 32], [3, 3, 32, 64], (1, 2, 2, 1), 'SAME') == 9 << 20
  )


def test_a_strategy_with_bounded_conv_slices_the_masked_conv_forward_only_in_its_scope():
  layer = sparse_layers.MaskedConv2D(4, 3, strides=2, padding='same', normalize=False)
  x = tf.random.stateless_normal((8, 8, 8, 16), seed=(1, 2))
  layer(x)  # build

  def traced_convs():
    fn = tf.function(lambda x: layer(x)).get_concrete_function(x)
    return sum(1 for op in fn.graph.get_operations() if op.type == 'Conv2D')

  before = traced_convs()
  with execution.scope(execution.Strategy(conv2d=chunked_conv.bounded(1024))):
    inside = traced_convs()
  assert before == 1 and inside == 8
  assert execution.current() is execution.DEFAULT
  assert traced_convs() == 1
  with pytest.raises(ValueError, match='positive'):
    chunked_conv.bounded(0)


@pytest.mark.parametrize('native', [False, True])
def test_known_nonnegative_reads_the_graph(native):
  if native and not sap_native.available():
    pytest.skip('native SAP kernels not built')
  seen = {}

  @tf.function
  def f(x):
    seen['relu'] = static_sap.known_nonnegative(tf.nn.relu(x))
    seen['relu6_through_identities'] = static_sap.known_nonnegative(
      tf.stop_gradient(tf.identity(tf.nn.relu6(x)))
    )
    seen['bit_relu'] = static_sap.known_nonnegative(sap.bit_relu(x))
    seen['scaled_relu'] = static_sap.known_nonnegative(2.0 * tf.nn.relu(x))
    seen['plain'] = static_sap.known_nonnegative(x + 1.0)
    return x

  with contextlib.nullcontext() if native else sap_native.portable():
    f(tf.zeros([2, 3]))
  assert seen == {
    'relu': True,
    'relu6_through_identities': True,
    'bit_relu': True,
    'scaled_relu': False,
    'plain': False,
  }
  assert not static_sap.known_nonnegative(tf.nn.relu(tf.ones([2])))  # eager: no graph


def test_compress_after_relu_keeps_the_largest_entries():
  rng = np.random.default_rng(3)
  z = tf.constant(rng.standard_normal((4, 6, 6, 5)), tf.float32)
  gamma = 0.7

  @tf.function
  def kept(z):
    values, indices = static_sap.TOPK.compress(tf.nn.relu(z), gamma)
    rebuilt = static_sap.TOPK.decompress(values, indices, z.shape.as_list())
    return rebuilt, sap.prune_input(tf.nn.relu(z), gamma)

  rebuilt, reference = kept(z)
  # Ties only at zero after a ReLU; zeros add nothing, so the rebuilt inputs are equal.
  np.testing.assert_array_equal(rebuilt.numpy(), reference.numpy())

  def abs_ops(fn):
    graph = tf.function(fn).get_concrete_function(z).graph
    return [op for op in graph.get_operations() if op.type == 'Abs']

  assert not abs_ops(lambda z: static_sap.TOPK.compress(tf.nn.relu(z), gamma))
  assert abs_ops(lambda z: static_sap.TOPK.compress(z, gamma))  # signed input: ranked by |x|


@pytest.mark.parametrize(
  'size,k,stride,padding',
  [
    ((9, 7), 3, 1, 'SAME'),
    ((9, 7), 3, 2, 'SAME'),
    ((8, 8), 3, 2, 'SAME'),
    ((9, 7), 3, 2, 'VALID'),
    ((8, 6), 1, 2, 'SAME'),
    ((6, 6), 5, 1, 'SAME'),
    ((5, 5), 5, 3, 'SAME'),
    ((6, 5), 1, 1, 'VALID'),
  ],
)
def test_builtin_filter_grad_equals_conv2d_backprop_filter(size, k, stride, padding):
  rng = np.random.RandomState(7)
  x = rng.standard_normal((3, *size, 4)).astype(np.float32)
  w_shape = [k, k, 4, 5]
  strides = (1, stride, stride, 1)
  y = tf.nn.conv2d(x, rng.standard_normal(w_shape).astype(np.float32), strides, padding)
  dy = rng.standard_normal(y.shape).astype(np.float32)
  expected = tf.raw_ops.Conv2DBackpropFilter(
    input=x, filter_sizes=w_shape, out_backprop=dy, strides=strides, padding=padding
  ).numpy()
  got = filter_grad.conv2d_filter_grad(x, dy, w_shape, strides, padding).numpy()
  assert got.shape == tuple(w_shape)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_tap_range_reads_only_inside_the_input():
  for size, out, k, stride, pad in ((9, 5, 3, 2, 1), (8, 4, 3, 2, 0), (5, 2, 5, 3, 1)):
    for tap in range(k):
      first, last = filter_grad.tap_range(size, out, tap, stride, pad)
      inside = [o for o in range(out) if 0 <= o * stride + tap - pad < size]
      assert list(range(first, last + 1)) == inside, (size, out, tap, stride, pad)


# -- the parts of a TFLite export's execution strategy -------------------------------------------


@pytest.mark.parametrize('gamma,relu', [(0.7, False), (0.3, False), (0.7, True)])
def test_topk_storage_keeps_the_set_of_the_packed_storage(gamma, relu):
  rng = np.random.default_rng(4)
  z = tf.constant(rng.standard_normal((3, 7, 7, 4)), tf.float32)  # no ties but at zero

  @tf.function
  def both(z):
    x = tf.nn.relu(z) if relu else z
    values, indices = static_sap.TOPK.compress(x, gamma)
    topk = static_sap.TOPK.decompress(values, indices, x.shape.as_list())
    packed = sap.PACKED.decompress(*sap.PACKED.compress(x, gamma), x.shape.as_list())
    return values, indices, topk, packed

  values, indices, topk, packed = both(z)
  k = sap.keep_count(z.shape.num_elements(), gamma)
  assert values.shape == (k,) and indices.dtype == tf.int32
  np.testing.assert_array_equal(topk.numpy(), packed.numpy())
  # A 1-bit activation's mask is kept as it is and comes back unchanged.
  mask = tf.constant(rng.uniform(size=(5, 3)) < 0.5)
  stored, shape = static_sap.TOPK.store_mask(mask)
  np.testing.assert_array_equal(static_sap.TOPK.load_mask(stored, shape, z).numpy(), mask.numpy())


def _small_model():
  layers = [
    sparse_layers.MaskedConv2D(
      6, 3, strides=2, padding='same', normalize=True, sap_gamma=0.6, use_bias=False, name='conv'
    ),
    sap.BitReLU(),
    sparse_layers.MaskedDepthwiseConv2D(
      3, padding='same', normalize=True, sap_gamma=0.6, name='dw'
    ),
    sap.BitReLU(),
    tf.keras.layers.Flatten(),
    sparse_layers.MaskedDense(5, sap_gamma=0.6, name='dense'),
  ]
  model = tf.keras.Sequential([tf.keras.Input((8, 8, 3))] + layers)
  rng = np.random.RandomState(0)
  for layer in sparse_layers.prunable_layers(model):
    layer.set_mask((rng.uniform(size=layer.kernel.shape) < 0.6).astype(np.float32))
    layer.set_bae(layer.mask.numpy() * (rng.uniform(size=layer.kernel.shape) < 0.5), 0.3)
    if layer.gain is not None:
      layer.gain.assign(rng.uniform(0.5, 1.5, size=layer.gain.shape).astype(np.float32))
  return model


def _loss_and_grads(model, x, y):
  with tf.GradientTape() as tape:
    logits = model(x, training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
  return loss, tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize('builtin_weight_grads', [True, False])
def test_sap_layers_under_the_tflite_strategy_give_the_default_gradients(builtin_weight_grads):
  model = _small_model()
  rng = np.random.RandomState(1)
  x = tf.constant(rng.standard_normal((4, 8, 8, 3)).astype(np.float32))
  y = tf.constant(rng.randint(0, 5, size=4).astype(np.int32))
  step = tf.function(lambda x, y: _loss_and_grads(model, x, y))
  loss_ref, grads_ref = step(x, y)
  strategy = train_module.tflite_strategy(
    max_im2col_bytes=256, builtin_weight_grads=builtin_weight_grads
  )
  with execution.scope(strategy):
    fn = tf.function(lambda x, y: _loss_and_grads(model, x, y)).get_concrete_function(x, y)
  ops = {op.type for op in fn.graph.get_operations()}
  assert 'TopKV2' in ops and 'FedmefSapCompress' not in ops and 'Bincount' not in ops
  assert ('Conv2DBackpropFilter' in ops) == (not builtin_weight_grads)
  loss, grads = fn(x, y)
  assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
  for g, g_ref, v in zip(grads, grads_ref, model.trainable_variables):
    np.testing.assert_allclose(
      g.numpy(),
      g_ref.numpy(),
      rtol=1e-4,
      atol=1e-5 * max(np.abs(g_ref.numpy()).max(), 1e-6),
      err_msg=v.name,
    )


def test_in_backward_updates_equal_the_plain_sgd_step():
  plain, fused = _small_model(), _small_model()
  fused.set_weights(plain.get_weights())
  rng = np.random.RandomState(2)
  x = tf.constant(rng.standard_normal((4, 8, 8, 3)).astype(np.float32))
  y = tf.constant(rng.randint(0, 5, size=4).astype(np.int32))
  lr = tf.Variable(0.1)
  _, grads = tf.function(lambda x, y: _loss_and_grads(plain, x, y))(x, y)
  for v, g in zip(plain.trainable_variables, grads):
    v.assign_sub(lr * g)
  for layer in sparse_layers.prunable_layers(plain):
    layer.kernel.assign(layer.kernel * layer.mask)

  updates = layer_updates.InBackwardUpdates(lr)

  @tf.function
  def fused_step(x, y):
    with execution.scope(execution.current().replace(layer_kernels=updates)):
      _, grads = _loss_and_grads(fused, x, y)
    done = {v.ref() for v in updates.updated}
    for v, g in zip(fused.trainable_variables, grads):
      if v.ref() not in done and g is not None:
        v.assign_sub(lr * g)

  fused_step(x, y)
  layers = sparse_layers.prunable_layers(fused)
  assert [v.name for v in updates.updated] == [
    v.name for layer in layers for v in (layer.kernel, layer.gain) if v is not None
  ]
  for a, b in zip(plain.variables, fused.variables):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
  for layer in layers:
    assert not np.any(layer.kernel.numpy()[layer.mask.numpy() == 0])
  with pytest.raises(ValueError, match='called twice'):
    with execution.scope(execution.DEFAULT.replace(layer_kernels=updates)):
      fused(x, training=True)
