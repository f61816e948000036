"""Converts a stock Keras model into a FedMef (or baseline) masked model: `sparsify`.

In tfmot's spirit (`prune_low_magnitude` wraps *your* model), `sparsify` takes a functional or
Sequential `tf.keras` model of standard layers and returns a new model made of this project's
layers, with ERK layer densities and random masks (`masks.init_sparse`):

=====================================  ========================================================
input model                            `variant='fedmef'`  /  `variant='baseline'`
=====================================  ========================================================
Conv2D                                 NSConv: `MaskedConv2D(normalize=True, use_bias=True,
                                       sap_gamma=gamma, act_gain=..., gain_init=...)`  /
                                       `MaskedConv2D(normalize=False)`, no bias where the conv
                                       feeds a BatchNormalization
DepthwiseConv2D                        `MaskedDepthwiseConv2D(normalize=True, center=False,
                                       center_output=True)`  /  `(normalize=False)`
Dense                                  `MaskedDense(normalize=True, sap_gamma=gamma)`  /
                                       `MaskedDense(normalize=False)`
BatchNormalization                     removed  /  kept
ReLU, ReLU6 (layers or `activation=`)  `sap.BitReLU` (max_value None or 6)  /  kept
Add of two tensors                     `lean_layers.ResidualAdd`  (both variants)
GlobalAveragePooling2D                 `lean_layers.GlobalAvgPool`  (both variants)
InputLayer, Flatten, Activation        kept (Activation: linear or softmax; relu / relu6 as
                                       ReLU above)
anything else                          refused: `ConversionError`, one line naming the layer
=====================================  ========================================================

Both variants use the lean `ResidualAdd` / `GlobalAvgPool` of `fedmef_tf.lean_layers`, so that
the two variants of one input model differ only in what FedMef changes. Refused, among others:
MaxPooling, Dropout, LayerNormalization, Conv2DTranspose, SeparableConv2D, Rescaling, a Conv2D
with dilation or groups, regularizers or constraints (they would be dropped silently),
activations other than the ones above, shared layers, nested models, subclassed models, models
with several inputs or outputs.

Signal propagation of the fedmef variant (what BatchNorm does in the baseline, done by design,
computed from the graph, not fitted). Every NSConv maps a unit-variance input to a
unit-variance output; the nonlinearity gain of the ReLU in front (`RELU_GAIN`, NF-Nets' gamma)
and the expected scale of its input are folded into its kernel as the constant `act_gain`,
never applied to an activation. To know that scale, every tensor of the input model gets an
expected state `(variance, gain)`, where `variance` is the expected variance of the linear
signal it derives from and `gain` the nonlinearity gain owed to a ReLU applied since
(`RELU_GAIN`, else 1):

- the model input (after `input_norm` when `input_mean` / `input_std` are given; without them
  the input is assumed normalised already) is `(1, 1)`;
- an NSConv (conv, depthwise conv or dense) reading `(v, g)` gets `act_gain = g / sqrt(v)`
  (the nonlinearity gain of the activation in front over the expected std beta of its input)
  and outputs `(gain_init^2, 1)`;
- a conv that reads the model input directly is the stem: `center=False, center_output=False`
  (a dense reading it directly gets `center=False`): its input is centred already, and a
  zero-sum kernel would pass only the part of a patch that differs from its mean, little on
  smooth images;
- every other conv is centred (`center=True`, the FedMef formula), but depthwise kernels are
  not (`center=False`: their fan-in is spatial only, so centring them is a spatial high-pass
  filter); every conv output but the stem's is centred per example and channel over height and
  width (`center_output=True`, `nsconv.center_spatial`, before the bias): the per-channel
  offsets after a ReLU, which a centred kernel cannot remove and BatchNorm removes with batch
  statistics, would otherwise reach the classifier as a large common component of the pooled
  features;
- ReLU / ReLU6 on `(v, 1)` gives `(v, RELU_GAIN)`; on a ReLU output (`g != 1`) it changes
  nothing;
- BatchNormalization is removed: its output is its input;
- an Add sums the variances of its inputs, each counted as `v / g^2` (the variance of a ReLU
  output of `(v, 1)` is `v / RELU_GAIN^2`), and outputs `(sum, 1)`;
- residual branches (NF-ResNets, Brock et al. 2021): when one input of an Add is an ancestor of
  the other (an identity shortcut), the other input is the residual branch, and if it ends in
  an NSConv without activation (BatchNormalization in between is removed) that NSConv gets
  `gain_init = RESIDUAL_ALPHA`, the initial value of its learnable gain, so the block starts
  close to the identity. When neither is an ancestor of the other (a projection shortcut, or
  two parallel branches: a block that changes resolution or width has no identity to stay
  close to), every NSConv keeps `gain_init = 1`;
- GlobalAveragePooling2D passes the state on: the classifier (an NSConv-like dense layer whose
  centred kernel is blind to the common offset of the pooled ReLU features) folds the gain of
  the activation in front of the pooling over the scale of its pre-activation (the variance of
  a spatial mean depends on the spatial correlation of its input and is not known
  analytically, so it is not divided out);
- Flatten passes the state on.

`fedmef_tf.models.build_model` is this converter applied to the stock registry architectures
(`models.keras_model`); its docstring says what the rules give on each. The baseline variant
gets none of these settings: its masked layers have `normalize=False`, where `act_gain`,
`center`, `center_output` and `gain_init` are ignored and keep their defaults.

Weights: the kernels and biases of the input model's Conv2D / DepthwiseConv2D / Dense layers are
copied into the masked layers (then masked by `init_sparse`), and, in the baseline, the
BatchNormalization parameters and statistics; with `copy_weights=False` every converted layer
starts from the initializers of the layer it replaces instead (the same values where those are
seeded). A conv that gains a bias (every NSConv has one) starts with the input layer's bias
initializer (zeros by default). Layer names are kept (`name_relu` for the BitReLU split off a
conv's `activation='relu'`), so the converted model's prunable layers are the input model's
Conv2D / DepthwiseConv2D / Dense in graph order. Note that the fedmef variant does not compute
the input model's function (no BatchNorm, NSConv standardises each kernel): it is a starting
point for training, not a compressed copy. Called outside eager execution (as the `model_fn` of
the TFF process inside its computations), the weight copies and the masks are assignments in
that graph; the process sets every variable from its state anyway.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from fedmef_tf import lean_layers
from fedmef_tf import masks
from fedmef_tf import sap
from fedmef_tf import sparse_layers as sl

__all__ = [
  'ConversionError',
  'sparsify',
  'SUPPORTED_LAYERS',
  'VARIANTS',
  'RELU_GAIN',
  'RESIDUAL_ALPHA',
]

#: 'fedmef': NSConv + SAP + BitReLU, no BatchNorm; 'baseline': masked layers, BatchNorm, ReLU.
VARIANTS = ('fedmef', 'baseline')

#: Nonlinearity gain of ReLU for unit-variance Gaussian pre-activations, sqrt(2 / (1 - 1/pi))
#: (Brock et al., 2021, NF-Nets): relu(z) * RELU_GAIN has unit variance again. ReLU6 uses the
#: same gain: for a unit-variance pre-activation it differs from ReLU only above 6 sigma.
RELU_GAIN = float(np.sqrt(2.0 / (1.0 - 1.0 / np.pi)))

#: Branch gain alpha of residual blocks with an identity shortcut (NF-ResNets, Brock et al. 2021,
#: whose default this is). A residual stage is `h_{i+1} = h_i + alpha * f_i(h_i / beta_i)`: the
#: branch `f_i` (NSConvs with nonlinearity gains) maps a unit-variance input to a unit-variance
#: output, so the expected variance of the stream grows by exactly `alpha^2` per block,
#: `beta_{i+1}^2 = beta_i^2 + alpha^2`, which the Add rule of the module docstring tracks. A
#: small alpha makes each block start close to the identity, which is what keeps a
#: normaliser-free residual network trainable at large learning rates.
RESIDUAL_ALPHA = 0.2

#: Keras layer classes `sparsify` converts or keeps (exact classes, not subclasses).
SUPPORTED_LAYERS = (
  'InputLayer',
  'Conv2D',
  'DepthwiseConv2D',
  'Dense',
  'BatchNormalization',
  'ReLU',
  'Activation',
  'Add',
  'GlobalAveragePooling2D',
  'Flatten',
)

_CONV_ACTIVATIONS = ('linear', 'relu', 'relu6')
_DENSE_ACTIVATIONS = ('linear', 'relu', 'relu6', 'softmax')
_RELU_MAX = {'relu': None, 'relu6': 6.0}


class ConversionError(ValueError):
  """A model or layer `sparsify` cannot convert; the message is one line naming it."""


def _refuse(layer, reason: str) -> ConversionError:
  return ConversionError(f'{layer.name} ({type(layer).__name__}): {reason}')


def _activation_name(activation) -> str:
  return str(tf.keras.activations.serialize(tf.keras.activations.get(activation)))


class _Signal:
  """Expected state of one tensor of the fedmef variant (see the module docstring).

  Attributes:
      variance: expected variance of the linear signal the tensor derives from.
      gain: nonlinearity gain owed to a ReLU applied since (1.0 for a linear tensor).
      from_input: the tensor is the (normalised) model input.
  """

  def __init__(self, variance: float = 1.0, gain: float = 1.0, from_input: bool = False):
    self.variance = float(variance)
    self.gain = float(gain)
    self.from_input = from_input

  @property
  def act_gain(self) -> float:
    """The factor an NSConv reading this tensor folds into its kernel: gain / beta."""
    return self.gain / math.sqrt(self.variance)

  @property
  def output_variance(self) -> float:
    """Variance of the tensor itself: that of a ReLU output of N(0, v) is v / gain^2."""
    return self.variance / (self.gain * self.gain)


def _check_no_regularizers(layer) -> None:
  for attr in (
    'kernel_regularizer',
    'depthwise_regularizer',
    'bias_regularizer',
    'activity_regularizer',
    'kernel_constraint',
    'depthwise_constraint',
    'bias_constraint',
  ):
    if getattr(layer, attr, None) is not None:
      raise _refuse(
        layer, f'has a {attr.replace("_", " ")}, which the masked layer would drop; remove it first'
      )


def _check_conv_common(layer, activations) -> None:
  if layer.data_format != 'channels_last':
    raise _refuse(layer, f'data_format {layer.data_format!r} is not supported (channels_last only)')
  if tuple(layer.dilation_rate) != (1, 1):
    raise _refuse(layer, f'dilation_rate {tuple(layer.dilation_rate)} is not supported (1 only)')
  if str(layer.padding).lower() not in ('same', 'valid'):
    raise _refuse(layer, f'padding {layer.padding!r} is not supported (same or valid)')
  name = _activation_name(layer.activation)
  if name not in activations:
    raise _refuse(layer, f'activation {name!r} is not supported ({", ".join(activations)})')
  _check_no_regularizers(layer)


def _kind(layer) -> str:
  """The conversion rule of `layer` ('conv', 'dwconv', ...); raises ConversionError."""
  kl = tf.keras.layers
  cls = type(layer)
  if cls is kl.InputLayer:
    return 'input'
  if cls is kl.Conv2D:
    _check_conv_common(layer, _CONV_ACTIVATIONS)
    if int(layer.groups) != 1:
      raise _refuse(layer, f'groups={layer.groups} is not supported (1 only)')
    return 'conv'
  if cls is kl.DepthwiseConv2D:
    _check_conv_common(layer, _CONV_ACTIVATIONS)
    if layer.strides[0] != layer.strides[1]:
      raise _refuse(layer, f'unequal strides {tuple(layer.strides)} are not supported')
    return 'dwconv'
  if cls is kl.Dense:
    name = _activation_name(layer.activation)
    if name not in _DENSE_ACTIVATIONS:
      raise _refuse(
        layer, f'activation {name!r} is not supported ({", ".join(_DENSE_ACTIVATIONS)})'
      )
    _check_no_regularizers(layer)
    return 'dense'
  if cls is kl.BatchNormalization:
    return 'bn'
  if cls is kl.ReLU:
    max_value = None if layer.max_value is None else float(layer.max_value)
    leaky = float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0
    if leaky or max_value not in (None, 6.0):
      raise _refuse(
        layer, 'only ReLU and ReLU6 (no negative_slope, threshold or other max_value) are supported'
      )
    return 'relu'
  if cls is kl.Activation:
    name = _activation_name(layer.activation)
    if name in _RELU_MAX:
      return 'relu'
    if name in ('linear', 'softmax'):
      return 'keep'
    raise _refuse(layer, f'activation {name!r} is not supported (relu, relu6, linear, softmax)')
  if cls is kl.Add:
    return 'add'
  if cls is kl.GlobalAveragePooling2D:
    if layer.data_format != 'channels_last' or getattr(layer, 'keepdims', False):
      raise _refuse(layer, 'only channels_last without keepdims is supported')
    return 'pool'
  if cls is kl.Flatten:
    if layer.data_format != 'channels_last':
      raise _refuse(layer, 'only channels_last is supported')
    return 'flatten'
  if isinstance(layer, tf.keras.Model):
    raise _refuse(layer, 'nested models are not supported; build the model from its layers')
  raise _refuse(layer, f'no FedMef equivalent (supported: {", ".join(SUPPORTED_LAYERS)})')


def _relu_max_value(layer) -> Optional[float]:
  if type(layer) is tf.keras.layers.ReLU:
    return None if layer.max_value is None else float(layer.max_value)
  return _RELU_MAX[_activation_name(layer.activation)]


def _initializer(initializer):
  """A fresh copy of a Keras initializer (the converted model shares no object)."""
  return tf.keras.initializers.deserialize(tf.keras.initializers.serialize(initializer))


class _Graph:
  """The layers of a functional or Sequential model in topological order, with their
  input and output tensors, consumers and ancestors (all keyed by `id` of KerasTensor)."""

  def __init__(self, model: tf.keras.Model):
    if not isinstance(model, tf.keras.Model):
      raise ConversionError(f'sparsify needs a tf.keras.Model, got {type(model).__name__}')
    if not model.built or not getattr(model, 'inputs', None) or not getattr(model, 'outputs', None):
      raise ConversionError(
        f'{model.name} ({type(model).__name__}): not a built functional or Sequential '
        'model (give it an Input or an input shape; subclassed models are not supported)'
      )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise ConversionError(
        f'{model.name} ({type(model).__name__}): has {len(model.inputs)} inputs and '
        f'{len(model.outputs)} outputs; sparsify converts one input, one output'
      )
    self.input = model.inputs[0]
    self.input_name = model.input_names[0]
    self.output = model.outputs[0]
    self.kinds: Dict[int, str] = {}
    self.inputs: Dict[int, list] = {}
    self.outputs: Dict[int, object] = {}
    self.consumers: Dict[int, list] = {}
    pending = []
    for layer in model.layers:
      kind = _kind(layer)
      if kind == 'input':
        continue
      if len(layer.inbound_nodes) != 1:
        raise _refuse(
          layer, f'is used {len(layer.inbound_nodes)} times; shared layers are not supported'
        )
      ins = tf.nest.flatten(layer.input)
      out = layer.output
      if isinstance(out, (list, tuple)):
        raise _refuse(layer, 'has several outputs')
      if kind == 'add' and len(ins) != 2:
        raise _refuse(layer, f'adds {len(ins)} tensors; only the sum of two is supported')
      if kind == 'add' and ins[0].shape != ins[1].shape:
        raise _refuse(
          layer, f'adds shapes {ins[0].shape} and {ins[1].shape}; only equal shapes are supported'
        )
      self.kinds[id(layer)] = kind
      self.inputs[id(layer)] = ins
      self.outputs[id(layer)] = out
      for t in ins:
        self.consumers.setdefault(id(t), []).append(layer)
      pending.append(layer)
    # Topological order: a layer comes after the layers producing its inputs.
    known = {id(self.input)}
    self.layers: List[tf.keras.layers.Layer] = []
    while pending:
      ready = [l for l in pending if all(id(t) in known for t in self.inputs[id(l)])]
      if not ready:
        raise _refuse(pending[0], "reads a tensor that is not computed from the model's input")
      for layer in ready:
        self.layers.append(layer)
        known.add(id(self.outputs[id(layer)]))
      pending = [l for l in pending if all(l is not r for r in ready)]
    if id(self.output) not in known:
      raise ConversionError(f'{model.name}: its output is not computed by its layers')
    self.ancestors: Dict[int, set] = {id(self.input): set()}
    for layer in self.layers:
      found = set()
      for t in self.inputs[id(layer)]:
        found |= self.ancestors[id(t)] | {id(t)}
      self.ancestors[id(self.outputs[id(layer)])] = found


def _branch_end(graph: _Graph, tensor) -> Optional[tf.keras.layers.Layer]:
  """The conv / dense layer without activation whose output `tensor` is, through BNs."""
  producers = {id(graph.outputs[id(l)]): l for l in graph.layers}
  layer = producers.get(id(tensor))
  while layer is not None and graph.kinds[id(layer)] == 'bn':
    layer = producers.get(id(graph.inputs[id(layer)][0]))
  if layer is None or graph.kinds[id(layer)] not in ('conv', 'dwconv', 'dense'):
    return None
  if _activation_name(layer.activation) != 'linear':
    return None
  return layer


def _residual_branch_ends(graph: _Graph) -> set:
  """ids of the layers that end a residual branch added onto an identity shortcut."""
  ends = set()
  for layer in graph.layers:
    if graph.kinds[id(layer)] != 'add':
      continue
    a, b = graph.inputs[id(layer)]
    for shortcut, branch in ((a, b), (b, a)):
      if id(shortcut) in graph.ancestors[id(branch)]:
        end = _branch_end(graph, branch)
        if end is not None:
          ends.add(id(end))
  return ends


class _Converter:
  """Builds the converted layers of one variant, tensor by tensor, and records the weights
  to copy from the input model."""

  def __init__(self, graph: _Graph, variant: str, gamma: float):
    self.graph = graph
    self.fedmef = variant == 'fedmef'
    self.gamma = float(gamma) if self.fedmef else 0.0
    self.alpha_ends = _residual_branch_ends(graph) if self.fedmef else set()
    self.names = {l.name for l in graph.layers} | {graph.input_name}
    self.copies = []  # (target variable, source variable)

  def unique(self, name: str) -> str:
    candidate, i = name, 0
    while candidate in self.names:
      i += 1
      candidate = f'{name}_{i}'
    self.names.add(candidate)
    return candidate

  def feeds_only_bn(self, layer) -> bool:
    users = self.graph.consumers.get(id(self.graph.outputs[id(layer)]), [])
    return bool(users) and all(self.graph.kinds[id(u)] == 'bn' for u in users)

  def bit_relu(self, x, max_value, name, signal: _Signal):
    x = sap.BitReLU(max_value=max_value, name=name)(x)
    if signal.gain == 1.0:
      return x, _Signal(signal.variance, RELU_GAIN)
    return x, _Signal(signal.variance, signal.gain)

  def masked(self, layer, kind: str, x, signal: _Signal):
    """The masked layer replacing `layer`, applied to `x`; returns (tensor, signal)."""
    activation = _activation_name(layer.activation)
    relu_split = self.fedmef and activation in _RELU_MAX
    gain_init = RESIDUAL_ALPHA if id(layer) in self.alpha_ends else 1.0
    if self.fedmef:
      use_bias = True if kind != 'dense' else bool(layer.use_bias)
      common = dict(
        normalize=True, sap_gamma=self.gamma, act_gain=signal.act_gain, gain_init=gain_init
      )
    else:
      use_bias = bool(layer.use_bias) and not (
        kind != 'dense' and activation == 'linear' and self.feeds_only_bn(layer)
      )
      common = dict(normalize=False, sap_gamma=0.0)
    common.update(
      use_bias=use_bias,
      name=layer.name,
      activation=None if relu_split or activation == 'linear' else activation,
      bias_initializer=_initializer(layer.bias_initializer),
    )
    if kind == 'conv':
      stem = signal.from_input
      if self.fedmef:
        common.update(center=not stem, center_output=not stem)
      new = sl.MaskedConv2D(
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        kernel_initializer=_initializer(layer.kernel_initializer),
        **common,
      )
      source_kernel = layer.kernel
    elif kind == 'dwconv':
      if self.fedmef:
        common.update(center=False, center_output=True)
      new = sl.MaskedDepthwiseConv2D(
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        depth_multiplier=layer.depth_multiplier,
        kernel_initializer=_initializer(layer.depthwise_initializer),
        **common,
      )
      source_kernel = layer.depthwise_kernel
    else:
      if self.fedmef:
        common.update(center=not signal.from_input)
      new = sl.MaskedDense(
        layer.units, kernel_initializer=_initializer(layer.kernel_initializer), **common
      )
      source_kernel = layer.kernel
    y = new(x)
    self.copies.append((new.kernel, source_kernel))
    if new.bias is not None and layer.use_bias:
      self.copies.append((new.bias, layer.bias))
    out = _Signal(gain_init * gain_init, 1.0)
    if relu_split:
      y, out = self.bit_relu(y, _RELU_MAX[activation], self.unique(layer.name + '_relu'), out)
    return y, out

  def clone(self, layer, x):
    new = type(layer).from_config(layer.get_config())
    y = new(x)
    self.copies.extend(zip(new.weights, layer.weights))
    return y

  def apply(self, layer, x: list, signals: List[_Signal]):
    kind = self.graph.kinds[id(layer)]
    if kind in ('conv', 'dwconv', 'dense'):
      return self.masked(layer, kind, x[0], signals[0])
    if kind == 'add':
      out = _Signal(sum(s.output_variance for s in signals), 1.0)
      return lean_layers.ResidualAdd(name=layer.name)(x), out
    if kind == 'pool':
      return lean_layers.GlobalAvgPool(name=layer.name)(x[0]), signals[0]
    if kind == 'bn':
      if self.fedmef:
        return x[0], signals[0]
      return self.clone(layer, x[0]), signals[0]
    if kind == 'relu' and self.fedmef:
      return self.bit_relu(x[0], _relu_max_value(layer), layer.name, signals[0])
    # relu (baseline), flatten, keep: the layer itself, the state passed on.
    return self.clone(layer, x[0]), signals[0]


def _check_stats(name: str, values, channels: int) -> List[float]:
  values = [float(v) for v in np.ravel(values)]
  if len(values) != channels:
    raise ConversionError(f'{name} needs {channels} channels, got {len(values)}')
  if not all(np.isfinite(values)):
    raise ConversionError(f'{name} must be finite, got {values}')
  return values


def sparsify(
  model: tf.keras.Model,
  *,
  density: float,
  variant: str = 'fedmef',
  gamma: float = 0.7,
  seed: int = 0,
  input_mean: Optional[Sequence[float]] = None,
  input_std: Optional[Sequence[float]] = None,
  copy_weights: bool = True,
) -> tf.keras.Model:
  """Converts a functional or Sequential Keras model into a FedMef (or baseline) model.

  See the module docstring for the layer table and the signal-propagation rules.

      model = fedmef_tf.sparsify(my_keras_model, density=0.2, variant="fedmef", gamma=0.7)
      model.compile(...); model.fit(...)   # masked weights stay exactly zero

  Args:
      model: a built `tf.keras.Model` (functional or Sequential) with one input and one
          output, made of the layers of `SUPPORTED_LAYERS`. It is not modified.
      density: global density of the prunable kernels in (0, 1]; below 1 the converted model
          gets ERK layer densities and random masks from `seed` (`masks.init_sparse`).
          Inside a TFF process, pass 1.0: the process draws the masks itself.
      variant: 'fedmef' (NSConv + SAP + BitReLU, no BatchNorm) or 'baseline' (masked layers
          with BatchNorm and ReLU), as in `fedmef_tf.VARIANTS`.
      gamma: SAP drop ratio in [0, 1] of the fedmef variant's masked layers (ignored by the
          baseline, whose layers have sap_gamma 0).
      seed: seed of the initial random masks.
      input_mean, input_std: per-channel mean and standard deviation of the inputs, both or
          neither. Given, the converted model starts with a Keras `Normalization` layer
          'input_norm' (constants, no trained variables); the fedmef variant's signal
          propagation assumes its input has unit variance.
      copy_weights: True: the converted layers start from the input model's weights (see the
          module docstring). False: from the initializers of the layers they replace, so the
          input model serves as a description only (its variables are never read; it may
          live in another graph, as `models.build_model`'s stock model does).

  Returns:
      A new, uncompiled `tf.keras.Model` named `<model.name>_<variant>`, with the input
      model's kernels and biases copied (unless `copy_weights=False`) and masked.

  Raises:
      ConversionError (a ValueError): a layer or model that cannot be converted, or a bad
          argument; the message is one line and names the layer and its class.
  """
  if variant not in VARIANTS:
    raise ConversionError(f'unknown variant {variant!r}; choose one of {VARIANTS}')
  if not 0.0 < float(density) <= 1.0:
    raise ConversionError(f'density must be in (0, 1], got {density}')
  if not 0.0 <= float(gamma) <= 1.0:
    raise ConversionError(f'gamma must be in [0, 1], got {gamma}')
  if (input_mean is None) != (input_std is None):
    raise ConversionError('input_mean and input_std must be given together')
  graph = _Graph(model)
  input_shape = tuple(graph.input.shape[1:])
  inputs = tf.keras.Input(shape=input_shape, dtype=graph.input.dtype, name=graph.input_name)
  converter = _Converter(graph, variant, gamma)
  x = inputs
  if input_mean is not None:
    channels = input_shape[-1]
    mean = _check_stats('input_mean', input_mean, channels)
    std = _check_stats('input_std', input_std, channels)
    if not all(v > 0.0 for v in std):
      raise ConversionError(f'input_std must be positive, got {std}')
    x = tf.keras.layers.Normalization(
      mean=mean, variance=[v * v for v in std], name=converter.unique('input_norm')
    )(x)
  tensors = {id(graph.input): x}
  signals = {id(graph.input): _Signal(from_input=True)}
  for layer in graph.layers:
    ins = graph.inputs[id(layer)]
    y, signal = converter.apply(layer, [tensors[id(t)] for t in ins], [signals[id(t)] for t in ins])
    out = graph.outputs[id(layer)]
    tensors[id(out)] = y
    signals[id(out)] = signal
  converted = tf.keras.Model(inputs, tensors[id(graph.output)], name=f'{model.name}_{variant}')
  if not masks.prunable_layers(converted):
    raise ConversionError(f'{model.name}: has no Conv2D, DepthwiseConv2D or Dense layer to mask')
  if copy_weights:
    for target, source in converter.copies:
      target.assign(source)
  if float(density) < 1.0:
    masks.init_sparse(converted, float(density), int(seed))
  return converted
