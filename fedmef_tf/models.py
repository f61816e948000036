"""Model registry: small CNN, ResNet18 and MobileNetV2 for 32x32 inputs, FedMef or baseline.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) evaluates ResNet18 and MobileNetV2 in two
variants that differ only in what FedMef changes:

- `fedmef`: every convolution is an NSConv (`MaskedConv2D` / `MaskedDepthwiseConv2D` with
  `normalize=True`, a bias and a per-channel gain), and so is the classifier (`MaskedDense`),
  with scaled activation pruning (`sap_gamma=gamma`) on every one of them, activations are the
  1-bit-caching `sap.BitReLU` (ReLU or ReLU6), and there is no BatchNorm anywhere.
- `baseline`: masked convolutions without bias (`normalize=False`, `sap_gamma=0`) followed by
  `BatchNormalization` and a plain Keras `ReLU` (ReLU6 for MobileNetV2).

Both variants share the same stem, widths, strides, classifier and the names of their prunable
layers, so that their prunable kernels have identical shapes (and identical ERK densities and initial masks for the
same seed). Every Conv2D / DepthwiseConv2D / Dense kernel is a masked, prunable layer, the stem
and the classifier included.

Signal propagation of the fedmef variant (what BatchNorm does in the baseline, done by design):

- the input: both variants start with a Keras `Normalization` layer ("input_norm") holding the
  per-channel mean and standard deviation of the training split (`build_model`'s `input_mean`,
  `input_std`; `fedmef_tf.data.channel_stats`), so every model sees unit-variance inputs and an
  exported model takes pixel / 255 as it is;
- every NSConv maps a unit-variance input to a unit-variance output; the nonlinearity gain of
  the ReLU in front (`RELU_GAIN`, NF-Nets' gamma) and the expected scale of its input are folded
  into its kernel as the constant `act_gain`, never applied to an activation;
- the stem is not centred (`center=False`: its input is centred already, and a zero-sum kernel
  would pass only the part of a patch that differs from its mean, little on smooth images); the
  depthwise kernels are not centred either (their fan-in is spatial only, so centring them is a
  spatial high-pass filter); every other NSConv is, as the FedMef formula says;
- every NSConv output but the stem's is centred per example and channel over height and width
  (`nsconv.center_spatial`, before the bias): the per-channel offsets after a ReLU, which a
  centred kernel cannot remove and BatchNorm removes with batch statistics, would otherwise reach
  the classifier as a large common component of the pooled features;
- residual networks follow NF-ResNets (Brock et al. 2021): pre-activation blocks
  `h + alpha * f(relu(h) / beta)` with `beta` the analytically tracked scale of the stream
  (`_SignalScale`) folded into the first NSConv of the branch, and the branch gain `alpha`
  (`RESIDUAL_ALPHA`) the initial value of the learnable gain of its last NSConv; a block that
  changes resolution or width has no identity to stay close to and starts its branch at gain 1;
- the classifier is an NSConv-like dense layer (`normalize=True`: its centred kernel is blind to
  the common offset of the pooled ReLU features) that folds the ReLU gain over the stream scale;
- its clients train with adaptive gradient clipping (`fedmef_tf.agc`).

Departures from ../shared/ALGORITHM.md, which asks for NSConv on every convolution and nothing
else: the uncentred stem and depthwise kernels, the output centring, the NSConv classifier, the
pre-activation block order of the fedmef ResNet18 and AGC. Without them the BatchNorm-free
networks diverged or learned several times slower than the baseline on real images at the
paper's learning rate (`python -m benchmarks.trainability`, README); none of them caches an
activation or depends on the data.

The baseline is unchanged by all of this but the input normalisation (post-activation blocks,
plain residual sums, BatchNorm).

Memory (the point of the fedmef variant): no layer keeps a float copy of an activation for its
backward pass. The masked convs cache only the SAP-compressed input; BitReLU caches one bit per
element; bias addition and output centring need only the upstream gradient. The residual
addition and the global average pooling are the custom-gradient layers `ResidualAdd` and
`GlobalAvgPool` below, whose gradient functions refer to nothing but the (tiny) input shape.
TF's own `AddV2` / `Mean` gradients call `tf.shape(input)` when the batch size is unknown (as in
a Keras `fit` graph); whether that keeps the input alive is up to graph pruning (in a TF 2.14
`tf.function` step we measured no difference), so these layers make it a property of the code
rather than of the optimiser. There is no identity, scaling, max-pool or dropout op on the
activation path. Both variants use the same lean add and pooling layers, so that a measured
difference is due to NSConv + SAP + BitReLU + no BN only.

Layer names are fixed (`stem_conv`, `layer2_0_conv1`, `block3_expand`, `classifier`, ...), so
two builds of the same model have the same variable names whatever else lives in the process.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fedmef_tf import masks
from fedmef_tf import sap
from fedmef_tf import sparse_layers as sl

__all__ = [
    "MODEL_NAMES",
    "VARIANTS",
    "build_model",
    "count_parameters",
    "ResidualAdd",
    "GlobalAvgPool",
    "CUSTOM_OBJECTS",
    "MOBILENET_V2_32_SETTINGS",
]

MODEL_NAMES = ("cnn", "resnet18", "mobilenet_v2")
VARIANTS = ("fedmef", "baseline")

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

#: Nonlinearity gain of ReLU for unit-variance Gaussian pre-activations, sqrt(2 / (1 - 1/pi))
#: (Brock et al., 2021, NF-Nets): relu(z) * RELU_GAIN has unit variance again. ReLU6 uses the
#: same gain: for a unit-variance pre-activation it differs from ReLU only above 6 sigma.
RELU_GAIN = float(np.sqrt(2.0 / (1.0 - 1.0 / np.pi)))

MOBILENET_V2_LAST = 1280

#: Branch gain alpha of the fedmef residual networks (NF-ResNets, Brock et al. 2021, whose
#: default this is). A residual stage is `h_{i+1} = h_i + alpha * f_i(h_i / beta_i)`: the
#: branch `f_i` (NSConvs with nonlinearity gains) maps a unit-variance input to a unit-variance
#: output, so the expected variance of the stream grows by exactly `alpha^2` per block,
#: `beta_{i+1}^2 = beta_i^2 + alpha^2`, and `beta_i` is known analytically at every block (see
#: `_SignalScale`). A small alpha makes each block start close to the identity, which is what
#: keeps a normaliser-free residual network trainable at large learning rates.
RESIDUAL_ALPHA = 0.2


class _SignalScale:
    """Expected standard deviation beta of the residual stream of a fedmef network.

    Tracks the analytic variance of NF-ResNets: a stage whose shortcut is the identity adds
    alpha^2; a stage whose shortcut is a (strided or widening) NSConv of the scaled input, or a
    block without a shortcut, restarts the stream at 1 + alpha^2 or 1. Beta is folded into the
    next NSConv's `act_gain` (as 1 / beta), never applied to an activation.
    """

    def __init__(self):
        self.variance = 1.0

    @property
    def beta(self) -> float:
        return float(np.sqrt(self.variance))

    def add_branch(self, alpha: float, shortcut_identity: bool) -> None:
        base = self.variance if shortcut_identity else 1.0
        self.variance = base + alpha * alpha

    def reset(self) -> None:
        self.variance = 1.0


# -- lean layers (no activation cached for backward) ---------------------------------------------


@tf.keras.utils.register_keras_serializable(package="fedmef_tf")
class ResidualAdd(tf.keras.layers.Layer):
    """Scaled sum of two tensors of the same shape whose gradient caches nothing.

    Input: a list `[a, b]`, equal shapes `[B, H, W, C]`. Output: `scale * (a + b)`. Gradient:
    `scale` times the upstream gradient to both (no shape lookup on the inputs).

    Args:
        scale: constant factor (not trained); 1.0 is the plain sum, what both variants use.
    """

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not float(scale) > 0.0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def call(self, inputs):
        a, b = inputs
        scale = self.scale

        @tf.custom_gradient
        def _add(x, y):
            if scale == 1.0:
                def grad(dy):
                    return dy, dy

                return tf.stop_gradient(x) + tf.stop_gradient(y), grad

            def scaled_grad(dy):
                g = dy * scale
                return g, g

            return (tf.stop_gradient(x) + tf.stop_gradient(y)) * scale, scaled_grad

        return _add(a, b)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale})
        return config

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@tf.keras.utils.register_keras_serializable(package="fedmef_tf")
class GlobalAvgPool(tf.keras.layers.Layer):
    """Mean over height and width whose gradient caches only the input's shape.

    Input `[B, H, W, C]` -> output `[B, C]`. Gradient: `dy / (H * W)` broadcast to the input.
    """

    def call(self, inputs):
        @tf.custom_gradient
        def _pool(x):
            xs = tf.stop_gradient(x)
            shape = tf.shape(xs)  # int32 [4], the only thing the gradient keeps
            count = tf.cast(shape[1] * shape[2], xs.dtype)

            def grad(dy):
                return tf.broadcast_to((dy / count)[:, None, None, :], shape)

            return tf.reduce_mean(xs, axis=[1, 2]), grad

        return _pool(inputs)

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return tf.TensorShape([input_shape[0], input_shape[3]])


CUSTOM_OBJECTS: Dict[str, type] = dict(sl.CUSTOM_OBJECTS)
CUSTOM_OBJECTS.update({
    "ResidualAdd": ResidualAdd,
    "GlobalAvgPool": GlobalAvgPool,
    "BitReLU": sap.BitReLU,
})


# -- builder ---------------------------------------------------------------------------------


class _Builder:
    """Creates the layers of one variant with deterministic names and initializer seeds."""

    def __init__(self, variant: str, gamma: float, seed: int):
        self.fedmef = variant == "fedmef"
        self.gamma = float(gamma) if self.fedmef else 0.0
        self.seed = int(seed)
        self._count = 0

    def _init(self, kind: str):
        self._count += 1
        s = (self.seed * 100003 + self._count) % (2 ** 31 - 1)
        if kind == "he":
            return tf.keras.initializers.HeNormal(seed=s)
        return tf.keras.initializers.GlorotUniform(seed=s)

    def conv(self, x, filters: int, kernel_size: int, stride: int, name: str,
             act_gain: float = 1.0, center: bool = True, gain_init: float = 1.0):
        """Masked conv (NSConv + SAP + bias in fedmef, plain without bias in baseline).

        `act_gain`: the constant the fedmef NSConv folds into its kernel (the nonlinearity gain
        of the activation in front, over the expected scale of its input); the baseline ignores
        it, its BatchNorm normalises the output. `center=False` for the stem (see
        `nsconv`: its input, the normalised images, is centred already).
        """
        return sl.MaskedConv2D(
            filters, kernel_size, strides=stride, padding="same", use_bias=self.fedmef,
            kernel_initializer=self._init("he"), normalize=self.fedmef, sap_gamma=self.gamma,
            act_gain=act_gain if self.fedmef else 1.0, center=center, center_output=center,
            gain_init=gain_init, name=name)(x)

    def dwconv(self, x, stride: int, name: str, act_gain: float = 1.0):
        return sl.MaskedDepthwiseConv2D(
            3, strides=stride, padding="same", use_bias=self.fedmef,
            kernel_initializer=self._init("he"), normalize=self.fedmef, sap_gamma=self.gamma,
            act_gain=act_gain if self.fedmef else 1.0, center=False, center_output=True,
            name=name)(x)

    def norm(self, x, name: str):
        if self.fedmef:
            return x
        return tf.keras.layers.BatchNormalization(name=name)(x)

    def act(self, x, name: str, relu6: bool = False):
        max_value = 6.0 if relu6 else None
        if self.fedmef:
            return sap.BitReLU(max_value=max_value, name=name)(x)
        return tf.keras.layers.ReLU(max_value=max_value, name=name)(x)

    def conv_norm_act(self, x, filters, kernel_size, stride, name, relu6=False, act_gain=1.0,
                      center=True):
        x = self.conv(x, filters, kernel_size, stride, name + "_conv", act_gain, center)
        x = self.norm(x, name + "_bn")
        return self.act(x, name + "_relu", relu6)

    def head(self, x, num_classes: int, act_gain: float = RELU_GAIN):
        x = GlobalAvgPool(name="pool")(x)
        return sl.MaskedDense(
            num_classes, use_bias=True, kernel_initializer=self._init("glorot"),
            normalize=self.fedmef, sap_gamma=self.gamma,
            act_gain=act_gain if self.fedmef else 1.0, name="classifier")(x)


def _cnn(b: _Builder, x, num_classes: int):
    # The stem sees the normalised images (unit variance); every later conv a ReLU output.
    for i, (filters, stride) in enumerate(CNN_LAYERS):
        x = b.conv_norm_act(x, filters, 3, stride, "stem" if i == 0 else f"conv{i}",
                            act_gain=1.0 if i == 0 else RELU_GAIN, center=i > 0)
    return b.head(x, num_classes)


def _basic_block(b: _Builder, x, filters: int, stride: int, name: str):
    """Post-activation BasicBlock of the baseline: conv-BN-ReLU-conv-BN, add, ReLU."""
    shortcut = x
    h = b.conv(x, filters, 3, stride, name + "_conv1")
    h = b.norm(h, name + "_bn1")
    h = b.act(h, name + "_relu1")
    h = b.conv(h, filters, 3, 1, name + "_conv2")
    h = b.norm(h, name + "_bn2")
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = b.conv(x, filters, 1, stride, name + "_shortcut_conv")
        shortcut = b.norm(shortcut, name + "_shortcut_bn")
    h = ResidualAdd(name=name + "_add")([h, shortcut])
    return b.act(h, name + "_relu2")


def _nf_basic_block(b: _Builder, x, filters: int, stride: int, name: str,
                    scale: _SignalScale):
    """Normaliser-free pre-activation BasicBlock of the fedmef ResNet18 (NF-ResNet form).

    `x` is the residual stream, of expected standard deviation `scale.beta`. The block returns
    `shortcut + alpha * conv2(relu(conv1(relu(x) / beta)))`, where the ReLU gains, `1 / beta`
    and `alpha` are folded into the NSConv kernels (`act_gain`), so no op scales an
    activation. The shortcut is the identity, or in a transition block (stride or width
    change) a 1x1 NSConv of the same scaled input `relu(x) / beta`, as in NF-ResNets.
    """
    transition = stride != 1 or int(x.shape[-1]) != filters
    a = b.act(x, name + "_relu1")
    scaled = RELU_GAIN / scale.beta
    shortcut = x
    if transition:
        shortcut = b.conv(a, filters, 1, stride, name + "_shortcut_conv", scaled)
    h = b.conv(a, filters, 3, stride, name + "_conv1", scaled)
    h = b.act(h, name + "_relu2")
    branch_gain = 1.0 if transition else RESIDUAL_ALPHA
    h = b.conv(h, filters, 3, 1, name + "_conv2", RELU_GAIN, gain_init=branch_gain)
    scale.add_branch(branch_gain, shortcut_identity=not transition)
    return ResidualAdd(name=name + "_add")([h, shortcut])


def _resnet18(b: _Builder, x, num_classes: int):
    if not b.fedmef:
        x = b.conv_norm_act(x, 64, 3, 1, "stem")
        for s, (filters, stride) in enumerate(RESNET18_STAGES, start=1):
            for i in range(2):
                x = _basic_block(b, x, filters, stride if i == 0 else 1, f"layer{s}_{i}")
        return b.head(x, num_classes)
    # fedmef: the stem's output starts the residual stream (unit variance on normalised
    # images); the blocks activate it first (pre-activation), and a last ReLU ends it.
    scale = _SignalScale()
    x = b.conv(x, 64, 3, 1, "stem_conv", center=False)
    for s, (filters, stride) in enumerate(RESNET18_STAGES, start=1):
        for i in range(2):
            x = _nf_basic_block(b, x, filters, stride if i == 0 else 1, f"layer{s}_{i}", scale)
    x = b.act(x, "final_relu")
    return b.head(x, num_classes, RELU_GAIN / scale.beta)


def _inverted_residual(b: _Builder, x, expansion: int, filters: int, stride: int, name: str,
                       scale: _SignalScale, input_gain: float):
    """MobileNetV2 inverted residual; in fedmef the NF form `h + alpha * f(h / beta)`.

    `input_gain` is the gain of the block's input: the nonlinearity gain when it is the stem's
    ReLU6 output (block 0), else 1 (a linear bottleneck); the fedmef block folds
    `input_gain / beta` into its first NSConv and `alpha` into its projection when it has a
    residual connection. Blocks without one restart the stream at unit variance.
    """
    c_in = int(x.shape[-1])
    residual = stride == 1 and c_in == filters
    first_gain = input_gain / scale.beta
    h = x
    if expansion != 1:
        h = b.conv(h, c_in * expansion, 1, 1, name + "_expand", first_gain)
        h = b.norm(h, name + "_expand_bn")
        h = b.act(h, name + "_expand_relu", relu6=True)
        first_gain = RELU_GAIN
    h = b.dwconv(h, stride, name + "_dw", first_gain)
    h = b.norm(h, name + "_dw_bn")
    h = b.act(h, name + "_dw_relu", relu6=True)
    h = b.conv(h, filters, 1, 1, name + "_project", RELU_GAIN,
               gain_init=RESIDUAL_ALPHA if residual else 1.0)
    h = b.norm(h, name + "_project_bn")  # linear bottleneck: no activation
    if residual:
        scale.add_branch(RESIDUAL_ALPHA, shortcut_identity=True)
        h = ResidualAdd(name=name + "_add")([h, x])
    else:
        scale.reset()
    return h


def _mobilenet_v2(b: _Builder, x, num_classes: int):
    scale = _SignalScale()
    x = b.conv_norm_act(x, MOBILENET_V2_STEM, 3, 1, "stem", relu6=True, center=False)
    block = 0
    for expansion, filters, repeats, stride in MOBILENET_V2_32_SETTINGS:
        for i in range(repeats):
            x = _inverted_residual(b, x, expansion, filters, stride if i == 0 else 1,
                                   f"block{block}", scale, RELU_GAIN if block == 0 else 1.0)
            block += 1
    x = b.conv_norm_act(x, MOBILENET_V2_LAST, 1, 1, "last", relu6=True,
                        act_gain=1.0 / scale.beta)
    return b.head(x, num_classes)


_ARCHITECTURES = {"cnn": _cnn, "resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2}


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
    """Builds an uncompiled Keras functional model of the registry.

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
        A `tf.keras.Model` mapping float32 `[B, H, W, C]` images to `[B, num_classes]` logits.

    Raises:
        ValueError: unknown name or variant, or an argument out of range.
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    builder = _Builder(variant, gamma, seed)
    inputs = tf.keras.Input(shape=input_shape, name="images")
    x = inputs
    if (input_mean is None) != (input_std is None):
        raise ValueError("input_mean and input_std must be given together")
    if input_mean is not None:
        mean = [float(v) for v in input_mean]
        std = [float(v) for v in input_std]
        if len(mean) != input_shape[-1] or len(std) != input_shape[-1]:
            raise ValueError(f"input_mean and input_std need {input_shape[-1]} channels, got "
                             f"{len(mean)} and {len(std)}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(v) and v > 0.0 for v in std):
            raise ValueError(f"input_mean must be finite and input_std positive, got {mean} "
                             f"and {std}")
        x = tf.keras.layers.Normalization(
            mean=mean, variance=[v * v for v in std], name="input_norm")(x)
    outputs = _ARCHITECTURES[name](builder, x, int(num_classes))
    model = tf.keras.Model(inputs, outputs, name=f"{name}_{variant}")
    if float(density) < 1.0:
        masks.init_sparse(model, float(density), int(seed))
    return model


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
    dense = sum(int(np.prod(v.shape)) for v in model.trainable_weights
                if id(v) not in kernel_ids)
    state = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights
                if id(v) not in mask_ids)
    mask_entries = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights
                       if id(v) in mask_ids)
    return {
        "prunable": prunable,
        "nonzero": nonzero,
        "dense": dense,
        "trainable": prunable + dense,
        "state": state,
        "mask": mask_entries,
    }
