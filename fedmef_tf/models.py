"""Model registry: small CNN, ResNet18 and MobileNetV2 for 32x32 inputs, FedMef or baseline.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) evaluates ResNet18 and MobileNetV2 in two
variants that differ only in what FedMef changes:

- `fedmef`: every convolution is an NSConv (`MaskedConv2D` / `MaskedDepthwiseConv2D` with
  `normalize=True`, a bias and a per-channel gain), and so is the classifier (`MaskedDense`),
  with scaled activation pruning (`sap_gamma=gamma`) on every one of them, activations are the
  1-bit-caching `sap.BitReLU` (ReLU or ReLU6), and there is no BatchNorm anywhere.
- `baseline`: masked convolutions without bias (`normalize=False`, `sap_gamma=0`) followed by
  `BatchNormalization` and a plain Keras `ReLU` (ReLU6 for MobileNetV2).

One way to make a FedMef model: `build_model` builds the architecture as a stock Keras model of
standard layers (`keras_model`: `keras_cnn`, `keras_resnet18(variant)`, `keras_mobilenet_v2`;
Conv2D without bias, BatchNormalization, ReLU, Add, GlobalAveragePooling2D, Dense) and converts
it with `fedmef_tf.sparsify` (`fedmef_tf.conversion`), whose rules set every NSConv's
`act_gain`, centring and initial gain from the graph. A user's own model goes through the same
converter. The stock models are public, so `sparsify(keras_model(name, variant, seed=s), ...)`
gives the model `build_model(name, variant, seed=s, ...)` gives.

Both variants share the same stem, widths, strides, classifier and the names of their prunable
layers, so that their prunable kernels have identical shapes (and identical ERK densities and
initial masks for the same seed). Every Conv2D / DepthwiseConv2D / Dense kernel is a masked,
prunable layer, the stem and the classifier included. The stock models' kernel initializers
are seeded from `seed` layer by layer (He normal for convolutions, Glorot uniform for the
classifier), so two builds with one seed have the same initial weights.

What the conversion rules give on the registry (fedmef variant):

- the input: both variants start with a Keras `Normalization` layer ("input_norm") holding the
  per-channel mean and standard deviation of the training split (`build_model`'s `input_mean`,
  `input_std`; `fedmef_tf.data.channel_stats`), so every model sees unit-variance inputs and an
  exported model takes pixel / 255 as it is;
- the stem conv is not centred and its output not centred either; depthwise kernels are not
  centred; every other NSConv is, and centres its output over height and width;
- every NSConv after a ReLU folds `RELU_GAIN` over the expected scale of its input into its
  kernel; the classifier folds the ReLU gain over the scale of the last pre-activation;
- ResNet18 (fedmef): the stock model is the pre-activation ResNet (He et al. 2016, "Identity
  Mappings": blocks `h + conv2(relu(bn2(conv1(relu(bn1(h))))))`, a 1x1 projection of
  `relu(bn1(h))` where the stride or width changes, a final BN-ReLU before the pooling). With
  BatchNorm removed it is the NF-ResNet form (Brock et al. 2021) `h + alpha * f(relu(h) / beta)`:
  `beta`, the expected std of the residual stream, is tracked by the Add rule and folded into
  the first NSConv of each branch, and the last NSConv of a branch onto an identity shortcut
  starts at gain `alpha = RESIDUAL_ALPHA`; a transition block (projection shortcut) starts its
  branch at gain 1. The baseline's stock model is the original post-activation ResNet18 (CIFAR
  form: conv-BN-ReLU-conv-BN, add, ReLU), as the paper trains it: a normaliser-free network
  needs the identity stream that the ReLU after each sum of the post-activation form breaks.
  So `keras_resnet18` takes the variant;
- MobileNetV2: inverted residual blocks with linear bottlenecks; the projection of a block with
  an identity shortcut starts at gain `alpha`, and a block without one restarts the stream at
  unit variance;
- its clients train with adaptive gradient clipping (`fedmef_tf.agc`).

Departures from ../shared/ALGORITHM.md, which asks for NSConv on every convolution and nothing
else: the uncentred stem and depthwise kernels, the output centring, the NSConv classifier, the
pre-activation block order of the fedmef ResNet18 and AGC. Without them the BatchNorm-free
networks diverged or learned several times slower than the baseline on real images at the
paper's learning rate (`python -m benchmarks.trainability`, README); none of them caches an
activation or depends on the data.

The baseline is the stock model with masked layers (post-activation blocks, plain residual
sums, BatchNorm) and the input normalisation.

Memory (the point of the fedmef variant): no layer keeps a float copy of an activation for its
backward pass. The masked convs cache only the SAP-compressed input; BitReLU caches one bit per
element; bias addition and output centring need only the upstream gradient; the residual
addition and the global average pooling are the lean layers of `fedmef_tf.lean_layers`. There
is no identity, scaling, max-pool or dropout op on the activation path. Both variants use the
same lean add and pooling layers, so that a measured difference is due to NSConv + SAP +
BitReLU + no BN only.

Layer names are fixed (`stem_conv`, `layer2_0_conv1`, `block3_expand`, `classifier`, ...), so
two builds of the same model have the same variable names whatever else lives in the process.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fedmef_tf import conversion
from fedmef_tf import masks
from fedmef_tf import sap
from fedmef_tf import sparse_layers as sl
from fedmef_tf.conversion import RELU_GAIN, RESIDUAL_ALPHA, VARIANTS
from fedmef_tf.lean_layers import GlobalAvgPool, ResidualAdd

__all__ = [
  'MODEL_NAMES',
  'VARIANTS',
  'RELU_GAIN',
  'RESIDUAL_ALPHA',
  'build_model',
  'keras_model',
  'keras_cnn',
  'keras_resnet18',
  'keras_mobilenet_v2',
  'count_parameters',
  'ResidualAdd',
  'GlobalAvgPool',
  'CUSTOM_OBJECTS',
  'MOBILENET_V2_32_SETTINGS',
]

MODEL_NAMES = ('cnn', 'resnet18', 'mobilenet_v2')

#: Small CNN: (filters, stride) of the 3x3 convs; global average pooling; dense classifier.
CNN_LAYERS: Tuple[Tuple[int, int], ...] = ((32, 1), (64, 2), (128, 2), (128, 2))

#: ResNet18 (CIFAR form): widths and first strides of the four stages, two BasicBlocks each.
RESNET18_STAGES: Tuple[Tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))

#: MobileNetV2 inverted residual table (expansion t, channels c, repeats n, first stride s),
#: adapted to 32x32 inputs as in the common CIFAR form: stem stride 1 and the second row's stride
#: 2 -> 1, so the feature maps are 32, 32, 32, 16, 8, 8, 4, 4 (ImageNet form: 112 ... 7).
MOBILENET_V2_32_SETTINGS: Tuple[Tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
MOBILENET_V2_STEM = 32
MOBILENET_V2_LAST = 1280

CUSTOM_OBJECTS: Dict[str, type] = dict(sl.CUSTOM_OBJECTS)
CUSTOM_OBJECTS.update(
  {
    'ResidualAdd': ResidualAdd,
    'GlobalAvgPool': GlobalAvgPool,
    'BitReLU': sap.BitReLU,
  }
)

L = tf.keras.layers


# -- stock Keras architectures ---------------------------------------------------------------


class _Initializers:
  """Seeded kernel initializers, one seed per layer in construction order."""

  def __init__(self, seed: int):
    self.seed = int(seed)
    self._count = 0

  def _next_seed(self) -> int:
    self._count += 1
    return (self.seed * 100003 + self._count) % (2**31 - 1)

  def he(self):
    return tf.keras.initializers.HeNormal(seed=self._next_seed())

  def glorot(self):
    return tf.keras.initializers.GlorotUniform(seed=self._next_seed())


def _conv(init: _Initializers, x, filters: int, kernel_size: int, stride: int, name: str):
  return L.Conv2D(
    filters,
    kernel_size,
    strides=stride,
    padding='same',
    use_bias=False,
    kernel_initializer=init.he(),
    name=name,
  )(x)


def _conv_bn_relu(init: _Initializers, x, filters, kernel_size, stride, name, relu6=False):
  x = _conv(init, x, filters, kernel_size, stride, name + '_conv')
  x = L.BatchNormalization(name=name + '_bn')(x)
  return L.ReLU(6.0 if relu6 else None, name=name + '_relu')(x)


def _head(init: _Initializers, x, num_classes: int):
  x = L.GlobalAveragePooling2D(name='pool')(x)
  return L.Dense(num_classes, kernel_initializer=init.glorot(), name='classifier')(x)


def _input(input_shape):
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f'input_shape must be (H, W, C) with positive sizes, got {input_shape}')
  return tf.keras.Input(shape=input_shape, name='images')


def keras_cnn(
  *, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), seed: int = 0
) -> tf.keras.Model:
  """The small CNN as a stock Keras model: `CNN_LAYERS` conv-BN-ReLU, pooling, dense.

  Layers `stem_conv/_bn/_relu`, `conv{i}_conv/_bn/_relu`, `pool`, `classifier`; the model is
  named 'cnn'. Args as `build_model`'s.
  """
  init = _Initializers(seed)
  inputs = _input(input_shape)
  x = inputs
  for i, (filters, stride) in enumerate(CNN_LAYERS):
    x = _conv_bn_relu(init, x, filters, 3, stride, 'stem' if i == 0 else f'conv{i}')
  return tf.keras.Model(inputs, _head(init, x, int(num_classes)), name='cnn')


def _post_activation_block(init, x, filters: int, stride: int, name: str):
  """Original BasicBlock: conv-BN-ReLU-conv-BN, plus the (projected) input, ReLU."""
  shortcut = x
  h = _conv(init, x, filters, 3, stride, name + '_conv1')
  h = L.ReLU(name=name + '_relu1')(L.BatchNormalization(name=name + '_bn1')(h))
  h = _conv(init, h, filters, 3, 1, name + '_conv2')
  h = L.BatchNormalization(name=name + '_bn2')(h)
  if stride != 1 or int(x.shape[-1]) != filters:
    shortcut = _conv(init, x, filters, 1, stride, name + '_shortcut_conv')
    shortcut = L.BatchNormalization(name=name + '_shortcut_bn')(shortcut)
  h = L.Add(name=name + '_add')([h, shortcut])
  return L.ReLU(name=name + '_relu2')(h)


def _pre_activation_block(init, x, filters: int, stride: int, name: str):
  """Pre-activation BasicBlock: BN-ReLU-conv-BN-ReLU-conv plus the input, or in a transition
  block (stride or width change) a 1x1 conv of the activated input."""
  a = L.ReLU(name=name + '_relu1')(L.BatchNormalization(name=name + '_bn1')(x))
  shortcut = x
  if stride != 1 or int(x.shape[-1]) != filters:
    shortcut = _conv(init, a, filters, 1, stride, name + '_shortcut_conv')
  h = _conv(init, a, filters, 3, stride, name + '_conv1')
  h = L.ReLU(name=name + '_relu2')(L.BatchNormalization(name=name + '_bn2')(h))
  h = _conv(init, h, filters, 3, 1, name + '_conv2')
  return L.Add(name=name + '_add')([h, shortcut])


def keras_resnet18(
  variant: str, *, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), seed: int = 0
) -> tf.keras.Model:
  """ResNet18 (CIFAR form: 3x3 stem of stride 1, `RESNET18_STAGES`) as a stock Keras model.

  The block form depends on the variant (see the module docstring): 'baseline' gives the
  original post-activation ResNet18 (`stem_conv/_bn/_relu`; blocks `layer{s}_{i}_conv1, _bn1,
  _relu1, _conv2, _bn2, [_shortcut_conv, _shortcut_bn], _add, _relu2`), 'fedmef' the
  pre-activation ResNet18 (`stem_conv`; blocks `layer{s}_{i}_bn1, _relu1,
  [_shortcut_conv], _conv1, _bn2, _relu2, _conv2, _add`; `final_bn`, `final_relu`), which
  `sparsify` turns into an NF-ResNet. Both end in `pool`, `classifier`; the model is named
  'resnet18'. Other args as `build_model`'s.
  """
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; choose one of {VARIANTS}')
  init = _Initializers(seed)
  inputs = _input(input_shape)
  if variant == 'baseline':
    x = _conv_bn_relu(init, inputs, 64, 3, 1, 'stem')
    block = _post_activation_block
  else:
    x = _conv(init, inputs, 64, 3, 1, 'stem_conv')
    block = _pre_activation_block
  for s, (filters, stride) in enumerate(RESNET18_STAGES, start=1):
    for i in range(2):
      x = block(init, x, filters, stride if i == 0 else 1, f'layer{s}_{i}')
  if variant == 'fedmef':
    x = L.ReLU(name='final_relu')(L.BatchNormalization(name='final_bn')(x))
  return tf.keras.Model(inputs, _head(init, x, int(num_classes)), name='resnet18')


def keras_mobilenet_v2(
  *, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3), seed: int = 0
) -> tf.keras.Model:
  """MobileNetV2 (32x32 form, `MOBILENET_V2_32_SETTINGS`) as a stock Keras model.

  Layers `stem_conv/_bn/_relu` (ReLU6); blocks `block{k}_expand, _expand_bn, _expand_relu`
  (not in block 0, expansion 1), `_dw, _dw_bn, _dw_relu, _project, _project_bn` and `_add`
  where stride 1 keeps the width (linear bottleneck: no activation after the projection);
  `last_conv/_bn/_relu` (1x1 to `MOBILENET_V2_LAST`), `pool`, `classifier`; the model is named
  'mobilenet_v2'. Args as `build_model`'s.
  """
  init = _Initializers(seed)
  inputs = _input(input_shape)
  x = _conv_bn_relu(init, inputs, MOBILENET_V2_STEM, 3, 1, 'stem', relu6=True)
  block = 0
  for expansion, filters, repeats, first_stride in MOBILENET_V2_32_SETTINGS:
    for i in range(repeats):
      stride, name, c_in = first_stride if i == 0 else 1, f'block{block}', int(x.shape[-1])
      h = x
      if expansion != 1:
        h = _conv(init, h, c_in * expansion, 1, 1, name + '_expand')
        h = L.ReLU(6.0, name=name + '_expand_relu')(
          L.BatchNormalization(name=name + '_expand_bn')(h)
        )
      h = L.DepthwiseConv2D(
        3,
        strides=stride,
        padding='same',
        use_bias=False,
        depthwise_initializer=init.he(),
        name=name + '_dw',
      )(h)
      h = L.ReLU(6.0, name=name + '_dw_relu')(L.BatchNormalization(name=name + '_dw_bn')(h))
      h = _conv(init, h, filters, 1, 1, name + '_project')
      h = L.BatchNormalization(name=name + '_project_bn')(h)
      x = L.Add(name=name + '_add')([h, x]) if stride == 1 and c_in == filters else h
      block += 1
  x = _conv_bn_relu(init, x, MOBILENET_V2_LAST, 1, 1, 'last', relu6=True)
  return tf.keras.Model(inputs, _head(init, x, int(num_classes)), name='mobilenet_v2')


def keras_model(
  name: str,
  variant: str,
  *,
  num_classes: int = 10,
  input_shape: Sequence[int] = (32, 32, 3),
  seed: int = 0,
) -> tf.keras.Model:
  """The stock Keras model of registry architecture `name` for `variant` (see above).

  Raises:
      ValueError: unknown name or variant, or an argument out of range.
  """
  if name not in _STOCK:
    raise ValueError(f'unknown model {name!r}; choose one of {MODEL_NAMES}')
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; choose one of {VARIANTS}')
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  return _STOCK[name](variant, num_classes=num_classes, input_shape=input_shape, seed=seed)


_STOCK: Dict[str, Callable[..., tf.keras.Model]] = {
  'cnn': lambda variant, **kwargs: keras_cnn(**kwargs),
  'resnet18': keras_resnet18,
  'mobilenet_v2': lambda variant, **kwargs: keras_mobilenet_v2(**kwargs),
}


def build_model(
  name: str,
  variant: str,
  *,
  num_classes: int = 10,
  input_shape: Sequence[int] = (32, 32, 3),
  density: float = 1.0,
  gamma: float = 0.0,
  seed: int = 0,
  input_mean: Optional[Sequence[float]] = None,
  input_std: Optional[Sequence[float]] = None,
) -> tf.keras.Model:
  """Builds an uncompiled Keras functional model of the registry: `keras_model`, converted.

  The stock model is a description only: `conversion.sparsify(..., copy_weights=False)` gives
  the masked layers the stock layers' seeded initializers, so the result is the model that
  `sparsify` of `keras_model(name, variant, seed=seed)` with its weights copied gives. Where
  the caller runs eagerly the stock model is built eagerly and freed on return; where it
  traces a graph (a TFF computation's `model_fn`) it is built in a throwaway graph, so none of
  its variables joins the traced computation (the throwaway graph builds more slowly).

  Args:
      name: one of `MODEL_NAMES`: 'cnn' (4 convs 32-64-128-128, strides 1-2-2-2, about 0.24M
          weights), 'resnet18' (CIFAR form, about 11.2M), 'mobilenet_v2' (32x32 form, about
          2.2M).
      variant: one of `VARIANTS`: 'fedmef' (NSConv + SAP + BitReLU, no BatchNorm) or
          'baseline' (masked conv + BatchNorm + ReLU).
      num_classes: number of output logits (>= 1).
      input_shape: `(H, W, C)` of one example, channels last; any size works (the networks end
          in a global average pooling), 32x32 is the design size.
      density: global density of the prunable kernels in (0, 1]; below 1 the model gets ERK
          densities and random masks (`masks.init_sparse`) from `seed`.
      gamma: SAP drop ratio in [0, 1] of the fedmef variant (used when called with
          `training=True`); ignored by the baseline.
      seed: seed of the kernel initializers and of the initial masks.
      input_mean, input_std: per-channel mean and standard deviation of the training images
          in the units the model is fed (pixel / 255, see `fedmef_tf.data.channel_stats`).
          Given, both variants start with a Keras `Normalization` layer ("input_norm",
          constants, no variables) that maps the images to zero mean and unit variance per
          channel, so the exported model takes the images as the data pipeline gives them.
          The fedmef variant's signal propagation assumes that unit variance. None (both):
          no normalisation.

  Returns:
      A `tf.keras.Model` named `<name>_<variant>` mapping float32 `[B, H, W, C]` images to
      `[B, num_classes]` logits.

  Raises:
      ValueError: unknown name or variant, or an argument out of range.
  """
  stock_args = dict(num_classes=num_classes, input_shape=input_shape, seed=seed)
  if tf.executing_eagerly():
    stock = keras_model(name, variant, **stock_args)
  else:
    with tf.Graph().as_default():
      stock = keras_model(name, variant, **stock_args)
  return conversion.sparsify(
    stock,
    density=density,
    variant=variant,
    gamma=gamma,
    seed=seed,
    input_mean=input_mean,
    input_std=input_std,
    copy_weights=False,
  )


def count_parameters(model: tf.keras.Model) -> Dict[str, int]:
  """Parameter counts of a model (numbers of float32 entries, not bytes).

  Returns:
      A dict with
      - 'prunable': entries of all prunable kernels (dense size, whatever the mask);
      - 'nonzero': active prunable entries (mask ones);
      - 'dense': other trainable entries (biases, NSConv gains, BatchNorm scale and offset);
      - 'trainable': prunable + dense;
      - 'state': non-trainable entries that are not masks (BatchNorm moving statistics);
      - 'mask': entries of mask, marked and bae_lambda variables.
  """
  layers = masks.prunable_layers(model)
  prunable = sum(int(np.prod(layer.kernel.shape)) for layer in layers)
  nonzero = sum(masks.layer_nnz(model))
  kernel_ids = {id(layer.kernel) for layer in layers}
  mask_ids = set()
  for layer in layers:
    mask_ids.update({id(layer.mask), id(layer.marked), id(layer.bae_lambda)})
  dense = sum(int(np.prod(v.shape)) for v in model.trainable_weights if id(v) not in kernel_ids)
  state = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights if id(v) not in mask_ids)
  mask_entries = sum(
    int(np.prod(v.shape)) for v in model.non_trainable_weights if id(v) in mask_ids
  )
  return {
    'prunable': prunable,
    'nonzero': nonzero,
    'dense': dense,
    'trainable': prunable + dense,
    'state': state,
    'mask': mask_entries,
  }
