"""Ensemble inference through the compiled sparse convolution.

`ConvRunner.build(member)` plans, for a plain Sequential member, which of
its `Conv2D` layers can run through `native.sparse_conv2d` (strides 1, no
dilation or groups, channels last, "same" or "valid" padding, ReLU or
linear activation, float32, not quantized, no LoRA), each with the
`MaxPooling2D(2)` that follows it fused in. Every other layer runs as Keras
runs it at inference. A member with no such layer gets no runner.

`FreeTicketsEnsemble(..., conv_kernels=...)` decides when the runners are
used (at inference only, never under XLA); this module only plans and runs.
"""

import keras
import tensorflow as tf

from keras_freetickets import _keras_compat as compat
from keras_freetickets import native
from keras_freetickets._ensemble_batched import _layer_chain

CONV_KERNELS = ("auto", "dense", "compiled")
"""The values of `FreeTicketsEnsemble`'s `conv_kernels`, the default first."""

def use_compiled_conv(conv_kernels):
    """Whether inference traced now runs eligible layers through the op:
    never for "dense" or under XLA; for "auto" where the op is available;
    for "compiled" there too, and a RuntimeError where it is not."""
    if conv_kernels == "dense" or compat.in_xla_context():
        return False
    if native.conv_available():
        return True
    if conv_kernels == "compiled":
        raise RuntimeError(
            "FreeTicketsEnsemble(conv_kernels='compiled') needs the compiled "
            "sparse convolution, which is not built or is disabled here "
            "(KFT_NATIVE, or a visible GPU under KFT_NATIVE=auto). Run "
            "`python -m keras_freetickets.native build`, or pass "
            "conv_kernels='auto'."
        )
    return False


_ACTIVATIONS = {keras.activations.relu: True, keras.activations.linear: False}


def _plain_float32(layer):
    return (
        layer.compute_dtype == "float32"
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "lora_enabled", False)
    )


def eligible_conv(layer):
    """Whether `layer` computes what the compiled convolution computes."""
    return (
        type(layer) is keras.layers.Conv2D
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("same", "valid")
        and layer.activation in _ACTIVATIONS
        and layer.kernel.dtype == "float32"
        and _plain_float32(layer)
    )


def fusable_pool(layer):
    """Whether `layer` is the 2x2, stride-2 max pooling the op fuses."""
    return (
        type(layer) is keras.layers.MaxPooling2D
        and tuple(layer.pool_size) == (2, 2)
        and tuple(layer.strides) == (2, 2)
        and layer.padding == "valid"
        and layer.data_format == "channels_last"
    )


class ConvRunner:
    """A member's layers as steps: ("conv", conv layer, fused pooling layer
    or None) through the op, ("layer", layer, None) as Keras runs it."""

    def __init__(self, steps):
        self.steps = steps

    @classmethod
    def build(cls, member):
        """The runner of `member`, or None when no layer would use the op."""
        chain = _layer_chain(member)
        if chain is None or member.compute_dtype != "float32":
            return None
        steps, index = [], 0
        while index < len(chain):
            layer = chain[index]
            if isinstance(layer, keras.layers.InputLayer):
                index += 1
            elif eligible_conv(layer):
                pool = None
                if index + 1 < len(chain) and fusable_pool(chain[index + 1]):
                    pool = chain[index + 1]
                steps.append(("conv", layer, pool))
                index += 1 if pool is None else 2
            else:
                steps.append(("layer", layer, None))
                index += 1
        if not any(kind == "conv" for kind, _, _ in steps):
            return None
        return cls(steps)

    @property
    def layer_names(self):
        """The names of the layers that run through the op, each pooling
        layer fused into a convolution included."""
        return [
            one.name
            for kind, layer, pool in self.steps if kind == "conv"
            for one in (layer, pool) if one is not None
        ]

    def __call__(self, inputs):
        h = tf.cast(inputs, tf.float32)
        for kind, layer, pool in self.steps:
            if kind == "layer":
                h = layer(h, training=False)
                continue
            kernel = tf.convert_to_tensor(layer.kernel)
            bias = (tf.convert_to_tensor(layer.bias) if layer.use_bias
                    else tf.zeros([layer.filters], tf.float32))
            h = native.sparse_conv2d(
                h, kernel, bias, padding=layer.padding.upper(),
                relu=_ACTIVATIONS[layer.activation],
                pool=1 if pool is None else 2,
            )
        return h
