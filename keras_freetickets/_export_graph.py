"""The members of an export as graph code: sparse kernels compact.

`_MemberRunner` runs one member layer by layer with its `Dense`/`Conv`
kernels rebuilt from `_CompactKernel`s (bitmap plus values, `_codec`);
`_batched_plan` and `_ConstantWeights` run a `BatchedPlan` on the same
constants. See `keras_freetickets.export` for the format and its costs.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_freetickets import _codec
from keras_freetickets import prunable
from keras_freetickets import _keras_compat as compat
from keras_freetickets._keras_compat import FunctionalModel as Functional

# Grappler does not fold constants of 10 MiB or more: rebuild in pieces below.
_CHUNK_BYTES = 8 * 1024 * 1024


def _batched_plan(ensemble, runners, compact, kernel_mode):
    """The ensemble's batched plan where the export can run it, else None.

    Only with compact storage folded into constants (`kernel_mode="rebuild"`)
    and when every stacked kernel stays below Grappler's folding limit: the
    batched graph then runs on dense constants, as the per-member graph does.
    """
    if not compact or kernel_mode != "rebuild":
        return None
    plan = ensemble.batched_plan()
    if plan is None:
        return None
    compact_kernels = {}
    for runner in runners:
        for layer_id, (_, kernel) in runner.kernels.items():
            compact_kernels[layer_id] = kernel
    for kind, layers in plan.steps:
        if kind not in ("dense", "conv2d"):
            continue
        stacked = sum(
            int(np.prod(layer.kernel.shape)) * np.dtype(layer.kernel.dtype).itemsize
            for layer in layers
        )
        if stacked > _CHUNK_BYTES:
            return None
        for layer in layers:
            kernel = compact_kernels.get(id(layer))
            if kernel is not None and len(kernel.slices) != 1:
                return None
    return plan


class _ConstantWeights:
    """`weight_fn` of a batched plan in the export: compact kernels rebuilt
    in the graph (folded to constants on first run), other weights as
    constants."""

    def __init__(self, plan, runners):
        # Read eagerly here: the graph is traced later.
        self.kernels = {}
        for runner in runners:
            for layer_id, (_, kernel) in runner.kernels.items():
                self.kernels[layer_id] = kernel
        self.values = {}
        for layer in plan.layers:
            if id(layer) not in self.kernels:
                self.values[(id(layer), "kernel")] = _numpy(layer.kernel)
            if getattr(layer, "use_bias", False):
                self.values[(id(layer), "bias")] = _numpy(layer.bias)

    def __call__(self, layer, name):
        if name == "kernel" and id(layer) in self.kernels:
            return self.kernels[id(layer)].dense_slices()[0]
        return tf.constant(self.values[(id(layer), name)])



class _CompactKernel:
    """A sparse kernel as a packed bitmap plus values, and its in-graph rebuild.

    The kernel is cut along its last axis (the output units or filters of
    `Dense` and `Conv` kernels) into slices of at most `_CHUNK_BYTES` dense
    bytes: Grappler folds each slice's rebuild into a constant, and the layer
    runs once per slice and concatenates the outputs. (A rebuilt kernel of 10
    MiB or more would not be folded, nor would the pieces of a concatenated
    one: the rebuild would then run on every call.)
    """

    def __init__(self, value, mode):
        value = np.ascontiguousarray(value)
        self.shape = tuple(value.shape)
        self.dtype = value.dtype
        self.nonzeros = _codec.count_nonzeros(value)
        num_slices = min(self.shape[-1], max(1, -(-value.nbytes // _CHUNK_BYTES)))
        self.slices = []
        for part in np.array_split(value, num_slices, axis=-1):
            part = np.ascontiguousarray(part)
            nonzero = _codec.nonzero_positions(part.reshape(-1))
            bitmap = np.packbits(nonzero)
            values = part.reshape(-1)[nonzero]
            if mode == "rebuild_variables":
                bitmap = tf.Variable(bitmap, trainable=False, name="kernel_bitmap")
                values = tf.Variable(values, trainable=False, name="kernel_values")
            self.slices.append((part.shape, bitmap, values))
        self.compact_bytes = sum(
            int(np.prod(b.shape)) + int(np.prod(v.shape)) * self.dtype.itemsize
            for _, b, v in self.slices
        )

    @staticmethod
    def _positions(bitmap, size):
        """Flat positions (int64, `[nonzeros, 1]`) of a packed bitmap's ones."""
        shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.uint8)
        bits = tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(tf.expand_dims(bitmap, -1), shifts), 1
        )
        bits = tf.reshape(bits, [-1])[:size]
        return tf.where(tf.not_equal(bits, 0))

    def _tensors(self):
        for shape, bitmap, values in self.slices:
            if not isinstance(bitmap, tf.Variable):
                bitmap, values = tf.constant(bitmap), tf.constant(values)
            yield shape, bitmap, values

    def dense_slices(self):
        """The dense kernel slices, rebuilt in the graph."""
        result = []
        for shape, bitmap, values in self._tensors():
            size = int(np.prod(shape))
            flat = tf.tensor_scatter_nd_update(
                tf.zeros([size], values.dtype), self._positions(bitmap, size), values
            )
            result.append(tf.reshape(flat, shape))
        return result

    def sparse_slices(self):
        """The slices of a Dense kernel as `tf.SparseTensor`s `[in, out_i]`."""
        result = []
        for (n_in, n_out), bitmap, values in self._tensors():
            flat = self._positions(bitmap, n_in * n_out)[:, 0]
            indices = tf.stack([flat // n_out, flat % n_out], axis=1)
            result.append(tf.SparseTensor(indices, values, [n_in, n_out]))
        return result


def _conv_call_supported(layer):
    if type(layer).call is keras.layers.Conv2D.call:  # BaseConv.call: Conv2D, Conv3D
        return True
    return (
        type(layer).call is keras.layers.Conv1D.call and layer.padding != "causal"
    )


def _substitutable(layer):
    """Whether `layer` can run from a compact kernel: 'dense', 'conv' or None."""
    if getattr(layer, "quantization_mode", None) is not None:
        return None
    if getattr(layer, "lora_enabled", False):
        return None
    # Which weights are sparse kernels, and how each is applied, is
    # `prunable.kernel_roles`' to say; here only the stock one-kernel layers
    # whose call this module reproduces qualify.
    roles = prunable.kernel_roles(layer)
    if len(roles) != 1 or prunable.kernel_variable(layer, roles[0][0]) is None:
        return None
    if roles == [("kernel", "dense")] and type(layer).call is keras.layers.Dense.call:
        return "dense"
    if roles == [("kernel", "conv")] and _conv_call_supported(layer):
        return "conv"
    return None


def _graph_of(model):
    """The Functional graph a model runs, or None (subclassed models)."""
    if isinstance(model, keras.Sequential):
        if type(model).call is not keras.Sequential.call:
            return None
        graph = compat.sequential_graph(model)
        return graph if isinstance(graph, Functional) else None
    if isinstance(model, Functional) and type(model).call is Functional.call:
        return model
    return None


def _numpy(variable):
    """A variable's value as a numpy array (through its TF value, which avoids
    numpy 2's deprecated `__array__` path of Keras variables)."""
    value = getattr(variable, "value", variable)
    return np.asarray(tf.convert_to_tensor(value).numpy())


class _MemberRunner:
    """Runs one member on a tensor, with its sparse kernels compact.

    Built eagerly (kernels are read into numpy here); called while tracing.
    """

    def __init__(self, member, index, compact, kernel_mode):
        self.member = member
        self.index = index
        self.kernel_mode = kernel_mode
        self.kernels = {}  # id(layer) -> _CompactKernel
        self.dense_fallbacks = []  # readable descriptions
        self.graph = _graph_of(member) if compact else None
        if compact and self.graph is None:
            self._fall_back(member.weights,
                            " is not a Sequential or Functional model")
        if self.graph is not None:
            self._plan(self.graph)

    @property
    def constant_bytes(self):
        return sum(k.compact_bytes for _, k in self.kernels.values())

    def _plan(self, graph):
        for layer in graph.operations:
            nested = _graph_of(layer) if isinstance(layer, keras.Model) else None
            if nested is not None:
                self._plan(nested)
                continue
            if not isinstance(layer, keras.layers.Layer):
                continue
            kind = _substitutable(layer)
            if kind is not None:
                value = _numpy(layer.kernel)
                if _codec.bitmap_is_smaller(value):
                    self.kernels[id(layer)] = (
                        kind, _CompactKernel(value, self.kernel_mode)
                    )
                continue
            self._fall_back(
                layer.weights, f", layer '{layer.name}' ({type(layer).__name__}) "
                "has no compact implementation")

    def _fall_back(self, weights, reason):
        """Notes the sparse kernels among `weights` that stay dense, and why."""
        sparse = [
            v.path for v in prunable.prunable_variables(weights)
            if _codec.bitmap_is_smaller(_numpy(v))
        ]
        if sparse:
            self.dense_fallbacks.append(
                f"member {self.index} ('{self.member.name}'){reason}: its "
                f"sparse kernels {sparse} are stored dense"
            )

    def __call__(self, inputs):
        if self.graph is None:
            return self.member(inputs, training=False)
        return self._run(self.graph, inputs)

    def _run(self, graph, inputs):
        return compat.run_through_graph(graph, inputs, self._operation_fn)

    def _operation_fn(self, operation):
        nested = _graph_of(operation) if isinstance(operation, keras.Model) else None
        if nested is not None and len(nested.inputs) == 1:
            def call_nested(inputs, *args, **kwargs):
                return self._run(nested, inputs)
            return call_nested
        if id(operation) in self.kernels:
            kind, kernel = self.kernels[id(operation)]
            return lambda inputs, *args, **kwargs: self._compact_call(
                operation, kind, kernel, inputs
            )

        def call(*args, **kwargs):
            if "training" in compat.call_context_args(operation):
                kwargs["training"] = False
            return operation(*args, **kwargs)

        return call

    def _compact_call(self, layer, kind, kernel, inputs):
        """`Dense.call` / `BaseConv.call` with the kernel rebuilt from `kernel`."""
        compute_dtype = layer.compute_dtype
        inputs = tf.cast(inputs, compute_dtype)
        if self.kernel_mode == "sparse_matmul" and kind == "dense":
            flat = tf.reshape(inputs, [-1, kernel.shape[0]])
            outputs = [
                tf.sparse.sparse_dense_matmul(
                    flat,
                    tf.SparseTensor(
                        part.indices, tf.cast(part.values, compute_dtype), part.dense_shape
                    ),
                )
                for part in kernel.sparse_slices()
            ]
            outputs = outputs[0] if len(outputs) == 1 else tf.concat(outputs, -1)
            outputs = tf.reshape(
                outputs, tf.concat([tf.shape(inputs)[:-1], [kernel.shape[-1]]], 0)
            )
        else:
            outputs = []
            for part in kernel.dense_slices():
                part = tf.cast(part, compute_dtype)
                if kind == "dense":
                    outputs.append(keras.ops.matmul(inputs, part))
                else:
                    outputs.append(layer.convolution_op(inputs, part))
            channel_axis = (
                1 if kind == "conv" and layer.data_format == "channels_first" else -1
            )
            outputs = (
                outputs[0] if len(outputs) == 1 else tf.concat(outputs, channel_axis)
            )
        if getattr(layer, "use_bias", False) and layer.bias is not None:
            bias = tf.cast(layer.bias, compute_dtype)
            if kind == "conv" and layer.data_format == "channels_first":
                bias = tf.reshape(bias, (1, -1) + (1,) * layer.rank)
            outputs = outputs + bias
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs


def _warn_dense_fallbacks(runners):
    notes = [note for runner in runners for note in runner.dense_fallbacks]
    if notes:
        warnings.warn(
            "Some sparse kernels are exported dense (the export still runs and "
            "matches `ensemble.predict`, it is only larger): " + "; ".join(notes),
            stacklevel=3,
        )


def _summaries(stacked):
    """The `serving_default` outputs from `[batch, M, ...]` member probabilities."""
    probabilities = tf.reduce_mean(stacked, axis=1)
    entropy = -tf.reduce_sum(tf.math.xlogy(probabilities, probabilities), axis=-1)
    member_entropy = -tf.reduce_sum(tf.math.xlogy(stacked, stacked), axis=-1)
    mutual_information = tf.maximum(
        entropy - tf.reduce_mean(member_entropy, axis=1), 0.0
    )
    return {
        "probabilities": probabilities,
        "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        "confidence": tf.reduce_max(probabilities, axis=-1),
        "entropy": entropy,
        "mutual_information": mutual_information,
    }


def _check_inputs(inputs, input_shape, input_name):
    """Asserts `inputs` has shape `[batch] + input_shape`; returns it shaped."""
    expected = "[batch, " + ", ".join(
        "?" if d is None else str(d) for d in input_shape
    ) + "]"
    rank = len(input_shape) + 1
    shape = tf.shape(inputs, out_type=tf.int64)
    known = [(i + 1, d) for i, d in enumerate(input_shape) if d is not None]

    def dims_match():
        if not known:
            return tf.constant(True)
        axes = tf.constant([a for a, _ in known], tf.int64)
        want = tf.constant([d for _, d in known], tf.int64)
        return tf.reduce_all(tf.equal(tf.gather(shape, axes), want))

    ok = tf.cond(
        tf.equal(tf.size(shape, out_type=tf.int64), rank),
        dims_match,
        lambda: tf.constant(False),
    )
    got = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
    message = tf.strings.join(
        [f"{input_name} must have shape {expected}, got [", got, "]"]
    )
    check = tf.debugging.Assert(ok, [message], name="check_input_shape")
    with tf.control_dependencies([check]):
        inputs = tf.identity(inputs)
    return tf.ensure_shape(inputs, (None,) + tuple(input_shape))
