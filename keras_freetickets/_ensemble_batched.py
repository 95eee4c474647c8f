"""`BatchedPlan`: the M members of an ensemble run as one program.

Used by `FreeTicketsEnsemble` (on its live variables) and by
`keras_freetickets.export` (on folded constants); it knows nothing of either.
"""

import keras
import numpy as np
import tensorflow as tf


# Layers that are the identity at inference.
_INFERENCE_IDENTITY = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout, keras.layers.GaussianNoise,
    keras.layers.AlphaDropout, keras.layers.ActivityRegularization,
)
# Weightless layers that act on the last axis alone (elementwise, or a
# softmax over the last axis): they run on a `[..., M, C]` view.
_LAST_AXIS_LAYERS = (
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
    keras.layers.ELU,
)
_POOLING = (
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D, keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
)
# How a later Conv2D runs on the members' stacked channels: "grouped" (one
# convolution, groups = M) or "split" (one convolution per member's channel
# block). Equal within 2% at batch 1024 on FMNIST-CNN v1 (2 cores); "split"
# keeps the per-member convolution shapes.
CONV_MODE = "split"


def live_weight(layer, name):
    """A layer's current weight as a tensor (the ensemble's weight source)."""
    return tf.convert_to_tensor(getattr(layer, name))


def _layer_chain(model):
    """The layers a Sequential member runs, in order, or None."""
    if not isinstance(model, keras.Sequential):
        return None
    if type(model).call is not keras.Sequential.call:
        return None
    return list(model.layers)


def _same(layers, *names):
    first = layers[0]
    return all(
        getattr(layer, name) == getattr(first, name)
        for layer in layers[1:] for name in names
    )


def _same_activation(layers):
    return all(layer.activation is layers[0].activation for layer in layers)


def _step_kind(layers):
    """How one position of the members' chains runs batched, or None."""
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers):
        return None
    first = layers[0]
    if isinstance(first, keras.layers.InputLayer) or kind in _INFERENCE_IDENTITY:
        return "skip"
    if getattr(first, "quantization_mode", None) is not None:
        return None
    if any(getattr(layer, "lora_enabled", False) for layer in layers):
        return None
    if kind is keras.layers.Dense:
        if len(first.kernel.shape) != 2:
            return None
        shapes = {tuple(layer.kernel.shape) for layer in layers}
        if len(shapes) != 1 or not _same(layers, "use_bias"):
            return None
        return "dense" if _same_activation(layers) else None
    if kind is keras.layers.Conv2D:
        if first.data_format != "channels_last" or first.groups != 1:
            return None
        shapes = {tuple(layer.kernel.shape) for layer in layers}
        if len(shapes) != 1 or not _same(
            layers, "use_bias", "strides", "padding", "dilation_rate"
        ):
            return None
        return "conv2d" if _same_activation(layers) else None
    if kind in _POOLING:
        if first.data_format != "channels_last":
            return None
        return "pool" if _same(layers, "pool_size", "strides", "padding") else None
    if kind is keras.layers.Flatten:
        return "flatten" if first.data_format == "channels_last" else None
    if kind in _LAST_AXIS_LAYERS:
        if kind is keras.layers.Activation and not _same_activation(layers):
            return None
        if kind is keras.layers.LeakyReLU and not _same(layers, "negative_slope"):
            return None
        if kind is keras.layers.ReLU and not _same(
            layers, "max_value", "negative_slope", "threshold"
        ):
            return None
        if kind is keras.layers.ELU and not _same(layers, "alpha"):
            return None
        return "last_axis"
    if kind is keras.layers.Softmax:
        axis = first.axis
        return "last_axis" if axis in (-1, [-1], (-1,)) and _same(layers, "axis") else None
    return None


def _split_members(x, num_members):
    """`[..., M * C]` -> `[..., M, C]`."""
    channels = x.shape[-1] // num_members
    shape = tf.concat([tf.shape(x)[:-1], [num_members, channels]], 0)
    return tf.reshape(x, shape)


def _join_members(x):
    """`[..., M, C]` -> `[..., M * C]`."""
    shape = tf.concat([tf.shape(x)[:-2], [x.shape[-2] * x.shape[-1]]], 0)
    return tf.reshape(x, shape)


