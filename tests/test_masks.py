"""Specification tests of fedmef_tf.masks: prunable layers, ERK densities, random masks."""

import math
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import masks
from fedmef_tf import sparse_layers as sl

# Kernel shapes of a small conv net: stem, two convs, depthwise, classifier.
SHAPES = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (3, 3, 64, 1), (64, 10)]


def _erk_reference(shapes, density):
  """ERK by bisection on eps: sum_l n_l min(1, eps raw_l) = d sum_l n_l."""
  sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
  raw = np.array([sum(s) / np.prod(s) for s in shapes], dtype=np.float64)
  lo, hi = 0.0, 1.0 / raw.min() * 10
  for _ in range(200):
    mid = (lo + hi) / 2
    if (sizes * np.minimum(1.0, mid * raw)).sum() < density * sizes.sum():
      lo = mid
    else:
      hi = mid
  return np.minimum(1.0, hi * raw)


@pytest.mark.parametrize('density', [0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_global_density_exact(density):
  d = np.array(masks.erk_densities(SHAPES, density))
  sizes = np.array([np.prod(s) for s in SHAPES])
  assert np.all(d > 0) and np.all(d <= 1)
  assert (d * sizes).sum() == pytest.approx(density * sizes.sum(), rel=1e-12)
  # After rounding each layer to whole weights, off by at most half a weight per layer.
  counts = [math.floor(di * n + 0.5) for di, n in zip(d, sizes)]
  assert abs(sum(counts) - density * sizes.sum()) <= 0.5 * len(SHAPES)
  np.testing.assert_allclose(d, _erk_reference(SHAPES, density), rtol=1e-9)


def test_erk_proportional_to_sum_over_prod_below_cap():
  d = np.array(masks.erk_densities(SHAPES, 0.05))
  raw = np.array([sum(s) / np.prod(s) for s in SHAPES])
  free = d < 1.0
  ratio = d[free] / raw[free]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)


def test_erk_dense_cap_iterative():
  # A tiny layer (raw = 11/24) next to big ones: at 0.5 it would exceed 1 and must be dense,
  # and then the remaining layers are rescaled so the total is still exact.
  shapes = [(2, 3, 1, 4), (3, 3, 64, 64), (3, 3, 64, 128), (128, 10)]
  density = 0.5
  d = np.array(masks.erk_densities(shapes, density))
  sizes = np.array([np.prod(s) for s in shapes])
  raw = np.array([sum(s) / np.prod(s) for s in shapes])
  assert d[0] == 1.0
  assert d[3] == 1.0  # 138 / 1280 * eps > 1 too at this density
  assert np.all(d[1:3] < 1.0)
  assert (d * sizes).sum() == pytest.approx(density * sizes.sum(), rel=1e-12)
  # The naive one-shot scaling would put the small layers above 1.
  eps_naive = density * sizes.sum() / (sizes * raw).sum()
  assert eps_naive * raw[0] > 1.0
  np.testing.assert_allclose(d, _erk_reference(shapes, density), rtol=1e-9)


def test_erk_density_one_and_validation():
  assert masks.erk_densities(SHAPES, 1.0) == [1.0] * len(SHAPES)
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError):
      masks.erk_densities(SHAPES, bad)
  with pytest.raises(ValueError):
    masks.erk_densities([], 0.5)
  with pytest.raises(ValueError):
    masks.erk_densities([(3, 0, 2)], 0.5)


def test_random_masks_exact_count_and_values():
  densities = [0.3, 0.123, 0.5, 1.0, 0.0]
  ms = masks.random_masks(SHAPES, densities, seed=7)
  for m, s, d in zip(ms, SHAPES, densities):
    assert m.shape == s and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    n = int(np.prod(s))
    assert int(m.sum()) == math.floor(d * n + 0.5)


def test_random_masks_seeded():
  d = masks.erk_densities(SHAPES, 0.2)
  a = masks.random_masks(SHAPES, d, seed=3)
  b = masks.random_masks(SHAPES, d, seed=3)
  c = masks.random_masks(SHAPES, d, seed=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))
  # Layers draw independent positions (not the same flat prefix pattern).
  assert not np.array_equal(a[1].ravel()[:100], a[2].ravel()[:100])


def test_random_masks_validation():
  with pytest.raises(ValueError):
    masks.random_masks(SHAPES, [0.5], seed=0)
  with pytest.raises(ValueError):
    masks.random_masks(SHAPES[:1], [1.5], seed=0)


