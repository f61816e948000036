"""Specification tests of fedmef_tf.models: the registry, the two variants, counts and training."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

import fedmef_tf
from fedmef_tf import data
from fedmef_tf import growth
from fedmef_tf import masks
from fedmef_tf import models
from fedmef_tf import sap
from fedmef_tf import sparse_layers as sl

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _all_layers(model):
  out = []
  for layer in model.layers:
    out.append(layer)
    if isinstance(layer, tf.keras.Model):
      out.extend(_all_layers(layer))
  return out


_CACHE = {}


def _built(name, variant, **kwargs):
  """Models are built once per argument set (ResNet18 takes a second on 2 cores)."""
  key = (name, variant, tuple(sorted(kwargs.items())))
  if key not in _CACHE:
    _CACHE[key] = models.build_model(name, variant, **kwargs)
  return _CACHE[key]


def test_registry_names_and_validation():
  assert models.MODEL_NAMES == ('cnn', 'resnet18', 'mobilenet_v2')
  assert models.VARIANTS == ('fedmef', 'baseline')
  for kwargs in (
    {'name': 'vgg', 'variant': 'fedmef'},
    {'name': 'cnn', 'variant': 'dense'},
    {'name': 'cnn', 'variant': 'fedmef', 'num_classes': 0},
    {'name': 'cnn', 'variant': 'fedmef', 'density': 0.0},
    {'name': 'cnn', 'variant': 'fedmef', 'density': 1.2},
    {'name': 'cnn', 'variant': 'fedmef', 'gamma': -0.1},
    {'name': 'cnn', 'variant': 'fedmef', 'input_shape': (32, 32)},
  ):
    name, variant = kwargs.pop('name'), kwargs.pop('variant')
    with pytest.raises(ValueError):
      models.build_model(name, variant, **kwargs)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_variants_structure(name):
  fed = _built(name, 'fedmef', gamma=0.7)
  base = _built(name, 'baseline', gamma=0.7)
  fed_layers, base_layers = _all_layers(fed), _all_layers(base)
  # No BatchNorm anywhere in FedMef; BN in the baseline.
  assert not any(isinstance(l, tf.keras.layers.BatchNormalization) for l in fed_layers)
  assert any(isinstance(l, tf.keras.layers.BatchNormalization) for l in base_layers)
  # Activations: 1-bit-caching BitReLU in FedMef, plain ReLU in the baseline.
  assert not any(
    isinstance(l, (tf.keras.layers.ReLU, tf.keras.layers.Activation)) for l in fed_layers
  )
  assert any(isinstance(l, sap.BitReLU) for l in fed_layers)
  assert not any(isinstance(l, sap.BitReLU) for l in base_layers)
  # Every kernel of the model belongs to a masked (prunable) layer, stem and classifier too.
  for model in (fed, base):
    prunable = masks.prunable_layers(model)
    kernel_ids = {id(l.kernel) for l in prunable}
    for v in model.trainable_weights:
      if v.shape.rank in (2, 4):
        assert id(v) in kernel_ids, v.name
    assert prunable[0].name == 'stem_conv' and prunable[-1].name == 'classifier'
  for layer in masks.prunable_layers(fed):
    assert layer.normalize  # NSConv everywhere, the classifier included
    assert layer.sap_gamma == pytest.approx(0.7)
    assert layer.use_bias
  for layer in masks.prunable_layers(base):
    assert not layer.normalize and layer.sap_gamma == 0.0
    assert layer.use_bias == isinstance(layer, sl.MaskedDense)
  # Same prunable kernels (names and shapes) in both variants.
  assert [(l.name, tuple(l.kernel.shape)) for l in masks.prunable_layers(fed)] == [
    (l.name, tuple(l.kernel.shape)) for l in masks.prunable_layers(base)
  ]


def test_parameter_counts():
  counts = {
    (n, v): models.count_parameters(_built(n, v, gamma=0.7))
    for n in models.MODEL_NAMES
    for v in models.VARIANTS
  }
  r_fed, r_base = counts[('resnet18', 'fedmef')], counts[('resnet18', 'baseline')]
  assert 11.1e6 < r_base['trainable'] < 11.3e6
  assert 11.1e6 < r_fed['trainable'] < 11.3e6
  m_base = counts[('mobilenet_v2', 'baseline')]
  assert 2.1e6 < m_base['trainable'] < 2.4e6
  assert counts[('cnn', 'baseline')]['trainable'] < 500_000
  for n in models.MODEL_NAMES:
    fed, base = counts[(n, 'fedmef')], counts[(n, 'baseline')]
    assert fed['prunable'] == base['prunable']
    assert fed['nonzero'] == fed['prunable']  # density 1
    # FedMef: bias + gain per conv channel and per logit (the NSConv classifier);
    # baseline: BN scale + offset per channel, a bias per logit.
    assert fed['dense'] == base['dense'] + 10
    assert fed['state'] == 0 and base['state'] > 0  # BN moving statistics
    assert (
      fed['mask']
      == base['mask']
      == 2 * fed['prunable'] + len(masks.prunable_layers(_built(n, 'fedmef', gamma=0.7)))
    )
    # Dense parameters are a small share: the pruning budget covers nearly everything.
    assert fed['dense'] < 0.02 * fed['prunable']


@pytest.mark.parametrize('name', models.MODEL_NAMES)
@pytest.mark.parametrize(
  'variant,num_classes,input_shape',
  [
    ('fedmef', 7, (24, 24, 1)),
    ('baseline', 100, (40, 36, 3)),
  ],
)
def test_forward_shapes_other_classes_and_sizes(name, variant, num_classes, input_shape):
  model = models.build_model(
    name, variant, num_classes=num_classes, input_shape=input_shape, gamma=0.5
  )
  x = tf.random.uniform((2,) + input_shape)
  for training in (False, True):
    y = model(x, training=training)
    assert y.shape == (2, num_classes)
    assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2'])
def test_fedmef_signal_neither_vanishes_nor_explodes(name):
  # Without BN the scale must be kept by NSConv; measured at the pooled features.
  model = _built(
    name,
    'fedmef',
    density=0.1,
    gamma=0.7,
    input_mean=(0.5,) * 3,
    input_std=(float(np.sqrt(1 / 12)),) * 3,
  )  # of uniform [0, 1) pixels
  features = tf.keras.Model(model.input, model.get_layer('pool').output)
  x = tf.random.uniform((8, 32, 32, 3))
  std = float(tf.math.reduce_std(features(x)))
  assert 0.02 < std < 50.0


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_fedmef_stem_reads_the_normalised_images_uncentred(name):
  fed = _built(name, 'fedmef', gamma=0.7)
  stem = fed.get_layer('stem_conv')
  assert stem.act_gain == 1.0 and not stem.center and not stem.center_output
  convs = [
    l
    for l in masks.prunable_layers(fed)
    if l.name != 'stem_conv' and not isinstance(l, sl.MaskedDense)
  ]
  assert convs and all(l.center_output for l in convs)
  # Depthwise kernels are not centred (their fan-in is spatial only); the others are.
  assert all(l.center == (not isinstance(l, sl.MaskedDepthwiseConv2D)) for l in convs)
  classifier = fed.get_layer('classifier')
  assert classifier.normalize and classifier.act_gain > 1.0
  base = _built(name, 'baseline', gamma=0.7)
  assert all(l.act_gain == 1.0 and not l.normalize for l in masks.prunable_layers(base))


def test_fedmef_cnn_activations_have_unit_scale_on_normalised_images():
  # The input layer normalises with the training split's statistics; every NSConv then
  # keeps unit-variance pre-activations.
  train = data.synthetic(200, 10, seed=0).train_images
  mean, std = data.channel_stats(train)
  model = models.build_model(
    'cnn', 'fedmef', density=0.1, gamma=0.7, input_mean=mean, input_std=std
  )
  names = ['stem_conv'] + [f'conv{i}_conv' for i in range(1, len(models.CNN_LAYERS))]
  probe = tf.keras.Model(model.input, [model.get_layer(n).output for n in names])
  x = tf.cast(train[:64], tf.float32) / 255.0
  for name, y in zip(names, probe(x, training=True)):
    rms = float(tf.sqrt(tf.reduce_mean(tf.square(y))))
    assert 0.5 < rms < 2.0, (name, rms)


def test_density_seed_and_same_masks_across_variants():
  fed = models.build_model('cnn', 'fedmef', density=0.1, seed=3)
  base = models.build_model('cnn', 'baseline', density=0.1, seed=3)
  sizes = masks.layer_sizes(fed)
  assert abs(sum(masks.layer_nnz(fed)) - 0.1 * sum(sizes)) <= 0.5 * len(sizes)
  for a, b in zip(masks.prunable_layers(fed), masks.prunable_layers(base)):
    np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    assert np.all(a.kernel.numpy()[a.mask.numpy() == 0] == 0.0)
  again = models.build_model('cnn', 'fedmef', density=0.1, seed=3)
  for v, w in zip(fed.weights, again.weights):
    np.testing.assert_array_equal(v.numpy(), w.numpy())
  other = models.build_model('cnn', 'fedmef', density=0.1, seed=4)
  assert not np.array_equal(
    fed.get_layer('conv1_conv').mask.numpy(), other.get_layer('conv1_conv').mask.numpy()
  )
  assert not np.array_equal(
    fed.get_layer('conv1_conv').kernel.numpy(), other.get_layer('conv1_conv').kernel.numpy()
  )


def test_lean_add_and_pool_match_tf_ops():
  a = tf.random.normal((2, 5, 4, 3))
  b = tf.random.normal((2, 5, 4, 3))
  up = tf.random.normal((2, 3))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([a, b])
    lean = models.GlobalAvgPool()(models.ResidualAdd()([a, b]))
    ref = tf.reduce_mean(a + b, axis=[1, 2])
    lean_loss = tf.reduce_sum(lean * up)
    ref_loss = tf.reduce_sum(ref * up)
  np.testing.assert_allclose(lean, ref, rtol=1e-6)
  for g, r in zip(tape.gradient(lean_loss, [a, b]), tape.gradient(ref_loss, [a, b])):
    np.testing.assert_allclose(g, r, rtol=1e-6)


@pytest.mark.parametrize('variant', models.VARIANTS)
def test_cnn_fit_learns_synthetic_data_and_keeps_masks(variant):
  tf.keras.utils.set_random_seed(0)
  ds = data.synthetic(num_train=1500, num_test=500, seed=0)
  x_train = ds.train_images.astype(np.float32) / 255.0
  x_test = ds.test_images.astype(np.float32) / 255.0
  model = models.build_model('cnn', variant, density=0.2, gamma=0.7, seed=0)
  model.compile(tf.keras.optimizers.SGD(0.05, momentum=0.9), LOSS, metrics=['accuracy'])
  model.fit(x_train, ds.train_labels, batch_size=32, epochs=2, verbose=0)
  _, acc = model.evaluate(x_test, ds.test_labels, verbose=0)
  assert acc > 0.3  # chance is 0.1
  for layer in masks.prunable_layers(model):
    assert np.all(layer.kernel.numpy()[layer.mask.numpy() == 0] == 0.0)
  assert masks.layer_nnz(model) == masks.layer_nnz(
    models.build_model('cnn', variant, density=0.2, seed=0)
  )


def test_dense_kernel_gradients_on_baseline_leaves_bn_statistics():
  model = models.build_model('cnn', 'baseline', density=0.2)
  bn = [v.numpy().copy() for v in model.non_trainable_weights if 'moving' in v.name]
  x = tf.random.uniform((4, 32, 32, 3))
  y = tf.constant([0, 1, 2, 3])
  grads = growth.dense_kernel_gradients(model, x, y, LOSS)
  assert len(grads) == len(masks.prunable_layers(model))
  assert all(np.any(g.numpy() != 0.0) for g in grads)
  after = [v.numpy() for v in model.non_trainable_weights if 'moving' in v.name]
  for b, a in zip(bn, after):
    np.testing.assert_array_equal(a, b)


def test_fedmef_model_save_load(tmp_path):
  model = models.build_model(
    'mobilenet_v2', 'fedmef', num_classes=4, input_shape=(8, 8, 3), density=0.2, gamma=0.7
  )
  path = str(tmp_path / 'm.keras')
  model.save(path)
  loaded = tf.keras.models.load_model(path, custom_objects=models.CUSTOM_OBJECTS)
  x = tf.random.uniform((2, 8, 8, 3))
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
  assert masks.layer_nnz(loaded) == masks.layer_nnz(model)
  for a, b in zip(masks.prunable_layers(loaded), masks.prunable_layers(model)):
    np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    assert a.sap_gamma == b.sap_gamma and a.act_gain == b.act_gain


def _train_step_peak_bytes(model, batch):
  opt = tf.keras.optimizers.SGD(0.1)

  @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3]), tf.TensorSpec([None], tf.int32)])
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  x = tf.random.uniform((batch, 32, 32, 3))
  y = tf.zeros((batch,), tf.int32)
  step(x, y)
  before = tf.config.experimental.get_memory_info('CPU:0')['current']
  tf.config.experimental.reset_memory_stats('CPU:0')
  step(x, y)
  return tf.config.experimental.get_memory_info('CPU:0')['peak'] - before


def test_fedmef_cnn_training_step_uses_less_memory_than_baseline():
  base = _train_step_peak_bytes(models.build_model('cnn', 'baseline', density=0.2), 64)
  fed = _train_step_peak_bytes(models.build_model('cnn', 'fedmef', density=0.2, gamma=0.7), 64)
  assert fed < 0.9 * base


def test_fedmef_resnet18_tracks_the_stream_scale_and_branch_gains():
  # NF-ResNet form: x + alpha * f(relu(x) / beta), beta^2 growing by alpha^2 per identity
  # block; a transition block (stride or width change) has a projection shortcut and gain 1.
  model = _built('resnet18', 'fedmef', gamma=0.7)
  a2, g = models.RESIDUAL_ALPHA**2, models.RELU_GAIN
  expect = {  # block: (beta^2 at its input, transition)
    'layer1_0': (1.0, False),
    'layer1_1': (1.0 + a2, False),
    'layer2_0': (1.0 + 2 * a2, True),
    'layer2_1': (2.0, False),
    'layer3_0': (2.0 + a2, True),
    'layer3_1': (2.0, False),
  }
  for block, (var, transition) in expect.items():
    conv1 = model.get_layer(block + '_conv1')
    assert conv1.act_gain == pytest.approx(g / np.sqrt(var)), block
    conv2 = model.get_layer(block + '_conv2')
    assert conv2.gain_init == (1.0 if transition else models.RESIDUAL_ALPHA), block
    assert float(conv2.gain.numpy()[0]) == pytest.approx(conv2.gain_init)
    if transition:
      assert model.get_layer(block + '_shortcut_conv').act_gain == conv1.act_gain
  assert len([l for l in model.layers if isinstance(l, models.ResidualAdd)]) == 8
  # The head folds the ReLU gain over the final stream scale, beta^2 = 2 + alpha^2.
  assert model.get_layer('classifier').act_gain == pytest.approx(g / np.sqrt(2.0 + a2))


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2'])
def test_fedmef_residual_networks_start_with_bounded_logits(name):
  model = models.build_model(
    name,
    'fedmef',
    num_classes=10,
    input_shape=(32, 32, 3),
    density=0.1,
    gamma=0.7,
    seed=0,
    input_mean=[0.5] * 3,
    input_std=[float(np.sqrt(1 / 12))] * 3,
  )
  images = np.random.default_rng(0).random((16, 32, 32, 3)).astype(np.float32)
  logits = model(images, training=False).numpy()
  assert np.all(np.isfinite(logits)) and 0.02 < logits.std() < 4.0


_STANDARD_LAYERS = (
  tf.keras.layers.InputLayer,
  tf.keras.layers.Conv2D,
  tf.keras.layers.DepthwiseConv2D,
  tf.keras.layers.BatchNormalization,
  tf.keras.layers.ReLU,
  tf.keras.layers.Add,
  tf.keras.layers.GlobalAveragePooling2D,
  tf.keras.layers.Dense,
)


@pytest.mark.parametrize(
  'name,variant',
  [('cnn', 'fedmef'), ('cnn', 'baseline'), ('mobilenet_v2', 'fedmef'), ('resnet18', 'baseline')],
)
def test_build_model_is_sparsify_of_the_stock_keras_model(name, variant):
  # One way to make a FedMef model: the registry model is the converter applied to a stock
  # Keras model of standard layers, with its seeded weights copied.
  stock = models.keras_model(name, variant, num_classes=5, input_shape=(8, 8, 3), seed=2)
  assert stock.name == name
  assert all(type(l) in _STANDARD_LAYERS for l in stock.layers)
  stats = dict(input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3])
  converted = fedmef_tf.sparsify(stock, density=0.3, variant=variant, gamma=0.7, seed=2, **stats)
  registry = models.build_model(
    name, variant, num_classes=5, input_shape=(8, 8, 3), density=0.3, gamma=0.7, seed=2, **stats
  )
  assert registry.name == converted.name == f'{name}_{variant}'
  assert [l.get_config() for l in registry.layers] == [l.get_config() for l in converted.layers]
  assert len(registry.variables) == len(converted.variables)
  for a, b in zip(registry.variables, converted.variables):
    assert a.name == b.name
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # The stock model's BatchNorm layers are what the fedmef variant drops, nothing else.
  kept = [
    l.name
    for l in stock.layers
    if variant == 'baseline' or not isinstance(l, tf.keras.layers.BatchNormalization)
  ]
  assert [l.name for l in registry.layers if l.name != 'input_norm'] == kept


def test_stock_resnet18_block_form_depends_on_the_variant():
  pre = models.keras_resnet18('fedmef', input_shape=(8, 8, 3))
  post = models.keras_resnet18('baseline', input_shape=(8, 8, 3))
  # Pre-activation: the sum is the block's output; post-activation: a ReLU follows it.
  assert pre.get_layer('layer1_1_add').output is pre.get_layer('layer2_0_bn1').input
  assert post.get_layer('layer1_1_add').output is post.get_layer('layer1_1_relu2').input
  assert isinstance(pre.get_layer('final_bn'), tf.keras.layers.BatchNormalization)
  with pytest.raises(ValueError, match='variant'):
    models.keras_resnet18('dense')


def test_build_model_in_a_graph_adds_only_the_converted_models_variables():
  # As a TFF model_fn: the stock model is built in a throwaway graph, not the traced one.
  with tf.Graph().as_default() as graph:
    model = models.build_model('cnn', 'fedmef', input_shape=(8, 8, 3), density=0.5)
    variables = graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
  assert len(variables) == len(model.variables) > 0
  assert {v.name for v in variables} == {v.name for v in model.variables}