class BatchedPlan:
    """The members of an ensemble run as one program, layer by layer.

    Built when every member is a plain `keras.Sequential` of the same layer
    types and shapes, made of `Dense`, `Conv2D` (channels last, no groups),
    pooling, `Flatten`, activation layers and inference-time identities
    (dropout, noise). The M members' activations travel together, stacked on
    the channel axis (`[batch, ..., M * C]`, member-major): the first weighted
    layer runs once on the shared input with the M kernels concatenated on
    the output axis; a later `Dense` runs as one batched matmul (`einsum` of
    `[..., M, C_in]` with the stacked `[M, C_in, C_out]` kernels); a later
    `Conv2D` runs as a grouped convolution or one convolution per member's
    channel block (`CONV_MODE`); pooling runs on the stacked channels as it
    is; `Flatten` reorders to each member's own order. The kernels are read
    through `weight_fn(layer, "kernel" | "bias")`, so the ensemble runs on
    its live variables and the export on its folded constants. Everything
    else (training mode, other layers, mismatched members) runs each member
    on its own, as before.

    Args:
        steps: list of `(kind, layers)` pairs, one per layer position.
        num_members: int, M.

    Example:

    ```python
    plan = BatchedPlan.build(ensemble.members)  # None if not batchable
    probs = plan.probabilities(x, "logits", live_weight, axis=1)  # [N, M, C]
    ```
    """

    def __init__(self, steps, num_members):
        self.steps = steps
        self.num_members = num_members

    @classmethod
    def build(cls, members):
        """The plan for `members`, or None where they cannot run batched."""
        if len(members) < 2:
            return None
        chains = [_layer_chain(member) for member in members]
        if any(chain is None for chain in chains):
            return None
        if len({len(chain) for chain in chains}) != 1:
            return None
        steps = []
        for layers in zip(*chains):
            kind = _step_kind(list(layers))
            if kind is None:
                return None
            if kind != "skip":
                steps.append((kind, list(layers)))
        if not any(kind in ("dense", "conv2d") for kind, _ in steps):
            return None
        return cls(steps, len(members))

    @property
    def layers(self):
        """Every layer the plan reads weights from, member by member."""
        return [
            layer for kind, layers in self.steps if kind in ("dense", "conv2d")
            for layer in layers
        ]

    def __call__(self, inputs, weight_fn):
        """The members' outputs, `[batch, M, ...]` (each in its dtype)."""
        m = self.num_members
        x = tf.convert_to_tensor(inputs)
        shared = True  # x is the same for every member (not stacked yet)
        for kind, layers in self.steps:
            first = layers[0]
            if kind in ("dense", "conv2d"):
                dtype = first.compute_dtype
                x = tf.cast(x, dtype)
                kernels = [tf.cast(weight_fn(layer, "kernel"), dtype) for layer in layers]
                if kind == "dense":
                    x = self._dense(x, kernels, shared)
                else:
                    x = self._conv2d(first, x, kernels, shared)
                shared = False
                if first.use_bias:
                    x = x + tf.concat(
                        [tf.cast(weight_fn(layer, "bias"), dtype) for layer in layers], 0
                    )
                if first.activation is not None:
                    x = _join_members(first.activation(_split_members(x, m)))
            elif kind == "pool":
                x = first.call(x)
            elif kind == "flatten":
                x = first.call(x) if shared else self._flatten(x)
            elif kind == "last_axis":
                x = first.call(x) if shared else _join_members(
                    first.call(_split_members(x, m))
                )
        x = _split_members(x, m)  # [N, ..., M, C]
        rank = len(x.shape)
        if rank > 3:
            x = tf.transpose(x, [0, rank - 2] + list(range(1, rank - 2)) + [rank - 1])
        return x

    def probabilities(self, inputs, member_output, weight_fn, axis=1):
        """Float32 probabilities, `[batch, M, ...]` (axis=1) or `[M, batch, ...]`."""
        y = tf.cast(self(inputs, weight_fn), tf.float32)
        if member_output == "logits":
            y = tf.nn.softmax(y, axis=-1)
        if axis == 0:
            y = tf.transpose(y, [1, 0] + list(range(2, len(y.shape))))
        return y

    def _dense(self, x, kernels, shared):
        if shared:
            kernel = tf.concat(kernels, -1)  # [in, M * out]
            if len(x.shape) == 2:
                return tf.matmul(x, kernel)
            return tf.tensordot(x, kernel, [[len(x.shape) - 1], [0]])
        stacked = tf.stack(kernels)  # [M, in, out]
        out = tf.einsum("...mi,mio->...mo", _split_members(x, self.num_members), stacked)
        return _join_members(out)

    def _conv2d(self, layer, x, kernels, shared):
        def conv(inputs, kernel):
            return tf.nn.convolution(
                inputs, kernel, strides=list(layer.strides),
                padding=layer.padding.upper(), dilations=list(layer.dilation_rate),
            )

        if shared or CONV_MODE == "grouped":
            # Shared input: one convolution with M * C_out filters. Stacked
            # input: the same kernel is a grouped convolution (groups = M).
            return conv(x, tf.concat(kernels, -1))
        blocks = tf.split(x, self.num_members, axis=-1)
        return tf.concat([conv(b, k) for b, k in zip(blocks, kernels)], -1)

    def _flatten(self, x):
        """`[N, d..., M * C]` -> `[N, M * prod(d) * C]`, per member in order."""
        x = _split_members(x, self.num_members)  # [N, d..., M, C]
        rank = len(x.shape)
        x = tf.transpose(x, [0, rank - 2] + list(range(1, rank - 2)) + [rank - 1])
        size = int(np.prod(x.shape[1:]))
        return tf.reshape(x, [-1, size])
