"""Masked (prunable) Keras layers: Conv2D, DepthwiseConv2D and Dense with a sparsity mask.

This module implements the masked layer contract of `docs/DESIGN.md`, on which the rest of
fedmef-tf relies. Each `MaskedLayer` holds these variables:

- `kernel` (trainable): the raw weights; entries where `mask == 0` are exactly zero at all
  times (`set_mask` zeroes them and their gradient is exactly zero, so SGD, momentum and Adam
  keep them, and their optimizer slots, at zero).
- `mask` (non-trainable float32, shape of `kernel`, values 0/1): the sparsity pattern.
- `marked` (non-trainable float32, shape of `kernel`, 0/1): the BaE marked set of the current
  adjustment round, a subset of the mask (all zeros outside adjustment rounds).
- `bae_lambda` (non-trainable float32 scalar): the BaE penalty weight (0 outside adjustment
  rounds).
- `bias` (optional, trainable, dense) and, with `normalize=True` (NSConv), `gain` (trainable,
  one per output channel, initialised to 1), both outside the pruning budget.

The effective kernel is `kernel * mask` through a `tf.custom_gradient` whose backward pass is

    dL/dkernel = dL/dW_eff * mask + 2 * bae_lambda * kernel * marked,

i.e. the task gradient restricted to the active entries plus the gradient of the BaE penalty
`bae_lambda * ||kernel * marked||^2` (FedMef, Huang et al., CVPR 2024;
`fedmef_tf.bae.penalty_gradient`). The penalty thus acts in
`model.fit`, custom loops and the TFLite train signature without touching the loss. (The penalty
itself is not added to the reported loss value; only its gradient is applied.)

With `normalize=True` the effective kernel is then standardised per output channel, NSConv's
kernel with its own backward pass (`fedmef_tf.nsconv.masked_standardized_kernel`). With
`sap_gamma > 0` and `training=True` the layer's op is the scaled-activation-pruning op of
`fedmef_tf.sap`, whose forward equals the plain op and whose weight gradient sees only the
largest-|x| entries of the input; otherwise the plain op.

What differs between plain TF, the TFF simulation and a TFLite export (the forward convolution,
the SAP storage, how the kernel is made and updated) is read from the current
`fedmef_tf.execution` strategy.

`prunable_layers` finds the masked layers of a model (the layer index `l` of the project).
A layer's `probe` adds a zero tensor to its effective kernel, through which
`fedmef_tf.growth.dense_kernel_gradients` takes the growth score of FedMef's mask adjustment.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from fedmef_tf import bae
from fedmef_tf import execution
from fedmef_tf import nsconv
from fedmef_tf import sap

__all__ = [
  'MaskedLayer',
  'MaskedConv2D',
  'MaskedDepthwiseConv2D',
  'MaskedDense',
  'masked_kernel',
  'prunable_layers',
  'assign_masks',
  'set_bae',
  'clear_bae',
  'CUSTOM_OBJECTS',
]


def masked_kernel(
  kernel: tf.Tensor, mask: tf.Tensor, marked: tf.Tensor, bae_lambda: tf.Tensor
) -> tf.Tensor:
  """`kernel * mask` with the FedMef masked-kernel gradient (task gradient masked, plus BaE).

  Args:
      kernel: float32 tensor, any shape (the raw weights, a read of the kernel variable).
      mask: 0/1 float32 tensor, same shape.
      marked: 0/1 float32 tensor, same shape (BaE marked set, subset of `mask`).
      bae_lambda: float32 scalar, the BaE penalty weight.

  Returns:
      `kernel * mask`, same shape. Gradient with respect to `kernel`:
      `upstream * mask + 2 * bae_lambda * kernel * marked` (`fedmef_tf.bae.penalty_gradient`);
      no gradient for the others.
  """
  mask = tf.stop_gradient(tf.cast(mask, kernel.dtype))
  marked = tf.stop_gradient(tf.cast(marked, kernel.dtype))
  bae_lambda = tf.stop_gradient(tf.cast(bae_lambda, kernel.dtype))

  @tf.custom_gradient
  def _masked(k):
    def grad(upstream):
      with tf.control_dependencies([upstream]):  # else computed (and held) in forward
        penalty = bae.penalty_gradient(k, marked, bae_lambda)
      return upstream * mask + penalty

    return k * mask, grad

  return _masked(kernel)


def _bias_add(y: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
  """`tf.nn.bias_add` whose backward computes the bias gradient before passing dy on.

  With the stock gradient, the `BiasAddGrad` op that reads dy is ready early but may be run
  last by the executor, which keeps every layer's upstream gradient (a full activation) alive
  until the end of the backward pass (the effect on the step's peak is in the README's memory
  table). Here dy reaches the layer's op only after the bias gradient is taken.

  Args:
      y: float tensor `[..., C]`.
      bias: float tensor `[C]`.

  Returns:
      `y + bias`, same shape as `y`.
  """

  @tf.custom_gradient
  def _add(v, b):
    def grad(dy):
      db = tf.reduce_sum(dy, axis=list(range(dy.shape.rank - 1)))
      with tf.control_dependencies([db]):
        dv = tf.identity(dy)
      return dv, db

    return tf.nn.bias_add(tf.stop_gradient(v), tf.stop_gradient(b)), grad

  return _add(y, bias)


def _is_python_true(training) -> Optional[bool]:
  """True/False when `training` is known statically, None when it is a symbolic tensor."""
  if training is None:
    return False
  if isinstance(training, (bool, int, np.bool_)):
    return bool(training)
  value = tf.get_static_value(training)
  if value is not None:
    return bool(value)
  return None


def _normalize_tuple(value, n: int, name: str):
  if isinstance(value, int):
    return (int(value),) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f'{name} must be an int or a tuple of {n} ints, got {value}')
  return value


def _normalize_padding(padding: str) -> str:
  padding = str(padding).upper()
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
  return padding


class MaskedLayer(tf.keras.layers.Layer):
  """Base of the prunable layers: the mask, BaE and probe machinery around one kernel.

  Subclasses define `_kernel_shape(input_shape)`, `_gain_size()` (number of output channels),
  `_depthwise` (class attribute) and `_apply_op(inputs, w, use_sap, input_grad_kernel=None)`.

  How the layer makes its kernel and applies its op is the current execution strategy's
  `layer_kernels` (`fedmef_tf.execution`): by default `effective_kernel`, then the op, the
  kernel's gradient left to the caller's optimizer.

  Args:
      use_bias: add a dense bias per output channel.
      kernel_initializer, bias_initializer: Keras initializers (names or objects).
      normalize: NSConv, i.e. scaled weight standardisation of the kernel with a learnable
          per-output-channel gain (init 1).
      sap_gamma: SAP drop ratio in [0, 1]; used only when called with `training=True`.
      act_gain: constant (not trained) factor folded into the standardised kernel of an NSConv
          layer, `W_hat = act_gain * g * ...`; 1.0 (default) is exactly the FedMef formula.
          Models set it to the nonlinearity gain of the activation in front of the layer
          (NF-Nets' gamma, sqrt(2 / (1 - 1/pi)) for ReLU) so that the signal keeps its scale
          through depth without BatchNorm. Folding it into the kernel costs no activation
          memory, unlike a scaling op on the activation. Ignored unless `normalize`.
      center: NSConv subtracts the per-channel kernel mean (the FedMef formula, default);
          False only scales each channel to unit norm (`nsconv.standardize_kernel`), for a
          layer whose input is centred already. Ignored unless `normalize`.
      center_output: subtract the per-example, per-channel spatial mean of the op's output
          before the bias (`nsconv.center_spatial`; convolutions only). Ignored unless
          `normalize`.
      gain_init: initial value of the NSConv gain g (1.0: the FedMef formula). Unlike
          `act_gain` it is learned: a residual branch's last NSConv starts at the branch gain
          alpha and learns its scale at the rate of every other gain.
      activation: optional Keras activation applied to the output (None: linear). Note that a
          plain `relu` keeps its float output for the backward pass; memory-lean models use
          `sap.BitReLU` layers instead.
      **kwargs: `tf.keras.layers.Layer` arguments (name, dtype, ...).
  """

  _depthwise = False

  @property
  def depthwise(self) -> bool:
    """Whether the kernel is a depthwise kernel `(kh, kw, c_in, multiplier)`."""
    return self._depthwise

  def __init__(
    self,
    *,
    use_bias: bool = True,
    kernel_initializer='glorot_uniform',
    bias_initializer='zeros',
    normalize: bool = False,
    sap_gamma: float = 0.0,
    act_gain: float = 1.0,
    center: bool = True,
    center_output: bool = False,
    gain_init: float = 1.0,
    activation=None,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if not 0.0 <= float(sap_gamma) <= 1.0:
      raise ValueError(f'sap_gamma must be in [0, 1], got {sap_gamma}')
    self.use_bias = bool(use_bias)
    self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
    self.bias_initializer = tf.keras.initializers.get(bias_initializer)
    self.normalize = bool(normalize)
    self.sap_gamma = float(sap_gamma)
    if not float(act_gain) > 0.0:
      raise ValueError(f'act_gain must be > 0, got {act_gain}')
    self.act_gain = float(act_gain)
    self.center = bool(center)
    self.center_output = bool(center_output)
    if not float(gain_init) >= 0.0:
      raise ValueError(f'gain_init must be >= 0, got {gain_init}')
    self.gain_init = float(gain_init)
    self.activation = tf.keras.activations.get(activation)
    self._probe = None

  @property
  def probe(self) -> Optional[tf.Tensor]:
    """None, or a zero tensor of the kernel's shape added to the effective kernel (scaled for
    NSConv) so that the task loss's gradient with respect to it is the growth score; set by
    `fedmef_tf.growth.dense_kernel_gradients` for the duration of one forward pass, in which
    the layer makes its kernel the plain way (`effective_kernel`)."""
    return self._probe

  @probe.setter
  def probe(self, value: Optional[tf.Tensor]) -> None:
    self._probe = value

  # -- subclass hooks ------------------------------------------------------------------------

  def _kernel_shape(self, input_shape: tf.TensorShape) -> tuple:
    raise NotImplementedError

  def _gain_size(self) -> int:
    raise NotImplementedError

  def _apply_op(
    self, inputs: tf.Tensor, w: tf.Tensor, use_sap: bool, input_grad_kernel=None
  ) -> tf.Tensor:
    """The op with kernel `w`, SAP if `use_sap` (`input_grad_kernel`: see
    `fedmef_tf.sap.sap_conv2d`; used only by the SAP op)."""
    raise NotImplementedError

  # -- variables -----------------------------------------------------------------------------

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    shape = self._kernel_shape(input_shape)
    self.kernel = self.add_weight(
      name='kernel',
      shape=shape,
      initializer=self.kernel_initializer,
      trainable=True,
      dtype=tf.float32,
    )
    self.mask = self.add_weight(
      name='mask', shape=shape, initializer='ones', trainable=False, dtype=tf.float32
    )
    self.marked = self.add_weight(
      name='marked', shape=shape, initializer='zeros', trainable=False, dtype=tf.float32
    )
    self.bae_lambda = self.add_weight(
      name='bae_lambda', shape=(), initializer='zeros', trainable=False, dtype=tf.float32
    )
    n_out = self._gain_size()
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight(
        name='bias',
        shape=(n_out,),
        initializer=self.bias_initializer,
        trainable=True,
        dtype=tf.float32,
      )
    self.gain = None
    if self.normalize:
      self.gain = self.add_weight(
        name='gain',
        shape=(n_out,),
        initializer=tf.keras.initializers.Constant(self.gain_init),
        trainable=True,
        dtype=tf.float32,
      )
    super().build(input_shape)

  # -- mask and BaE --------------------------------------------------------------------------

  def set_mask(self, mask) -> None:
    """Sets the mask and zeroes the kernel (and the marked set) where it is 0.

    Args:
        mask: 0/1 array-like with the kernel's shape.
    """
    mask = tf.cast(tf.convert_to_tensor(mask), tf.float32)
    if mask.shape != self.kernel.shape:
      raise ValueError(f'{self.name}: mask shape {mask.shape} != kernel shape {self.kernel.shape}')
    mask = tf.cast(tf.not_equal(mask, 0.0), tf.float32)
    self.mask.assign(mask)
    self.kernel.assign(self.kernel * mask)
    self.marked.assign(self.marked * mask)

  def set_bae(self, marked, lam: float) -> None:
    """Sets the BaE marked set (restricted to the mask) and lambda; `marked=None` clears.

    Args:
        marked: 0/1 array-like with the kernel's shape, or None for no marked entry.
        lam: penalty weight lambda (>= 0), unitless.
    """
    if marked is None:
      self.marked.assign(tf.zeros_like(self.marked))
      self.bae_lambda.assign(0.0)
      return
    marked = tf.cast(tf.convert_to_tensor(marked), tf.float32)
    if marked.shape != self.kernel.shape:
      raise ValueError(
        f'{self.name}: marked shape {marked.shape} != kernel shape {self.kernel.shape}'
      )
    self.marked.assign(tf.cast(tf.not_equal(marked, 0.0), tf.float32) * self.mask)
    self.bae_lambda.assign(tf.cast(lam, tf.float32))

  # -- forward -------------------------------------------------------------------------------

  def effective_kernel(self) -> tf.Tensor:
    """The kernel the op uses: `kernel * mask`, standardised (NSConv) when `normalize`.

    Includes the `probe` when one is set. Shape of `kernel`.
    """
    kernel = tf.convert_to_tensor(self.kernel)
    mask = tf.convert_to_tensor(self.mask)
    marked = tf.convert_to_tensor(self.marked)
    bae_lambda = tf.convert_to_tensor(self.bae_lambda)
    if not self.normalize:
      w = masked_kernel(kernel, mask, marked, bae_lambda)
      if self._probe is not None:
        w = w + self._probe
      return w
    gain = tf.convert_to_tensor(self.gain)
    if self.act_gain != 1.0:
      gain = gain * self.act_gain
    w = nsconv.masked_standardized_kernel(
      kernel, mask, marked, bae_lambda, gain, self._depthwise, self.center
    )
    if self._probe is not None:
      # First-order gradient of the raw weight were it active: dL/dW_hat * g / std.
      _, scale = nsconv.standardize_kernel(
        tf.stop_gradient(kernel * mask),
        mask,
        tf.stop_gradient(gain),
        self._depthwise,
        center=self.center,
        return_scale=True,
      )
      w = w + self._probe * scale
    return w

  def call(self, inputs, training=None):
    return self._forward(inputs, training)

  # Plain TF ops, no tensor-dependent Python flow: AutoGraph need not convert this method and
  # what it calls (`call` keeps its own signature, which Keras reads).
  @tf.autograph.experimental.do_not_convert
  def _forward(self, inputs, training):
    # How the kernel is made and updated: the current execution strategy's layer_kernels
    # (`fedmef_tf.execution`), or the plain way: `effective_kernel`, then the op.
    kernels = execution.current().layer_kernels
    if kernels is None or self._probe is not None:
      w = self.effective_kernel()
      y = self._op(tf.convert_to_tensor(inputs), w, training)
    else:
      y = kernels.apply(
        self,
        tf.convert_to_tensor(inputs),
        lambda x, w, input_grad_kernel=None: self._op(x, w, training, input_grad_kernel),
      )
    if self.normalize and self.center_output and y.shape.rank == 4:
      y = nsconv.center_spatial(y)
    if self.bias is not None:
      y = _bias_add(y, self.bias)
    if self.activation is not None:
      y = self.activation(y)
    return y

  def _op(self, inputs, w, training, input_grad_kernel=None):
    """The layer's op with kernel `w`: SAP when `sap_gamma > 0` and training, else plain."""
    if self.sap_gamma <= 0.0:
      return self._apply_op(inputs, w, False)
    static = _is_python_true(training)
    if static is None:
      return tf.__internal__.smart_cond.smart_cond(
        training,
        lambda: self._apply_op(inputs, w, True, input_grad_kernel),
        lambda: self._apply_op(inputs, w, False),
      )
    return self._apply_op(inputs, w, static, input_grad_kernel)

  def get_config(self):
    config = super().get_config()
    config.update(
      {
        'use_bias': self.use_bias,
        'kernel_initializer': tf.keras.initializers.serialize(self.kernel_initializer),
        'bias_initializer': tf.keras.initializers.serialize(self.bias_initializer),
        'normalize': self.normalize,
        'sap_gamma': self.sap_gamma,
        'act_gain': self.act_gain,
        'center': self.center,
        'center_output': self.center_output,
        'gain_init': self.gain_init,
        'activation': tf.keras.activations.serialize(self.activation),
      }
    )
    return config


