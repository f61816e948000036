"""Execution strategies: what the same FedMef layer code does in plain TF, TFF and a TFLite export.

The masked layers (`fedmef_tf.sparse_layers`), the SAP ops and the 1-bit activations
(`fedmef_tf.sap`) compute the same numbers everywhere, but how they compute them depends on
where the traced graph runs:

- plain TensorFlow (this module's `DEFAULT`): SAP keeps its kept activations as values plus a
    packed 1-bit mask, convolutions are `tf.nn.conv2d` with `Conv2DBackpropFilter` as their
    weight gradient, the backward order is pinned by control dependencies, the native CPU kernels
    of `fedmef_tf.sap.native` are used where they are built, and a masked layer's kernel is
    `kernel * mask` whose gradient the caller's optimizer applies;
- the TFF simulation (`TFF_SIMULATION`): SAP keeps the dense pruned input (the same kept set
    and gradients, without the memory saving) and no native kernel is traced, since TFF runs the
    graphs in its own worker process;
- a TFLite export (`tflite_export.train_module.tflite_strategy`): static-shape SAP storage,
    batch-sliced convolutions, builtin-op weight gradients, the backward order carried by data
    dependencies (the converter drops control dependencies) and, in the `train` signature, each
    masked kernel updated inside its own backward pass.

A `Strategy` holds these choices. The caller scopes one around the code that traces the model,

        with execution.scope(execution.TFF_SIMULATION):
            ...  # build / trace the model here

and the layer and SAP code reads `current()` at the points where the behaviour differs. The
implementations of the TFLite variants live in `tflite_export` (this package does not import
it); what they must provide is the interface of `ActivationStorage` and `LayerKernels` below.
The scope is process-wide (a stack): code traced in any thread while a scope is open sees it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import tensorflow as tf

__all__ = [
  'Strategy',
  'ActivationStorage',
  'LayerKernels',
  'STORED',
  'SIMULATED',
  'SAP_STORAGES',
  'DEFAULT',
  'TFF_SIMULATION',
  'scope',
  'current',
  'tf_conv2d',
  'tf_conv2d_filter_grad',
  'DepthwiseOps',
  'TF_DEPTHWISE_OPS',
]

#: SAP storage: the kept values of the input and a packed 1-bit keep mask (`fedmef_tf.sap`);
#: 1-bit activations keep a packed mask. The memory saving is real.
STORED = 'stored'
#: SAP storage: the dense pruned input; 1-bit activations keep their float output. The same
#: kept sets and gradients as `STORED`, at the cost of the plain layers.
SIMULATED = 'simulated'
#: The SAP storages `fedmef_tf.sap` implements itself (named by these strings).
SAP_STORAGES = (STORED, SIMULATED)


class ActivationStorage(abc.ABC):
  """How a SAP op keeps the entries of its input that it keeps, and how a 1-bit activation
  keeps its pass mask, between the forward and the backward pass.

  `fedmef_tf.sap.PACKED` (the `STORED` storage) is one; `tflite_export.static_sap.TOPK` keeps
  static-shape values and int32 indices for TFLite.
  """

  @abc.abstractmethod
  def compress(self, x: tf.Tensor, gamma: float) -> Tuple[tf.Tensor, tf.Tensor]:
    """What is kept of `x` (float32, any shape): two tensors for `decompress`. The kept set is
    the `ceil((1 - gamma) * numel(x))` largest-|x| entries (`fedmef_tf.sap.keep_mask`)."""

  @abc.abstractmethod
  def decompress(self, first: tf.Tensor, second: tf.Tensor, shape) -> tf.Tensor:
    """The dense pruned input of shape `shape` from `compress`'s two outputs: the kept entries
    at their places, zero elsewhere."""

  @abc.abstractmethod
  def store_mask(self, mask: tf.Tensor) -> Tuple[tf.Tensor, Any]:
    """What a 1-bit activation keeps of its bool pass mask: `(stored, shape)` for
    `load_mask`."""

  @abc.abstractmethod
  def load_mask(self, stored: tf.Tensor, shape, dy: tf.Tensor) -> tf.Tensor:
    """The bool pass mask back from `store_mask`'s output, made once `dy` (the activation's
    output gradient) exists."""


class LayerKernels(abc.ABC):
  """How a masked layer makes its kernel and runs its op, in place of the plain way.

  The plain way (no `LayerKernels` in the strategy) is `MaskedLayer.effective_kernel` followed
  by the layer's op; the gradient of the raw kernel is left to the caller's optimizer.
  `tflite_export.layer_updates.InBackwardUpdates` instead updates each kernel inside its own
  backward pass.
  """

  @abc.abstractmethod
  def apply(self, layer, inputs: tf.Tensor, op: Callable[..., tf.Tensor]) -> tf.Tensor:
    """The output of `layer`'s op (before output centring, bias and activation).

    Args:
        layer: a built `fedmef_tf.sparse_layers.MaskedLayer`.
        inputs: the layer's input tensor.
        op: `op(inputs, w, input_grad_kernel=None)` runs the layer's op (plain or SAP)
            with the kernel `w`; `input_grad_kernel`, a function `dw -> kernel`, makes the
            kernel of a SAP op's input gradient after its weight gradient `dw` instead of
            keeping `w` (`fedmef_tf.sap.sap_conv2d`).
    """

  def updated_in_backward(self) -> Sequence[tf.Variable]:
    """The variables that the layers traced so far updated inside their own backward pass.

    A training step (`fedmef_tf.client.sgd_step`) applies no gradient to these, does not clip
    their gradients (the update has clipped its own) and does not mask them again. The plain
    way updates nothing in the backward pass: the default is empty.
    """
    return ()


def tf_conv2d(x: tf.Tensor, w: tf.Tensor, strides: Sequence[int], padding: str) -> tf.Tensor:
  """`tf.nn.conv2d(x, w, strides, padding)`: `x` `[B, H, W, C_in]`, `w` `[k_h, k_w, C_in,
  C_out]`, `strides` a 4-tuple in NHWC order; the plain forward convolution."""
  return tf.nn.conv2d(x, w, strides, padding)


def tf_conv2d_filter_grad(
  x: tf.Tensor, dy: tf.Tensor, w_shape, strides: Sequence[int], padding: str
) -> tf.Tensor:
  """`Conv2DBackpropFilter`: the weight gradient `[k_h, k_w, C_in, C_out]` (`w_shape`) of a
  convolution of `x` whose output gradient is `dy`."""
  return tf.raw_ops.Conv2DBackpropFilter(
    input=x, filter_sizes=w_shape, out_backprop=dy, strides=strides, padding=padding
  )


class DepthwiseOps(NamedTuple):
  """The depthwise convolution ops of masked depthwise layers (NHWC, strides as 4-tuples).

  Attributes:
      conv: `(x, w, strides, padding) -> y`, differentiable (`tf.nn.depthwise_conv2d`): the
          plain layer's op (a SAP op computes its forward with `tf.nn.depthwise_conv2d` and
          its gradients with the two below).
      input_grad: `(dy, w, x_shape, strides, padding) -> dx`.
      filter_grad: `(x, dy, w_shape, strides, padding) -> dw`.
  """

  conv: Callable
  input_grad: Callable
  filter_grad: Callable


#: TF's depthwise convolution and its gradient kernels.
TF_DEPTHWISE_OPS = DepthwiseOps(
  conv=lambda x, w, s, padding: tf.nn.depthwise_conv2d(x, w, s, padding),
  input_grad=lambda dy, w, x_shape, s, padding: tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
    input_sizes=x_shape, filter=w, out_backprop=dy, strides=s, padding=padding
  ),
  filter_grad=lambda x, dy, w_shape, s, padding: tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
    input=x, filter_sizes=w_shape, out_backprop=dy, strides=s, padding=padding
  ),
)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What varies between plain TF, the TFF simulation and a TFLite export.

  Attributes:
      sap_storage: how SAP ops and 1-bit activations keep what they keep for the backward pass:
          `STORED`, `SIMULATED` or an `ActivationStorage`.
      conv2d: the forward 2-D convolution of every masked conv layer (plain and SAP),
          `(x, w, strides4, padding) -> y` with `tf.nn.conv2d`'s values.
      conv2d_filter_grad: the weight gradient of those convolutions in SAP ops (and in a
          `conv2d` that defines its own gradient), `(x, dy, w_shape, strides4, padding) -> dw`.
      data_dependencies: `fedmef_tf.sap.after` orders the backward pass with data dependencies
          (for graphs whose converter drops control dependencies).
      native_kernels: SAP may use the native CPU kernels of `fedmef_tf.sap.native` (where they
          are built and the graph runs in this process).
      layer_kernels: how a masked layer makes and updates its kernel; None: the plain way
          (`LayerKernels`).
      depthwise: the depthwise convolution and its two gradients of masked depthwise layers
          (`DepthwiseOps`; TFLite has no builtin kernels for TF's depthwise gradients).
  """

  sap_storage: Union[str, ActivationStorage] = STORED
  conv2d: Callable[..., tf.Tensor] = tf_conv2d
  conv2d_filter_grad: Callable[..., tf.Tensor] = tf_conv2d_filter_grad
  data_dependencies: bool = False
  native_kernels: bool = True
  layer_kernels: Optional[LayerKernels] = None
  depthwise: DepthwiseOps = TF_DEPTHWISE_OPS

  def __post_init__(self):
    allowed = f'one of {SAP_STORAGES} or an ActivationStorage'
    if isinstance(self.sap_storage, str) and self.sap_storage not in SAP_STORAGES:
      raise ValueError(f'sap_storage must be {allowed}, got {self.sap_storage!r}')
    if not isinstance(self.sap_storage, (str, ActivationStorage)):
      raise TypeError(f'sap_storage must be {allowed}, got {type(self.sap_storage).__name__}')
    if self.layer_kernels is not None and not isinstance(self.layer_kernels, LayerKernels):
      raise TypeError(
        f'layer_kernels must be None or a LayerKernels, got {type(self.layer_kernels).__name__}'
      )

  def replace(self, **changes) -> 'Strategy':
    """A copy with the given attributes changed (`dataclasses.replace`)."""
    return dataclasses.replace(self, **changes)


#: Plain TensorFlow: the memory-saving SAP storage, TF convolutions, native kernels.
DEFAULT = Strategy()
#: Graphs run by TFF's worker: SAP simulated (same numerics, plain-layer cost), no native ops.
TFF_SIMULATION = Strategy(sap_storage=SIMULATED, native_kernels=False)

_STACK = [DEFAULT]


@contextlib.contextmanager
def scope(strategy: Strategy) -> Iterator[Strategy]:
  """Within the block, layers and SAP ops traced here use `strategy`; yields it.

  Raises:
      TypeError: `strategy` is not a `Strategy`.
  """
  if not isinstance(strategy, Strategy):
    raise TypeError(f'expected an execution.Strategy, got {type(strategy).__name__}')
  _STACK.append(strategy)
  try:
    yield strategy
  finally:
    _STACK.pop()


def current() -> Strategy:
  """The strategy of the innermost open `scope`, else `DEFAULT`."""
  return _STACK[-1]
