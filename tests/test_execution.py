"""`fedmef_tf.execution`: the strategy object, its scope, and each choice it holds as the layer and
SAP code read it (storage, convolution, backward order, native kernels, layer kernels)."""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import execution
from fedmef_tf import growth
from fedmef_tf import sap
from fedmef_tf.sap import native as sap_native
from fedmef_tf import sparse_layers


def test_default_strategy_is_plain_tensorflow():
  s = execution.current()
  assert s is execution.DEFAULT
  assert s.sap_storage == execution.STORED
  assert s.conv2d is execution.tf_conv2d
  assert s.conv2d_filter_grad is execution.tf_conv2d_filter_grad
  assert not s.data_dependencies and s.native_kernels and s.layer_kernels is None
  assert execution.TFF_SIMULATION.sap_storage == execution.SIMULATED
  assert not execution.TFF_SIMULATION.native_kernels


def test_scope_nests_and_restores():
  inner = execution.DEFAULT.replace(data_dependencies=True)
  with execution.scope(execution.TFF_SIMULATION) as outer:
    assert execution.current() is outer is execution.TFF_SIMULATION
    with execution.scope(inner):
      assert execution.current() is inner
    assert execution.current() is execution.TFF_SIMULATION
  assert execution.current() is execution.DEFAULT
  with pytest.raises(RuntimeError):
    with execution.scope(inner):
      raise RuntimeError('left by an exception')
  assert execution.current() is execution.DEFAULT


def test_strategy_validates_its_fields():
  with pytest.raises(ValueError, match='sap_storage'):
    execution.Strategy(sap_storage='fast')
  with pytest.raises(TypeError, match='sap_storage'):
    execution.Strategy(sap_storage=3)
  with pytest.raises(TypeError, match='layer_kernels'):
    execution.Strategy(layer_kernels=object())
  with pytest.raises(TypeError, match='Strategy'):
    with execution.scope('simulated'):
      pass
  with pytest.raises(AttributeError):  # frozen
    execution.DEFAULT.native_kernels = False  # pylint: disable=assigning-non-slot


def test_sap_strategy_and_portable_scope_the_current_strategy():
  with sap.strategy(sap.SIMULATED):
    assert execution.current().sap_storage == sap.SIMULATED
    assert sap.current_strategy() == sap.SIMULATED
    with sap_native.portable():
      assert execution.current().sap_storage == sap.SIMULATED
      assert not execution.current().native_kernels
      assert not sap_native.enabled()
  assert execution.current() is execution.DEFAULT


def test_native_kernels_off_in_the_strategy_disables_them():
  if not sap_native.available():
    pytest.skip('native SAP kernels not built')
  assert sap_native.enabled() == (not tf.config.list_physical_devices('GPU'))
  with execution.scope(execution.DEFAULT.replace(native_kernels=False)):
    assert not sap_native.enabled()


def test_after_adds_a_data_dependency_only_where_the_strategy_asks():
  t, dep = tf.constant([1.0, 2.0]), tf.constant([float('nan'), 3.0])
  assert sap.after(t, dep) is t
  with execution.scope(execution.DEFAULT.replace(data_dependencies=True)):
    got = sap.after(t, dep)
  assert got is not t
  np.testing.assert_array_equal(got.numpy(), t.numpy())  # the zero is 0 even from a NaN
  assert sap.after(t, dep, always=True) is not t


def _conv_grads(fn, x, w):
  with tf.GradientTape() as tape:
    tape.watch([x, w])
    y = fn(x, w)
    loss = tf.reduce_sum(tf.sin(y))
  return (y, *tape.gradient(loss, [x, w]))


def test_the_strategy_s_conv2d_and_filter_grad_are_what_sap_conv2d_runs():
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((2, 6, 6, 3)), tf.float32)
  w = tf.constant(rng.standard_normal((3, 3, 3, 4)), tf.float32)
  calls = []

  def conv2d(x, w, strides, padding):
    calls.append('conv2d')
    return execution.tf_conv2d(x, w, strides, padding)

  def filter_grad(x, dy, w_shape, strides, padding):
    calls.append('filter_grad')
    return execution.tf_conv2d_filter_grad(x, dy, w_shape, strides, padding)

  reference = _conv_grads(lambda x, w: sap.sap_conv2d(x, w, 1, 'SAME', 0.5), x, w)
  with execution.scope(execution.Strategy(conv2d=conv2d, conv2d_filter_grad=filter_grad)):
    got = _conv_grads(lambda x, w: sap.sap_conv2d(x, w, 1, 'SAME', 0.5), x, w)
    plain = _conv_grads(lambda x, w: sap.sap_conv2d(x, w, 1, 'SAME', 0.0), x, w)
  assert calls == ['conv2d', 'filter_grad', 'conv2d']  # gamma 0: the plain op's own gradient
  for a, b in zip(got, reference):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  np.testing.assert_array_equal(plain[0].numpy(), reference[0].numpy())