def _conv_output_hw(input_shape, kernel_size, strides, padding):
  """Output height and width of a NHWC convolution (None where the input's is unknown)."""
  dims = []
  for i in range(2):
    size = input_shape[1 + i]
    if size is None:
      dims.append(None)
    elif padding == 'SAME':
      dims.append(-(-size // strides[i]))
    else:
      dims.append(-(-(size - kernel_size[i] + 1) // strides[i]))
  return dims


@tf.keras.utils.register_keras_serializable(package='fedmef_tf')
class MaskedConv2D(MaskedLayer):
  """Prunable 2-D convolution (NHWC), optionally NSConv and SAP.

  Args:
      filters: number of output channels C_out.
      kernel_size: int or (k_h, k_w).
      strides: int or (s_h, s_w).
      padding: 'same' or 'valid' (case-insensitive).
      **kwargs: see `MaskedLayer` (use_bias, kernel_initializer, bias_initializer,
          normalize, sap_gamma, activation, name, ...).

  Input `[B, H, W, C_in]` -> output `[B, H_out, W_out, C_out]`; kernel
  `(k_h, k_w, C_in, C_out)`.
  """

  def __init__(self, filters: int, kernel_size, strides=(1, 1), padding: str = 'valid', **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.kernel_size = _normalize_tuple(kernel_size, 2, 'kernel_size')
    self.strides = _normalize_tuple(strides, 2, 'strides')
    self.padding = _normalize_padding(padding)
    self.input_spec = tf.keras.layers.InputSpec(ndim=4)

  def _kernel_shape(self, input_shape):
    c_in = input_shape[-1]
    if c_in is None:
      raise ValueError(f'{self.name}: the channel dimension of the input must be known')
    return self.kernel_size + (int(c_in), self.filters)

  def _gain_size(self):
    return self.filters

  def _apply_op(self, inputs, w, use_sap, input_grad_kernel=None):
    if use_sap:
      return sap.sap_conv2d(
        inputs, w, self.strides, self.padding, self.sap_gamma, input_grad_kernel=input_grad_kernel
      )
    # The strategy's forward convolution (`tf.nn.conv2d` by default).
    return execution.current().conv2d(inputs, w, (1,) + self.strides + (1,), self.padding)

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    dims = _conv_output_hw(input_shape, self.kernel_size, self.strides, self.padding)
    return tf.TensorShape([input_shape[0]] + dims + [self.filters])

  def get_config(self):
    config = super().get_config()
    config.update(
      {
        'filters': self.filters,
        'kernel_size': self.kernel_size,
        'strides': self.strides,
        'padding': self.padding.lower(),
      }
    )
    return config


@tf.keras.utils.register_keras_serializable(package='fedmef_tf')
class MaskedDepthwiseConv2D(MaskedLayer):
  """Prunable depthwise 2-D convolution (NHWC), optionally NSConv (fan-in k_h*k_w) and SAP.

  Args:
      kernel_size: int or (k_h, k_w).
      strides: int or (s, s) (equal strides, as `tf.nn.depthwise_conv2d` requires).
      padding: 'same' or 'valid'.
      depth_multiplier: output channels per input channel.
      **kwargs: see `MaskedLayer`.

  Input `[B, H, W, C]` -> output `[B, H_out, W_out, C * depth_multiplier]`; kernel
  `(k_h, k_w, C, depth_multiplier)`; output channel c * depth_multiplier + m.
  """

  _depthwise = True

  def __init__(
    self, kernel_size, strides=(1, 1), padding: str = 'valid', depth_multiplier: int = 1, **kwargs
  ):
    super().__init__(**kwargs)
    self.kernel_size = _normalize_tuple(kernel_size, 2, 'kernel_size')
    self.strides = _normalize_tuple(strides, 2, 'strides')
    if self.strides[0] != self.strides[1]:
      raise ValueError(f'depthwise strides must be equal, got {self.strides}')
    self.padding = _normalize_padding(padding)
    self.depth_multiplier = int(depth_multiplier)
    self.input_spec = tf.keras.layers.InputSpec(ndim=4)

  def _kernel_shape(self, input_shape):
    c_in = input_shape[-1]
    if c_in is None:
      raise ValueError(f'{self.name}: the channel dimension of the input must be known')
    self._channels = int(c_in)
    return self.kernel_size + (int(c_in), self.depth_multiplier)

  def _gain_size(self):
    return self._channels * self.depth_multiplier

  def _apply_op(self, inputs, w, use_sap, input_grad_kernel=None):
    if use_sap:
      return sap.sap_depthwise_conv2d(
        inputs, w, self.strides, self.padding, self.sap_gamma, input_grad_kernel=input_grad_kernel
      )
    return sap.depthwise_conv2d(inputs, w, self.strides, self.padding)

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    dims = _conv_output_hw(input_shape, self.kernel_size, self.strides, self.padding)
    c = input_shape[-1]
    return tf.TensorShape(
      [input_shape[0]] + dims + [None if c is None else c * self.depth_multiplier]
    )

  def get_config(self):
    config = super().get_config()
    config.update(
      {
        'kernel_size': self.kernel_size,
        'strides': self.strides,
        'padding': self.padding.lower(),
        'depth_multiplier': self.depth_multiplier,
      }
    )
    return config


@tf.keras.utils.register_keras_serializable(package='fedmef_tf')
class MaskedDense(MaskedLayer):
  """Prunable fully connected layer, optionally NSConv-style standardised (fan-in d_in) and SAP.

  Args:
      units: output size d_out.
      **kwargs: see `MaskedLayer`.

  Input `[..., d_in]` -> output `[..., d_out]` (leading dims are flattened for the matmul);
  kernel `(d_in, d_out)`.
  """

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    self.units = int(units)
    self.input_spec = tf.keras.layers.InputSpec(min_ndim=2)

  def _kernel_shape(self, input_shape):
    d_in = input_shape[-1]
    if d_in is None:
      raise ValueError(f'{self.name}: the last dimension of the input must be known')
    return (int(d_in), self.units)

  def _gain_size(self):
    return self.units

  def _apply_op(self, inputs, w, use_sap, input_grad_kernel=None):
    rank = inputs.shape.rank
    x = inputs if rank == 2 else tf.reshape(inputs, [-1, int(inputs.shape[-1])])
    if use_sap:
      y = sap.sap_matmul(x, w, self.sap_gamma, input_grad_kernel=input_grad_kernel)
    else:
      y = tf.matmul(x, w)
    if rank != 2:
      y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
    return y

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    return input_shape[:-1].concatenate([self.units])

  def get_config(self):
    config = super().get_config()
    config.update({'units': self.units})
    return config


#: Custom objects to pass to `tf.keras.models.load_model` / `from_config` (they are also
#: registered under the package name "fedmef_tf").
CUSTOM_OBJECTS = {
  'MaskedConv2D': MaskedConv2D,
  'MaskedDepthwiseConv2D': MaskedDepthwiseConv2D,
  'MaskedDense': MaskedDense,
}


# -- model-level helpers -------------------------------------------------------------------------


def _children(layer) -> list:
  """Direct sub-layers of `layer`: a model's `layers`; for any other layer, those of its
  `tf.Module.submodules` that no other submodule holds, in the order `submodules` lists them."""
  if isinstance(layer, tf.keras.Model):
    return list(layer.layers)
  submodules = layer.submodules
  if not submodules:
    return []
  nested = {id(m) for sub in submodules for m in sub.submodules}
  return [m for m in submodules if id(m) not in nested and isinstance(m, tf.keras.layers.Layer)]


def prunable_layers(model: tf.keras.layers.Layer) -> list:
  """All masked (prunable) layers of a model, depth first in `model.layers` order.

  Nested models (through `model.layers`) and custom layers that own sub-layers (through
  `tf.Module.submodules`) are searched recursively; a layer that is shared (appears more than
  once) is listed once, at its first occurrence.

  Args:
      model: a `tf.keras.Model` (or any Keras layer).

  Returns:
      A list of `MaskedLayer`; its index is the layer index `l` used by masks,
      k_l, metrics and the federated state.
  """
  found: list = []
  seen: set = set()

  def visit(layer):
    if id(layer) in seen:
      return
    seen.add(id(layer))
    if isinstance(layer, MaskedLayer):
      found.append(layer)
      return
    for child in _children(layer):
      visit(child)

  if isinstance(model, MaskedLayer):
    return [model]
  for child in _children(model):
    visit(child)
  return found


def _check_count(layers: list, values: Sequence, what: str) -> None:
  if len(values) != len(layers):
    raise ValueError(f'{len(values)} {what} for {len(layers)} prunable layers')


def assign_masks(model: tf.keras.layers.Layer, masks: Sequence) -> None:
  """Sets the mask of every prunable layer and zeroes the kernel entries where it is 0.

  Args:
      model: a built model.
      masks: one 0/1 array per prunable layer (layer order of `prunable_layers`),
          each with its kernel's shape.
  """
  layers = prunable_layers(model)
  _check_count(layers, masks, 'masks')
  for layer, mask in zip(layers, masks):
    layer.set_mask(mask)


def set_bae(model: tf.keras.layers.Layer, marked_list: Optional[Sequence], lam: float) -> None:
  """Sets (or, with `marked_list=None`, clears) the BaE marked set and lambda of all layers.

  Args:
      model: a built model.
      marked_list: None, or one 0/1 array (or None) per prunable layer, with its kernel's shape.
          Entries outside the layer's mask are ignored.
      lam: BaE penalty weight lambda (>= 0); ignored when clearing.
  """
  layers = prunable_layers(model)
  if marked_list is None:
    for layer in layers:
      layer.set_bae(None, 0.0)
    return
  if float(lam) < 0.0:
    raise ValueError(f'lambda must be >= 0, got {lam}')
  _check_count(layers, marked_list, 'marked sets')
  for layer, marked in zip(layers, marked_list):
    if marked is None:
      layer.set_bae(None, 0.0)
    else:
      layer.set_bae(marked, lam)


def clear_bae(model: tf.keras.layers.Layer) -> None:
  """Clears the BaE marked set and lambda of every prunable layer (`set_bae(model, None, 0)`)."""
  set_bae(model, None, 0.0)
