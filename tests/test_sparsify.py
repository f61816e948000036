"""fedmef_tf.sparsify (fedmef_tf.conversion): stock Keras models made FedMef or baseline.

The conversion rules on hand-written models (a CNN with BatchNorm, a MobileNet-style model with
depthwise convolutions and an identity Add, small residual blocks), the registry models (the
converter on `models.keras_model`) against the rules written out per architecture, refusals,
and the converted model through `fit`, three TFF rounds and a TFLite export whose `train`
signature runs.
"""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import fedmef_tf
from fedmef_tf import conversion
from fedmef_tf import masks
from fedmef_tf import models
from fedmef_tf import sparse_layers
from tflite_export import export
from tflite_export import train_module
from tff_programs import fedmef_process

L = tf.keras.layers
INPUT_SHAPE = (8, 8, 3)
NUM_CLASSES = 3
ALPHA = models.RESIDUAL_ALPHA
RELU_GAIN = models.RELU_GAIN


def _bn_cnn(seed=0):
  """Conv-BN-ReLU, Conv(relu)-BN, Flatten, Dense(relu), Dense: a hand-written Keras CNN."""
  tf.keras.utils.set_random_seed(seed)
  i = tf.keras.Input(INPUT_SHAPE, name='images')
  x = L.Conv2D(8, 3, padding='same', use_bias=False, name='conv1')(i)
  x = L.BatchNormalization(name='bn1')(x)
  x = L.ReLU(name='relu1')(x)
  x = L.Conv2D(16, 3, strides=2, padding='same', activation='relu', name='conv2')(x)
  x = L.BatchNormalization(name='bn2')(x)
  x = L.Flatten(name='flatten')(x)
  x = L.Dense(32, activation='relu', name='fc1')(x)
  return tf.keras.Model(i, L.Dense(NUM_CLASSES, name='logits')(x), name='bn_cnn')


def _mobilenet_style(seed=0):
  """Stem, one inverted residual block with an identity Add, one strided block, head."""
  tf.keras.utils.set_random_seed(seed)
  i = tf.keras.Input(INPUT_SHAPE, name='images')
  x = L.Conv2D(8, 3, padding='same', use_bias=False, name='stem')(i)
  x = L.BatchNormalization(name='stem_bn')(x)
  x = L.ReLU(6.0, name='stem_relu')(x)
  for name, stride in (('b0', 1), ('b1', 2)):
    h = L.Conv2D(16, 1, use_bias=False, name=name + '_expand')(x)
    h = L.BatchNormalization(name=name + '_expand_bn')(h)
    h = L.ReLU(6.0, name=name + '_expand_relu')(h)
    h = L.DepthwiseConv2D(3, strides=stride, padding='same', use_bias=False, name=name + '_dw')(h)
    h = L.BatchNormalization(name=name + '_dw_bn')(h)
    h = L.ReLU(6.0, name=name + '_dw_relu')(h)
    h = L.Conv2D(8, 1, use_bias=False, name=name + '_project')(h)
    h = L.BatchNormalization(name=name + '_project_bn')(h)
    x = L.Add(name=name + '_add')([h, x]) if stride == 1 else h
  x = L.Conv2D(24, 1, use_bias=False, name='last')(x)
  x = L.ReLU(6.0, name='last_relu')(L.BatchNormalization(name='last_bn')(x))
  x = L.GlobalAveragePooling2D(name='pool')(x)
  return tf.keras.Model(i, L.Dense(NUM_CLASSES, name='classifier')(x), name='mobilenet_style')


def _config(model, name):
  return model.get_layer(name).get_config()


def _erk_masks(model, density, seed):
  shapes = [tuple(layer.kernel.shape) for layer in masks.prunable_layers(model)]
  return shapes, masks.random_masks(shapes, masks.erk_densities(shapes, density), seed)