def test_masked_conv_forward_is_the_strategy_s_conv2d():
  layer = sparse_layers.MaskedConv2D(4, 3, padding='same')
  x = tf.random.stateless_normal((2, 5, 5, 3), seed=(3, 4))
  expected = layer(x)
  seen = []

  def conv2d(x, w, strides, padding):
    seen.append((tuple(strides), padding))
    return execution.tf_conv2d(x, w, strides, padding)

  with execution.scope(execution.Strategy(conv2d=conv2d)):
    got = layer(x)
  assert seen == [((1, 1, 1, 1), 'SAME')]
  np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_input_grad_kernel_is_made_after_the_weight_gradient_and_used_for_dx():
  rng = np.random.default_rng(1)
  x = tf.constant(rng.standard_normal((2, 5, 5, 3)), tf.float32)
  w = tf.constant(rng.standard_normal((3, 3, 3, 2)), tf.float32)
  seen = []

  def remade(dw):
    seen.append(dw.shape.as_list())
    return w * 2.0  # a different kernel, to show that dx uses it

  for op, kw in (
    (sap.sap_conv2d, dict(strides=1, padding='SAME')),
    (sap.sap_depthwise_conv2d, dict(strides=1, padding='SAME')),
  ):
    wk = w if op is sap.sap_conv2d else w[..., :1]
    _, dx_ref, dw_ref = _conv_grads(lambda x, w, op=op: op(x, w, gamma=0.5, **kw), x, wk)
    kernel = (lambda dw: remade(dw)) if op is sap.sap_conv2d else (lambda dw: wk * 2.0)
    _, dx, dw = _conv_grads(
      lambda x, w, op=op, kernel=kernel: op(x, w, gamma=0.5, input_grad_kernel=kernel, **kw), x, wk
    )
    np.testing.assert_array_equal(dw.numpy(), dw_ref.numpy())
    np.testing.assert_allclose(dx.numpy(), 2.0 * dx_ref.numpy(), rtol=1e-6, atol=1e-6)
  assert seen == [[3, 3, 3, 2]]
  xm, wm = tf.reshape(x, [2, -1]), tf.constant(rng.standard_normal((75, 4)), tf.float32)
  _, dx_ref, _ = _conv_grads(lambda x, w: sap.sap_matmul(x, w, 0.5), xm, wm)
  _, dx, _ = _conv_grads(
    lambda x, w: sap.sap_matmul(x, w, 0.5, input_grad_kernel=lambda dw: wm * 2.0), xm, wm
  )
  np.testing.assert_allclose(dx.numpy(), 2.0 * dx_ref.numpy(), rtol=1e-6, atol=1e-6)


class _Recording(execution.ActivationStorage):
  """The packed storage, counting its calls."""

  def __init__(self):
    self.calls = []

  def compress(self, x, gamma):
    self.calls.append('compress')
    return sap.PACKED.compress(x, gamma)

  def decompress(self, first, second, shape):
    self.calls.append('decompress')
    return sap.PACKED.decompress(first, second, shape)

  def store_mask(self, mask):
    self.calls.append('store_mask')
    return sap.PACKED.store_mask(mask)

  def load_mask(self, stored, shape, dy):
    self.calls.append('load_mask')
    return sap.PACKED.load_mask(stored, shape, dy)


def test_sap_ops_and_bit_relu_keep_their_inputs_in_the_strategy_s_storage():
  rng = np.random.default_rng(2)
  x = tf.constant(rng.standard_normal((2, 6, 6, 3)), tf.float32)
  w = tf.constant(rng.standard_normal((3, 3, 3, 4)), tf.float32)

  def net(x, w):
    return sap.bit_relu(sap.sap_conv2d(x, w, 1, 'SAME', 0.6))

  reference = _conv_grads(net, x, w)
  storage = _Recording()
  with execution.scope(execution.Strategy(sap_storage=storage, native_kernels=False)):
    got = _conv_grads(net, x, w)
  assert sorted(storage.calls) == ['compress', 'decompress', 'load_mask', 'store_mask']
  for a, b in zip(got, reference):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


class _Doubling(execution.LayerKernels):
  """Runs the layer's op with twice its effective kernel."""

  def __init__(self):
    self.layers = []

  def apply(self, layer, inputs, op):
    self.layers.append(layer.name)
    return op(inputs, 2.0 * layer.effective_kernel())


def test_layer_kernels_update_nothing_in_the_backward_pass_by_default():
  assert tuple(_Doubling().updated_in_backward()) == ()


def test_masked_layers_make_their_kernel_through_the_strategy_s_layer_kernels():
  layer = sparse_layers.MaskedDense(3, use_bias=False, name='dense')
  x = tf.random.stateless_normal((4, 5), seed=(5, 6))
  expected = layer(x)
  kernels = _Doubling()
  with execution.scope(execution.Strategy(layer_kernels=kernels)):
    got = layer(x)
    probe_grads = growth.dense_kernel_gradients(
      layer, x, tf.zeros([4, 3]), lambda y, p: tf.reduce_sum(p)
    )
  assert kernels.layers == ['dense']  # the probe of the growth score takes the plain kernel
  np.testing.assert_allclose(got.numpy(), 2.0 * expected.numpy(), rtol=1e-6)
  np.testing.assert_allclose(
    probe_grads[0].numpy(), np.tile(x.numpy().sum(0)[:, None], (1, 3)), rtol=1e-5
  )
