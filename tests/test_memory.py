"""Tests of fedmef_tf.memory: the analytic footprint by hand, and real allocator measurements.

Specification (ALGORITHM.md, "Memory footprint"): analytic bytes of weights plus bytes cached
for the backward pass, layer by layer; measured peak of one compiled training step minus what
was resident before it. SAP (with 1-bit ReLUs) must lower the measured peak.
"""

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import memory
from fedmef_tf import sap
from fedmef_tf import sparse_layers as sl


def _tiny_sap_model():
  """Input (4, 4, 2) -> 3x3 conv (3 filters, SAP 0.5, no bias) -> BitReLU -> GAP -> dense 2."""
  inputs = tf.keras.Input((4, 4, 2))
  h = sl.MaskedConv2D(3, 3, padding='same', use_bias=False, sap_gamma=0.5, name='c')(inputs)
  h = sap.BitReLU(name='r')(h)
  h = tf.keras.layers.GlobalAveragePooling2D(name='p')(h)
  model = tf.keras.Model(inputs, sl.MaskedDense(2, sap_gamma=0.0, name='d')(h))
  mask = np.zeros(54, np.float32)
  mask[:20] = 1.0  # 20 of the 54 conv weights are active
  model.get_layer('c').set_mask(mask.reshape(3, 3, 2, 3))
  return model


def test_analytic_footprint_of_tiny_sap_model_by_hand():
  fp = memory.analytic_footprint(_tiny_sap_model(), batch_size=2)
  rows = {r['name']: r for r in fp['layers']}
  # conv input: 2*4*4*2 = 64 entries, k = ceil(0.5 * 64) = 32 kept: 4*32 values + 64/8 mask.
  assert rows['c']['cached_bytes'] == 4 * 32 + 8
  # BitReLU on 2*4*4*3 = 96 entries: 96 / 8 bytes. Pooling: nothing.
  assert rows['r']['cached_bytes'] == 12
  assert rows['p']['cached_bytes'] == 0
  # dense without SAP: its float input, 2*3 entries.
  assert rows['d']['cached_bytes'] == 4 * 6
  assert fp['cached_bytes'] == 136 + 12 + 24
  # Effective kernels kept for the input gradients: 54 + 6 entries.
  assert fp['kernel_cache_bytes'] == 4 * (54 + 6)
  # Dense gradients: conv kernel 54, dense kernel 6 and bias 2.
  assert fp['gradient_bytes'] == 4 * (54 + 6 + 2)
  # Weights: 20 nonzeros + 54-bit mask (7 bytes); 6 nonzeros + bias 2 + 6-bit mask (1 byte).
  assert fp['weight_bytes'] == (4 * 20 + 7) + (4 * (6 + 2) + 1)
  # As implemented: kernel, mask, marked (float32 each) + lambda, per layer, + bias.
  assert fp['weight_bytes_as_implemented'] == 4 * ((3 * 54 + 1) + (3 * 6 + 1 + 2))
  # Peak: the conv's backward. Held: conv cache 136, kernel 216, later gradients 32,
  # dy 4*96, rebuilt x_pruned 4*64 + int64 indices 8*32, filter gradient + masked product
  # 2*216.
  assert rows['c']['backward_live_bytes'] == 136 + 216 + 32 + 384 + (256 + 256) + 432
  # Conv forward: all kernels 240, input 256, selection max(4*64, 64 + 12*32) = 448.
  assert rows['c']['forward_live_bytes'] == 240 + 256 + 448
  assert fp['peak_bytes'] == 1712
  assert fp['peak_layer'] == 'c (backward)'
  assert fp['total_bytes'] == fp['weight_bytes'] + 1712


def test_analytic_gamma_override_and_zero_gamma():
  model = _tiny_sap_model()
  rows = {r['name']: r for r in memory.analytic_footprint(model, 2, gamma=0.75)['layers']}
  assert rows['c']['cached_bytes'] == 4 * 16 + 8  # k = 16 of 64
  assert rows['d']['cached_bytes'] == 4 * 2 + 1  # the override reaches the dense too
  rows = {r['name']: r for r in memory.analytic_footprint(model, 2, gamma=0.0)['layers']}
  assert rows['c']['cached_bytes'] == 0  # the model input is resident: no new bytes
  with pytest.raises(ValueError):
    memory.analytic_footprint(model, 0)