def _toy_data(n, seed):
  """Learnable images: the label is the channel with the largest mean, plus noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  x = rng.normal(size=(n,) + INPUT_SHAPE).astype(np.float32) * 0.5
  x[np.arange(n), :, :, y] += 1.0
  return x, y


# -- conversion rules --------------------------------------------------------------------------


def test_cnn_with_bn_fedmef_rules_masks_and_erk():
  source = _bn_cnn()
  model = fedmef_tf.sparsify(
    source,
    density=0.3,
    variant='fedmef',
    gamma=0.5,
    seed=4,
    input_mean=[0.1, 0.2, 0.3],
    input_std=[0.5, 1.0, 2.0],
  )
  assert model.name == 'bn_cnn_fedmef'
  types = [type(l).__name__ for l in model.layers]
  assert types == [
    'InputLayer',
    'Normalization',
    'MaskedConv2D',
    'BitReLU',
    'MaskedConv2D',
    'BitReLU',
    'Flatten',
    'MaskedDense',
    'BitReLU',
    'MaskedDense',
  ]
  assert not any(isinstance(l, L.BatchNormalization) for l in model.layers)
  norm = model.get_layer('input_norm')
  np.testing.assert_allclose(np.ravel(norm.mean), [0.1, 0.2, 0.3])
  np.testing.assert_allclose(np.ravel(norm.variance), [0.25, 1.0, 4.0])
  # The stem reads the normalised input (unit variance, centred); every later layer a ReLU
  # output of a unit-variance NSConv output.
  expected = {
    'conv1': (1.0, False, False),
    'conv2': (RELU_GAIN, True, True),
    'fc1': (RELU_GAIN, True, False),
    'logits': (RELU_GAIN, True, False),
  }
  for name, (act_gain, center, center_output) in expected.items():
    config = _config(model, name)
    assert config['normalize'] and config['sap_gamma'] == 0.5 and config['gain_init'] == 1.0
    assert config['act_gain'] == pytest.approx(act_gain, rel=1e-12), name
    assert config['center'] is center, name
    if name.startswith('conv'):
      assert config['center_output'] is center_output and config['use_bias'], name
  assert [_config(model, n)['max_value'] for n in ('relu1', 'conv2_relu', 'fc1_relu')] == [None] * 3
  # Masks: exactly the ERK densities and random masks of fedmef_tf.masks for this seed.
  shapes, expected_masks = _erk_masks(model, 0.3, 4)
  assert shapes == [(3, 3, 3, 8), (3, 3, 8, 16), (256, 32), (32, NUM_CLASSES)]
  for layer, mask, d in zip(
    masks.prunable_layers(model), expected_masks, masks.erk_densities(shapes, 0.3)
  ):
    np.testing.assert_array_equal(layer.mask.numpy(), mask)
    size = int(np.prod(layer.kernel.shape))
    assert masks.layer_nnz(layer)[0] == math.floor(d * size + 0.5)
  assert masks.global_density(model) == pytest.approx(0.3, abs=0.01)
  # The input model's kernels are copied, then masked.
  for layer in masks.prunable_layers(model):
    np.testing.assert_array_equal(
      layer.kernel.numpy(), source.get_layer(layer.name).kernel.numpy() * layer.mask.numpy()
    )


def test_cnn_with_bn_baseline_keeps_bn_and_the_function():
  source = _bn_cnn()
  model = fedmef_tf.sparsify(source, density=1.0, variant='baseline', gamma=0.5)
  types = [type(l).__name__ for l in model.layers]
  assert types == [
    'InputLayer',
    'MaskedConv2D',
    'BatchNormalization',
    'ReLU',
    'MaskedConv2D',
    'BatchNormalization',
    'Flatten',
    'MaskedDense',
    'MaskedDense',
  ]
  for layer in masks.prunable_layers(model):
    config = layer.get_config()
    assert not config['normalize'] and config['sap_gamma'] == 0.0
  # No bias where a linear conv feeds a BatchNorm (conv1); conv2's ReLU comes before its BN.
  assert not _config(model, 'conv1')['use_bias'] and _config(model, 'conv2')['use_bias']
  assert _config(model, 'conv2')['activation'] == 'relu'
  # Dense at density 1 with every weight copied (BN statistics included): same function.
  x, _ = _toy_data(4, 0)
  np.testing.assert_allclose(model(x, training=False), source(x, training=False), atol=1e-5)


def test_mobilenet_style_depthwise_and_identity_add():
  model = fedmef_tf.sparsify(_mobilenet_style(), density=0.5, variant='fedmef', gamma=0.7, seed=2)
  assert not any(isinstance(l, L.BatchNormalization) for l in model.layers)
  assert isinstance(model.get_layer('b0_add'), models.ResidualAdd)
  assert isinstance(model.get_layer('pool'), models.GlobalAvgPool)
  assert isinstance(model.get_layer('b0_dw'), sparse_layers.MaskedDepthwiseConv2D)
  assert all(
    _config(model, n)['max_value'] == 6.0
    for n in ('stem_relu', 'b0_expand_relu', 'b0_dw_relu', 'last_relu')
  )
  # After b0's Add: the branch (alpha^2) plus its identity shortcut, the stem's ReLU6 output
  # of a unit-variance NSConv output (variance 1 / RELU_GAIN^2).
  beta = math.sqrt(ALPHA * ALPHA + 1.0 / (RELU_GAIN * RELU_GAIN))
  expected = {  # act_gain, center, center_output, gain_init
    'stem': (1.0, False, False, 1.0),
    'b0_expand': (RELU_GAIN, True, True, 1.0),
    'b0_dw': (RELU_GAIN, False, True, 1.0),
    'b0_project': (RELU_GAIN, True, True, ALPHA),  # residual branch onto an identity
    'b1_expand': (1.0 / beta, True, True, 1.0),
    'b1_dw': (RELU_GAIN, False, True, 1.0),
    'b1_project': (RELU_GAIN, True, True, 1.0),  # no shortcut: the stream restarts at 1
    'last': (1.0, True, True, 1.0),
    'classifier': (RELU_GAIN, True, False, 1.0),  # the pooled ReLU6 features' gain
  }
  for name, (act_gain, center, center_output, gain_init) in expected.items():
    config = _config(model, name)
    assert config['normalize'] and config['sap_gamma'] == 0.7, name
    assert config['act_gain'] == pytest.approx(act_gain, rel=1e-12), name
    assert (config['center'], config['gain_init']) == (center, gain_init), name
    if name != 'classifier':
      assert config['center_output'] is center_output, name
  shapes, expected_masks = _erk_masks(model, 0.5, 2)
  assert (3, 3, 16, 1) in shapes
  for layer, mask in zip(masks.prunable_layers(model), expected_masks):
    np.testing.assert_array_equal(layer.mask.numpy(), mask)


def _block_model(projection):
  """Stem, ReLU, a post-activation residual block (identity or projection shortcut), conv."""
  i = tf.keras.Input(INPUT_SHAPE)
  x = L.ReLU(name='stem_relu')(L.Conv2D(8, 3, padding='same', name='stem')(i))
  h = L.Conv2D(8, 3, padding='same', activation='relu', name='conv1')(x)
  h = L.BatchNormalization(name='bn2')(L.Conv2D(8, 3, padding='same', name='conv2')(h))
  shortcut = L.Conv2D(8, 1, name='shortcut')(x) if projection else x
  x = L.ReLU(name='out_relu')(L.Add(name='add')([h, shortcut]))
  x = L.Conv2D(4, 3, padding='same', name='next')(x)
  return tf.keras.Model(i, x)


@pytest.mark.parametrize('projection', [False, True])
def test_residual_block_variance_is_propagated(projection):
  model = fedmef_tf.sparsify(_block_model(projection), density=1.0)
  if projection:
    # Neither input is an ancestor of the other: gains 1, variances 1 + 1.
    assert _config(model, 'conv2')['gain_init'] == 1.0
    assert _config(model, 'shortcut')['gain_init'] == 1.0
    assert _config(model, 'shortcut')['act_gain'] == pytest.approx(RELU_GAIN)
    variance = 2.0
  else:
    # Identity shortcut: a ReLU output of unit variance, i.e. 1 / RELU_GAIN^2, plus alpha^2.
    assert _config(model, 'conv2')['gain_init'] == ALPHA
    variance = ALPHA * ALPHA + 1.0 / (RELU_GAIN * RELU_GAIN)
  assert _config(model, 'conv1')['gain_init'] == 1.0
  assert _config(model, 'next')['act_gain'] == pytest.approx(
    RELU_GAIN / math.sqrt(variance), rel=1e-12
  )


# -- the registry models: the converter on the stock architectures ---------------------------


def _registry_rules(name):
  """The fedmef settings of every prunable layer of a registry model, from the documented rules.

  Returns {layer: (act_gain, center, center_output, gain_init)} in the order of the prunable
  layers (the layer index of masks and the federated state): the stem reads the normalised
  images (gain 1, uncentred); a layer after a ReLU folds RELU_GAIN over the expected std of the
  stream it reads; depthwise kernels are not centred; the last NSConv of a branch onto an
  identity shortcut starts at ALPHA, and the stream's variance grows by the branch's variance
  (ALPHA^2, or 1 + 1 after a projection); the classifier folds the last activation's gain.
  """
  rules = {}
  if name == 'cnn':
    rules['stem_conv'] = (1.0, False, False, 1.0)
    for i in range(1, len(models.CNN_LAYERS)):
      rules[f'conv{i}_conv'] = (RELU_GAIN, True, True, 1.0)
    rules['classifier'] = (RELU_GAIN, True, False, 1.0)
  elif name == 'resnet18':
    rules['stem_conv'] = (1.0, False, False, 1.0)
    variance, width = 1.0, 64
    for stage, (filters, first_stride) in enumerate(models.RESNET18_STAGES, start=1):
      for r in range(2):
        block = f'layer{stage}_{r}'
        transition = (first_stride if r == 0 else 1) != 1 or width != filters
        scaled = RELU_GAIN / math.sqrt(variance)
        rules[block + '_conv1'] = (scaled, True, True, 1.0)
        rules[block + '_conv2'] = (RELU_GAIN, True, True, 1.0 if transition else ALPHA)
        if transition:  # a 1x1 NSConv of the same activated input, listed after the branch
          rules[block + '_shortcut_conv'] = (scaled, True, True, 1.0)
        variance = 2.0 if transition else variance + ALPHA * ALPHA
        width = filters
    rules['classifier'] = (RELU_GAIN / math.sqrt(variance), True, False, 1.0)
  else:
    rules['stem_conv'] = (1.0, False, False, 1.0)
    variance, width, block, input_gain = 1.0, models.MOBILENET_V2_STEM, 0, RELU_GAIN
    for expansion, filters, repeats, first_stride in models.MOBILENET_V2_32_SETTINGS:
      for r in range(repeats):
        residual = (first_stride if r == 0 else 1) == 1 and width == filters
        gain = input_gain / math.sqrt(variance)
        if expansion != 1:
          rules[f'block{block}_expand'] = (gain, True, True, 1.0)
          gain = RELU_GAIN
        rules[f'block{block}_dw'] = (gain, False, True, 1.0)
        rules[f'block{block}_project'] = (RELU_GAIN, True, True, ALPHA if residual else 1.0)
        variance = variance + ALPHA * ALPHA if residual else 1.0
        width, block, input_gain = filters, block + 1, 1.0  # a linear bottleneck follows
    rules['last_conv'] = (1.0 / math.sqrt(variance), True, True, 1.0)
    rules['classifier'] = (RELU_GAIN, True, False, 1.0)
  return rules


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_registry_models_follow_the_signal_propagation_rules(name):
  # build_model is sparsify of models.keras_model: its NSConv settings are those the rules
  # give on the architecture, layer by layer, in the fedmef variant; the baseline's masked
  # layers are plain (normalize=False, no SAP, settings at their defaults).
  shape = (8, 8, 3)
  stats = dict(input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3])
  fed = models.build_model(
    name, 'fedmef', input_shape=shape, density=0.1, gamma=0.7, seed=5, **stats
  )
  rules = _registry_rules(name)
  assert [l.name for l in masks.prunable_layers(fed)] == list(rules)
  for layer in masks.prunable_layers(fed):
    act_gain, center, center_output, gain_init = rules[layer.name]
    config = layer.get_config()
    assert config['normalize'] and config['use_bias'] and config['sap_gamma'] == 0.7
    assert config['act_gain'] == pytest.approx(act_gain, rel=1e-12), layer.name
    assert (config['center'], config['gain_init']) == (center, gain_init), layer.name
    if not isinstance(layer, sparse_layers.MaskedDense):
      assert config['center_output'] is center_output, layer.name
  if name == 'cnn':
    base = models.build_model(
      name, 'baseline', input_shape=shape, density=0.1, gamma=0.7, seed=5, **stats
    )
    defaults = sparse_layers.MaskedConv2D(1, 1).get_config()
    for layer in masks.prunable_layers(base):
      config = layer.get_config()
      assert not config['normalize'] and config['sap_gamma'] == 0.0
      assert config['use_bias'] == isinstance(layer, sparse_layers.MaskedDense)
      for key in ('act_gain', 'center', 'center_output', 'gain_init'):
        assert config[key] == defaults[key], (layer.name, key)
    for a, b in zip(masks.prunable_layers(base), masks.prunable_layers(fed)):
      np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())


# -- refusals ----------------------------------------------------------------------------------


class _Custom(L.Layer):
  def call(self, inputs):
    return inputs * 2.0


@pytest.mark.parametrize(
  'layer,cls',
  [
    (L.MaxPooling2D(name='maxpool'), 'MaxPooling2D'),
    (L.Dropout(0.5, name='dropout'), 'Dropout'),
    (L.LayerNormalization(name='ln'), 'LayerNormalization'),
    (L.Conv2DTranspose(4, 3, name='deconv'), 'Conv2DTranspose'),
    (L.Conv2D(4, 3, dilation_rate=2, name='dilated'), 'Conv2D'),
    (L.Conv2D(4, 3, groups=4, name='grouped'), 'Conv2D'),
    (L.Conv2D(4, 3, activation='tanh', name='tanh_conv'), 'Conv2D'),
    (L.Conv2D(4, 3, kernel_regularizer='l2', name='l2_conv'), 'Conv2D'),
    (L.ReLU(negative_slope=0.1, name='leaky'), 'ReLU'),
    (_Custom(name='custom'), '_Custom'),
  ],
)
def test_unsupported_layer_is_refused_in_one_line_naming_it(layer, cls):
  i = tf.keras.Input(INPUT_SHAPE)
  x = L.Conv2D(4, 3, padding='same', name='first')(i)
  x = layer(x)
  model = tf.keras.Model(i, L.Dense(2, name='out')(L.Flatten()(x)))
  for variant in models.VARIANTS:
    with pytest.raises(conversion.ConversionError) as info:
      fedmef_tf.sparsify(model, density=0.5, variant=variant)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert '\n' not in message and message.startswith(f'{layer.name} ({cls}): '), message


def test_shared_layer_and_subclassed_model_are_refused():
  i = tf.keras.Input(INPUT_SHAPE)
  conv = L.Conv2D(3, 3, padding='same', name='twice')
  shared = tf.keras.Model(i, conv(conv(i)))
  with pytest.raises(conversion.ConversionError, match=r'^twice \(Conv2D\): is used 2 times'):
    fedmef_tf.sparsify(shared, density=0.5)

  class Sub(tf.keras.Model):
    def __init__(self):
      super().__init__(name='sub')
      self.dense = L.Dense(2)

    def call(self, inputs):
      return self.dense(inputs)

  sub = Sub()
  sub(tf.zeros((1, 4)))
  with pytest.raises(conversion.ConversionError, match=r'^sub \(Sub\): not a built functional'):
    fedmef_tf.sparsify(sub, density=0.5)


def test_sequential_model_and_the_public_name():
  seq = tf.keras.Sequential(
    [
      tf.keras.Input(INPUT_SHAPE),
      L.Conv2D(4, 3, activation='relu'),
      L.GlobalAveragePooling2D(),
      L.Dense(2, activation='softmax'),
    ],
    name='seq',
  )
  model = fedmef_tf.sparsify(seq, density=0.5, variant='fedmef')
  assert fedmef_tf.sparsify is conversion.sparsify  # the re-export, on a second access too
  assert fedmef_tf.ConversionError is conversion.ConversionError
  assert [type(l).__name__ for l in model.layers] == [
    'InputLayer',
    'MaskedConv2D',
    'BitReLU',
    'GlobalAvgPool',
    'MaskedDense',
  ]
  probabilities = model(np.ones((2,) + INPUT_SHAPE, np.float32)).numpy()
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  with pytest.raises(conversion.ConversionError, match='variant'):
    fedmef_tf.sparsify(seq, density=0.5, variant='dense')
  with pytest.raises(conversion.ConversionError, match='density'):
    fedmef_tf.sparsify(seq, density=0.0)
  with pytest.raises(conversion.ConversionError, match='input_mean needs 3 channels'):
    fedmef_tf.sparsify(seq, density=0.5, input_mean=[0.0], input_std=[1.0])


# -- training, TFF, TFLite ---------------------------------------------------------------------


def test_converted_model_saves_and_loads_in_the_custom_object_scope(tmp_path):
  model = fedmef_tf.sparsify(
    _mobilenet_style(),
    density=0.3,
    variant='fedmef',
    gamma=0.7,
    input_mean=[0.5] * 3,
    input_std=[0.25] * 3,
  )
  path = str(tmp_path / 'converted.keras')
  model.save(path)
  with fedmef_tf.custom_object_scope():
    loaded = tf.keras.models.load_model(path)
  x, _ = _toy_data(4, 2)
  np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-5)
  for a, b in zip(masks.prunable_layers(loaded), masks.prunable_layers(model)):
    np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    assert a.get_config()['act_gain'] == b.get_config()['act_gain']


@pytest.mark.parametrize('builder', [_bn_cnn, _mobilenet_style])
def test_converted_model_fits_and_keeps_its_masks(builder):
  model = fedmef_tf.sparsify(builder(), density=0.3, variant='fedmef', gamma=0.5, seed=1)
  masks_before = masks.masks_of(model)
  x, y = _toy_data(64, 0)
  model.compile(
    optimizer=tf.keras.optimizers.SGD(0.05, momentum=0.9),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
  losses = history.history['loss']
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for layer, before in zip(masks.prunable_layers(model), masks_before):
    np.testing.assert_array_equal(layer.mask.numpy(), before)
    assert np.all(layer.kernel.numpy()[before == 0] == 0.0), layer.name


def test_three_tff_rounds_of_a_converted_model(tff_runtime):
  del tff_runtime

  def model_fn():
    return fedmef_tf.sparsify(_bn_cnn(), density=1.0, variant='fedmef', gamma=0.5)

  clients = tff.simulation.datasets.TestClientData(
    {str(k): _toy_data(16 + 8 * k, k) for k in range(3)}
  )
  process = fedmef_process.build_fedmef_process(
    model_fn,
    algorithm='fedmef',
    density=0.4,
    delta_t=1,
    t_end=2,
    gamma=0.5,
    client_lr=0.05,
    client_lr_min=0.01,
    total_rounds=3,
    local_epochs=1,
    batch_size=8,
    element_spec=clients.element_type_structure,
  )
  state = process.initialize()
  datasets = [clients.create_tf_dataset_for_client(c) for c in clients.client_ids]
  for t in range(1, 4):
    output = process.next(state, datasets)
    state = output.state
    assert int(output.metrics['round_num']) == t
    assert np.isfinite(output.metrics['train_loss'])
    assert output.metrics['clients_used'] == 3
    assert output.metrics['global_density'] == pytest.approx(0.4, abs=0.01)
  model = model_fn()
  process.get_model_weights(state).assign_weights_to(model)
  assert masks.global_density(model) == pytest.approx(0.4, abs=0.01)
  for layer in masks.prunable_layers(model):
    assert np.all(layer.kernel.numpy()[layer.mask.numpy() == 0] == 0.0)


def test_tflite_export_of_a_converted_model_trains(tmp_path):
  model = fedmef_tf.sparsify(_mobilenet_style(), density=0.3, variant='fedmef', gamma=0.7, seed=3)
  config = {
    'model': 'mobilenet_style',
    'variant': 'fedmef',
    'num_classes': NUM_CLASSES,
    'input_shape': list(INPUT_SHAPE),
    'gamma': 0.7,
    'density': 0.3,
    'source': 'fedmef_tf.sparsify',
  }
  batch = 4
  report = export.export_model(
    model, config, str(tmp_path / 'm.tflite'), batch_size=batch, measure_memory=False
  )
  assert report.global_density == pytest.approx(0.3, abs=0.01)
  interpreter = tf.lite.Interpreter(model_path=report.path)
  meta = json.loads(interpreter.get_signature_runner('metadata')()['json'].item().decode())
  assert meta['source'] == 'fedmef_tf.sparsify' and meta['input_shape'] == list(INPUT_SHAPE)
  x, y = _toy_data(batch, 1)
  train = interpreter.get_signature_runner('train')
  losses = [float(train(x=x, y=y)['loss']) for _ in range(3)]
  assert all(np.isfinite(losses)), losses
  weights = interpreter.get_signature_runner('get_weights')()
  names = dict(zip((v.ref() for v in model.variables), train_module.weight_names(model)))
  for layer in masks.prunable_layers(model):
    kernel, mask = weights[names[layer.kernel.ref()]], weights[names[layer.mask.ref()]]
    np.testing.assert_array_equal(mask, layer.mask.numpy())
    assert np.all(kernel[mask == 0] == 0.0) and np.any(kernel != layer.kernel.numpy())