def _nested_model():
  inner_in = tf.keras.Input((8, 8, 4))
  h = sl.MaskedConv2D(6, 3, padding='same', name='inner_conv')(inner_in)
  h = tf.keras.layers.ReLU()(h)
  h = sl.MaskedDepthwiseConv2D(3, padding='same', name='inner_dw')(h)
  inner = tf.keras.Model(inner_in, h, name='inner')

  inp = tf.keras.Input((8, 8, 3))
  h = sl.MaskedConv2D(4, 3, padding='same', name='stem')(inp)
  h = inner(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  out = sl.MaskedDense(10, name='head')(h)
  return tf.keras.Model(inp, out)


def test_prunable_layers_depth_first_order():
  model = _nested_model()
  names = [layer.name for layer in masks.prunable_layers(model)]
  assert names == ['stem', 'inner_conv', 'inner_dw', 'head']
  assert masks.layer_sizes(model) == [3 * 3 * 3 * 4, 3 * 3 * 4 * 6, 3 * 3 * 6, 6 * 10]


def test_prunable_layers_shared_layer_once():
  shared = sl.MaskedDense(4, name='shared')
  inp = tf.keras.Input((4,))
  out = shared(shared(inp))
  model = tf.keras.Model(inp, out)
  assert [layer.name for layer in masks.prunable_layers(model)] == ['shared']


class _Composite(tf.keras.layers.Layer):
  """A custom layer owning masked layers: as attributes (not in name order) and in a list."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.z = sl.MaskedDense(3, name='z')
    self.a = sl.MaskedDense(3, name='a')
    self.blocks = [sl.MaskedDense(3, name='b1'), sl.MaskedDense(3, name='b0')]

  def call(self, x):
    return self.a(self.z(x)) + self.blocks[0](x) + self.blocks[1](x)


def test_prunable_layers_of_a_custom_layer_in_the_order_it_tracks_them():
  inp = tf.keras.Input((3,))
  model = tf.keras.Model(inp, sl.MaskedDense(3, name='head')(_Composite()(inp)))
  assert [layer.name for layer in masks.prunable_layers(model)] == ['z', 'a', 'b1', 'b0', 'head']
  composite = model.layers[1]
  assert [layer.name for layer in masks.prunable_layers(composite)] == ['z', 'a', 'b1', 'b0']


def _resnet18_order():
  names = ['stem_conv']
  for stage in range(1, 5):
    for block in range(2):
      names += [f'layer{stage}_{block}_conv1', f'layer{stage}_{block}_conv2']
      if stage > 1 and block == 0:
        names.append(f'layer{stage}_0_shortcut_conv')
  return names + ['classifier']


_REGISTRY_ORDER = {
  'cnn': ['stem_conv', 'conv1_conv', 'conv2_conv', 'conv3_conv', 'classifier'],
  'resnet18': _resnet18_order(),
  'mobilenet_v2': ['stem_conv', 'block0_dw', 'block0_project']
  + [f'block{i}_{part}' for i in range(1, 17) for part in ('expand', 'dw', 'project')]
  + ['last_conv', 'classifier'],
}


@pytest.mark.parametrize('variant', ['fedmef', 'baseline'])
@pytest.mark.parametrize('name', sorted(_REGISTRY_ORDER))
def test_prunable_layers_order_of_the_registry_models(name, variant):
  from fedmef_tf import models  # pylint: disable=import-outside-toplevel

  model = models.build_model(name, variant, input_shape=(16, 16, 3))
  names = [layer.name for layer in masks.prunable_layers(model)]
  assert names == _REGISTRY_ORDER[name]
  # The layer index l is the order of the model's layers.
  assert names == [layer.name for layer in model.layers if isinstance(layer, sl.MaskedLayer)]


@pytest.mark.parametrize('density', [0.1, 0.3])
def test_init_sparse(density):
  model = _nested_model()
  ms = masks.init_sparse(model, density, seed=1)
  layers = masks.prunable_layers(model)
  shapes = [tuple(layer.kernel.shape) for layer in layers]
  expected = masks.random_masks(shapes, masks.erk_densities(shapes, density), seed=1)
  sizes = [int(np.prod(s)) for s in shapes]
  for layer, m, e in zip(layers, ms, expected):
    np.testing.assert_array_equal(layer.mask.numpy(), e)
    np.testing.assert_array_equal(m, e)
    kernel = layer.kernel.numpy()
    assert np.all(kernel[e == 0] == 0.0)
    assert np.count_nonzero(kernel[e == 1]) == int(e.sum())  # random init is nonzero
    assert np.all(layer.marked.numpy() == 0.0) and float(layer.bae_lambda.numpy()) == 0.0
  nnz = masks.layer_nnz(model)
  assert nnz == [int(e.sum()) for e in expected]
  assert masks.global_density(model) == pytest.approx(sum(nnz) / sum(sizes))
  assert abs(sum(nnz) - density * sum(sizes)) <= 0.5 * len(layers)


def test_init_sparse_density_one_and_no_layers():
  model = _nested_model()
  masks.init_sparse(model, 1.0, seed=0)
  assert masks.global_density(model) == 1.0
  plain = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
  with pytest.raises(ValueError):
    masks.init_sparse(plain, 0.5, seed=0)