def test_analytic_counts_a_shared_float_tensor_once():
  inputs = tf.keras.Input((4, 4, 2))
  h = sl.MaskedConv2D(3, 3, padding='same', use_bias=False, name='c1')(inputs)
  h = tf.keras.layers.BatchNormalization(name='bn')(h)
  h = tf.keras.layers.ReLU(name='r')(h)
  h = sl.MaskedConv2D(2, 1, use_bias=False, name='c2')(h)
  h = tf.keras.layers.GlobalAveragePooling2D(name='p')(h)
  model = tf.keras.Model(inputs, sl.MaskedDense(2, name='d')(h))
  rows = {r['name']: r for r in memory.analytic_footprint(model, 2)['layers']}
  assert rows['c1']['cached_bytes'] == 0  # its input is the batch, resident
  assert rows['bn']['cached_bytes'] == 4 * 96  # BatchNorm keeps its input
  assert rows['r']['cached_bytes'] == 4 * 96  # ReLU keeps its output ...
  assert rows['c2']['cached_bytes'] == 0  # ... which is c2's input: counted once
  assert rows['d']['cached_bytes'] == 4 * 4


def _conv_stack(gamma: float, depth: int = 6, width: int = 32):
  """Small 32x32 conv stack; SAP with BitReLU when gamma > 0, plain conv + ReLU otherwise."""
  inputs = tf.keras.Input((32, 32, 3))
  h = inputs
  for i in range(depth):
    h = sl.MaskedConv2D(width, 3, padding='same', use_bias=False, sap_gamma=gamma, name=f'c{i}')(h)
    h = sap.BitReLU(name=f'r{i}')(h) if gamma > 0 else tf.keras.layers.ReLU(name=f'r{i}')(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  return tf.keras.Model(inputs, sl.MaskedDense(10, sap_gamma=gamma, name='fc')(h))


@pytest.fixture(scope='module')
def measured():
  plain = _conv_stack(0.0)
  pruned = _conv_stack(0.7)
  return {
    'plain': (plain, memory.measure_train_step_peak(plain, 32, steps=2)),
    'sap': (pruned, memory.measure_train_step_peak(pruned, 32, steps=2)),
  }


def test_measured_peak_is_lower_with_sap(measured):
  plain = measured['plain'][1]['peak_bytes']
  pruned = measured['sap'][1]['peak_bytes']
  # Plain caches 6 float activations of 32*32*32*32 entries (4 MiB each); SAP at 0.7 keeps
  # 1.45 bytes per entry instead of 4 (values, keep mask, ReLU bit).
  assert pruned < 0.8 * plain, (pruned, plain)


def test_measurement_fields_and_units(measured):
  for _, result in measured.values():
    assert result['peak_bytes_min'] <= result['peak_bytes'] <= result['peak_bytes_max']
    assert result['peak_bytes'] > 4 * 2**20  # at least one activation of 4 MiB
    assert result['resident_bytes'] >= 0
    assert 0.0 < result['step_seconds_min'] <= result['step_seconds'] < 60.0
    assert result['batch_size'] == 32


def test_analytic_peak_tracks_the_measurement(measured):
  for name, (model, result) in measured.items():
    predicted = memory.analytic_footprint(model, 32)['peak_bytes']
    ratio = predicted / result['peak_bytes']
    assert 0.65 < ratio < 1.35, (name, predicted, result['peak_bytes'])


def test_measured_peak_grows_with_batch():
  model = _conv_stack(0.0, depth=2, width=16)
  small = memory.measure_train_step_peak(model, 4, steps=1)['peak_bytes']
  large = memory.measure_train_step_peak(model, 32, steps=1)['peak_bytes']
  assert large > 4 * small
  with pytest.raises(ValueError):
    memory.measure_train_step_peak(model, 0)


def test_analytic_caps_kept_entries_after_a_relu_at_half():
  model = _conv_stack(0.3, depth=2, width=4)
  rows = {r['name']: r for r in memory.analytic_footprint(model, 2)['layers']}
  n = 2 * 32 * 32 * 4  # c1's input, the BitReLU output r0
  assert rows['c1']['cached_bytes'] == 4 * (n // 2) + n // 8  # not 4 * ceil(0.7 * n)
  n0 = 2 * 32 * 32 * 3  # c0's input is the batch: no cap
  assert rows['c0']['cached_bytes'] == 4 * sap.keep_count(n0, 0.3) + n0 // 8
