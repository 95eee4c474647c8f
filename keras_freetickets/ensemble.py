"""`FreeTicketsEnsemble`: a Keras model that averages its members' softmax."""

import os
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_freetickets import members as members_lib

_OUTPUT_KINDS = ("logits", "probabilities")

# Per-ensemble helper models for `member_predictions`, kept outside the
# ensemble's attributes so that Keras neither tracks nor saves them.
_STACK_MODELS = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_freetickets")
class FreeTicketsEnsemble(keras.Model):
    """An ensemble whose prediction is the mean of its members' probabilities.

    Each member is a Keras model with one input and one output of the same
    shapes as every other member's (classification: `(batch, classes)`; any
    rank works, the softmax is over the last axis). `call` evaluates all
    members on the batch in one traced graph, converts their outputs to
    probabilities (softmax of logits, or the outputs themselves) and returns
    their mean, so `ensemble.predict(x)` costs one `predict` call whatever
    the number of members. The members are ordinary sublayers: the ensemble
    saves to and loads from `.keras` files (weights are stored by member
    position, so members with identical layer names are not mixed up), and a
    member's exact zeros survive the round trip.

    `output` is checked against each member's final layer when it can be
    determined (a `Softmax` layer or a layer whose `activation` is softmax
    outputs probabilities; a linear activation outputs logits): softmax under
    `output="logits"` (softmax applied twice) and linear under
    `output="probabilities"` (logits averaged as probabilities) are errors.
    Members whose final activation cannot be read (subclassed models) are
    checked at `member_predictions` time under `output="probabilities"`: rows
    must be non-negative and sum to 1.

    With `batched=True`, inference (`predict`, `member_predictions`, a call
    with `training=False`, and `export`) runs the members as one batched
    program where their layers allow it (plain Sequential members of equal
    shapes made of Dense, Conv2D, pooling, Flatten and activation layers; see
    `BatchedPlan`): the first layer runs once with the M kernels concatenated,
    later Dense layers as one batched matmul, later Conv2D layers on the
    members' stacked channels. Other members run one by one as before. It
    computes the same probabilities (within float rounding, about 1e-7). It
    is off by default because on the 2-core CPUs it was measured on it was
    slower than the per-member graph, whose independent member branches
    TensorFlow already runs in parallel (`benchmarks/storage_and_inference.py`,
    "Ensemble inference").

    Args:
        members: list of built `keras.Model`s, at least one, distinct objects,
            sharing input and output shapes.
        output: str. What the members output: `"logits"` (the default; a
            softmax is applied) or `"probabilities"`.
        batched: bool. Whether inference runs the members as one batched
            program where their layers allow it (default False).
        name: Optional str. The ensemble's name.
        **kwargs: Base `keras.Model` arguments (`trainable`, `dtype`).

    Example:

    ```python
    members = [
        keras.Sequential([keras.Input((20,)), keras.layers.Dense(3)])
        for _ in range(3)
    ]
    ensemble = FreeTicketsEnsemble(members, output="logits")
    probs = ensemble.predict(np.zeros((8, 20), "float32"))      # (8, 3)
    per_member = ensemble.member_predictions(np.zeros((8, 20)))  # (3, 8, 3)
    ```
    """

    def __init__(self, members, output="logits", batched=False, name=None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(batched, (bool, np.bool_)):
            raise ValueError(
                f"Argument `batched` must be a bool. Received: batched={batched!r}"
            )
        if isinstance(members, keras.Model) or not isinstance(members, (list, tuple)):
            raise ValueError(
                "Argument `members` must be a list of Keras models. "
                f"Received: members={members!r}"
            )
        if len(members) < 1:
            raise ValueError(
                "Argument `members` must hold at least one model. "
                f"Received: num_members={len(members)}"
            )
        for index, member in enumerate(members):
            if not isinstance(member, keras.Model):
                raise ValueError(
                    "Every member must be a `keras.Model`. Received: "
                    f"members[{index}]={member!r} of type {type(member).__name__}"
                )
        if len({id(m) for m in members}) != len(members):
            raise ValueError(
                "Every member must be a distinct model object; the same model "
                "was passed more than once."
            )
        if output not in _OUTPUT_KINDS:
            raise ValueError(
                f"Argument `output` must be one of {_OUTPUT_KINDS}. "
                f"Received: output={output!r}"
            )
        shapes = [_member_shapes(m, i) for i, m in enumerate(members)]
        input_shapes = {tuple(s[0][1:]) for s in shapes}
        output_shapes = {tuple(s[1][1:]) for s in shapes}
        if len(input_shapes) > 1 or len(output_shapes) > 1:
            listing = "; ".join(
                f"member {i} ('{m.name}'): input {s[0]}, output {s[1]}"
                for i, (m, s) in enumerate(zip(members, shapes))
            )
            raise ValueError(
                f"All members must share input and output shapes. Received: {listing}"
            )
        for index, member in enumerate(members):
            _check_output_kind(member, index, output)
        self._members = list(members)
        self._member_output = output
        self._member_input_shape = tuple(shapes[0][0])
        self._member_output_shape = tuple(shapes[0][1])
        self._batched = bool(batched)
        # Built on first use; not tracked (it holds no variables of its own).
        object.__setattr__(self, "_plan", _UNPLANNED)
        self.built = True

    @property
    def members(self):
        """The member models, in order (a new list; the models are shared)."""
        return list(self._members)

    @property
    def num_members(self):
        """The number of members, M."""
        return len(self._members)

    @property
    def member_output(self):
        """What the members output: `"logits"` or `"probabilities"`."""
        return self._member_output

    @property
    def batched(self):
        """Whether inference runs the members as one batched program.

        True when the constructor's `batched` was True and the members'
        layers allow it (see the class docstring); False otherwise.
        """
        return self._batched_plan() is not None

    def _batched_plan(self):
        if not self._batched:
            return None
        if self._plan is _UNPLANNED:
            object.__setattr__(self, "_plan", BatchedPlan.build(self._members))
        return self._plan

    def call(self, inputs, training=False):
        plan = None if training else self._batched_plan()
        if plan is not None:
            stacked = plan.probabilities(
                inputs, self._member_output, _live_weight, axis=1
            )
            return ops.mean(stacked, axis=1)
        stacked = _stacked_probabilities(
            self._members, self._member_output, inputs, training, axis=0
        )
        return ops.mean(stacked, axis=0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(self._member_output_shape[1:])

    def member_predictions(self, x, batch_size=None, verbose=0, steps=None):
        """Each member's probabilities on `x`, as one numpy array.

        All members run in one traced graph per batch (through a `predict`
        call on a helper model that shares the members), so the cost is that
        of `ensemble.predict`.

        Args:
            x: Input data accepted by `keras.Model.predict` (numpy array,
                tensor, `tf.data.Dataset` yielding inputs or `(x, y)`,
                `keras.utils.PyDataset`).
            batch_size: Optional int, as in `predict` (default 32 for arrays).
            verbose: Verbosity passed to `predict` (default silent).
            steps: Optional number of batches, as in `predict`.

        Returns:
            A float32 numpy array of shape `(M, N, ...)`: member `m`'s
            probabilities for example `n` at `[m, n]`.
        """
        stack_model = _STACK_MODELS.get(self)
        if stack_model is None:
            stack_model = _MemberStack(
                self._members, self._member_output, self._batched_plan()
            )
            _STACK_MODELS[self] = stack_model
        per_example = stack_model.predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps
        )
        result = np.moveaxis(np.asarray(per_example), 1, 0)
        if self._member_output == "probabilities":
            _check_probabilities(result)
        return result

    def save_members(self, member_dir, overwrite=False, metadata=None):
        """Writes each member to `member_dir` as `member_<index>.kftm`.

        Args:
            member_dir: str or path-like. Created if missing.
            overwrite: bool. Whether existing member files may be replaced.
            metadata: Optional JSON-able dict stored in every member file,
                beside `member_index`, `num_members` and `output`.

        Returns:
            The list of paths written, member 0 first.
        """
        member_dir = os.fspath(member_dir)
        paths = []
        for index, member in enumerate(self._members):
            member_metadata = dict(metadata or {})
            member_metadata.update(
                member_index=index,
                num_members=len(self._members),
                output=self._member_output,
            )
            paths.append(
                members_lib.save_member(
                    member,
                    members_lib.member_path(member_dir, index),
                    metadata=member_metadata,
                    overwrite=overwrite,
                )
            )
        return paths

    def export(self, path, overwrite=False, compact=True, verbose=False):
        """Writes the ensemble as a self-contained SavedModel for TF Serving.

        Signatures: `serving_default` (input `inputs`, float32
        `[batch] + input_shape`; outputs `probabilities`, `classes`,
        `confidence`, `entropy`, `mutual_information`) and `members` (output
        `member_probabilities`, `[batch, M, C]`). Sparse kernels are stored
        compact, the write is atomic, and the result loads without Keras or
        keras_freetickets; see `keras_freetickets.export.export_ensemble`.
        This replaces `keras.Model.export` for ensembles.

        Args:
            path: str or path-like. The SavedModel folder, by convention
                `<base>/<model_name>/<version>` (integer version).
            overwrite: bool. Whether an existing `path` may be replaced.
            compact: bool. Whether sparse kernels are stored compact.
            verbose: bool. Whether to print the endpoints written.

        Returns:
            The absolute path written, as a string.

        Example:

        ```python
        ensemble.export("serving/fashion/1")
        loaded = tf.saved_model.load("serving/fashion/1")
        loaded.signatures["serving_default"](inputs=tf.zeros([2, 784]))
        ```
        """
        from keras_freetickets import export as export_lib

        return export_lib.export_ensemble(
            self, path, overwrite=overwrite, compact=compact, verbose=verbose
        )

    @classmethod
    def from_directory(cls, member_dir, output="logits", custom_objects=None, name=None):
        """Builds an ensemble from the member files of a folder.

        Args:
            member_dir: str or path-like. A folder of `member_<index>.kftm`
                files (see `keras_freetickets.members`), loaded in index order.
            output: str. What the members output, `"logits"` or
                `"probabilities"`.
            custom_objects: Optional dict of custom classes needed to rebuild
                the members.
            name: Optional str. The ensemble's name.

        Returns:
            A `FreeTicketsEnsemble`.

        Raises:
            FileNotFoundError: `member_dir` does not exist.
            ValueError: `member_dir` holds no member file, or the members do
                not share shapes.
        """
        paths = members_lib.list_members(member_dir)
        loaded = [
            members_lib.load_member(path, custom_objects=custom_objects)
            for path in paths
        ]
        return cls(loaded, output=output, name=name)

    def get_config(self):
        member_configs = []
        for member in self._members:
            member_config = keras.saving.serialize_keras_object(member)
            member_config.pop("compile_config", None)
            member_configs.append(member_config)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "members": member_configs,
            "output": self._member_output,
            "batched": self._batched,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        member_configs = config.pop("members")
        loaded = [
            keras.saving.deserialize_keras_object(c, custom_objects=custom_objects)
            for c in member_configs
        ]
        return cls(members=loaded, **config)


class _MemberStack(keras.Model):
    """Helper model: members' probabilities stacked on axis 1, (N, M, ...).

    Batch-major so that `predict` can concatenate batches. It shares the
    member objects (no copy, no variables of its own) and is never saved.
    """

    def __init__(self, member_models, member_output, plan=None):
        super().__init__(name="free_tickets_member_stack")
        # Not tracked: the members belong to the ensemble.
        object.__setattr__(self, "_member_models", list(member_models))
        object.__setattr__(self, "_kind", member_output)
        object.__setattr__(self, "_batched_plan", plan)
        self.built = True

    def call(self, inputs):
        if self._batched_plan is not None:
            return self._batched_plan.probabilities(
                inputs, self._kind, _live_weight, axis=1
            )
        return _stacked_probabilities(
            self._member_models, self._kind, inputs, training=False, axis=1
        )


def _stacked_probabilities(member_models, member_output, inputs, training, axis):
    """All members' probabilities, stacked on `axis` (0: (M, N, ...))."""
    outputs = []
    for member in member_models:
        y = ops.cast(member(inputs, training=training), "float32")
        if member_output == "logits":
            y = ops.softmax(y, axis=-1)
        outputs.append(y)
    return ops.stack(outputs, axis=axis)


def _member_shapes(member, index):
    """(input_shape, output_shape) of a built single-input, single-output model."""
    if not member.built:
        raise ValueError(
            f"Member {index} ('{member.name}') is not built: call it on data or "
            "call `model.build(input_shape)` first."
        )
    inputs = getattr(member, "inputs", None) if _has_attr(member, "inputs") else None
    if inputs:
        if len(inputs) != 1:
            raise ValueError(
                f"Every member must have one input. Member {index} "
                f"('{member.name}') has {len(inputs)}."
            )
        input_shape = tuple(inputs[0].shape)
        input_dtype = inputs[0].dtype
    else:
        build_config = member.get_build_config() or {}
        input_shape = build_config.get("input_shape")
        if input_shape is None or isinstance(input_shape, dict) or (
            isinstance(input_shape, (list, tuple))
            and input_shape
            and isinstance(input_shape[0], (list, tuple, dict))
        ):
            raise ValueError(
                f"Could not determine the single input shape of member {index} "
                f"('{member.name}'). Received build config: {build_config}"
            )
        input_shape = (None,) + tuple(input_shape)[1:]
        input_dtype = "float32"
    outputs = getattr(member, "outputs", None) if _has_attr(member, "outputs") else None
    if outputs:
        if len(outputs) != 1:
            raise ValueError(
                f"Every member must have one output. Member {index} "
                f"('{member.name}') has {len(outputs)}."
            )
        output_shape = tuple(outputs[0].shape)
    else:
        spec = member.compute_output_spec(
            keras.KerasTensor(input_shape, dtype=input_dtype)
        )
        if not hasattr(spec, "shape"):
            raise ValueError(
                f"Every member must have one output. Member {index} "
                f"('{member.name}') returns {spec}."
            )
        output_shape = tuple(spec.shape)
    if len(output_shape) < 2:
        raise ValueError(
            "Every member must output a batch of class scores, shape "
            f"(batch, ..., classes). Member {index} ('{member.name}') outputs "
            f"shape {output_shape}."
        )
    return input_shape, output_shape


def _has_attr(obj, name):
    try:
        getattr(obj, name)
        return True
    except (AttributeError, ValueError):
        return False


def _final_layer(model):
    """The layer producing a Functional/Sequential model's output, or None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    layer = None
    if outputs and len(outputs) == 1:
        history = getattr(outputs[0], "_keras_history", None)
        layer = getattr(history, "operation", None)
    if layer is None and isinstance(model, keras.Sequential) and model.layers:
        layer = model.layers[-1]
    if isinstance(layer, keras.Model) and layer is not model:
        return _final_layer(layer)
    return layer


def _final_activation(model):
    """'softmax', 'linear', another activation name, or None if unknown."""
    layer = _final_layer(model)
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    if isinstance(activation, str):
        return activation
    return getattr(activation, "__name__", None)


def _check_output_kind(member, index, output):
    activation = _final_activation(member)
    if output == "logits" and activation == "softmax":
        raise ValueError(
            f"Member {index} ('{member.name}') ends in a softmax, so it outputs "
            "probabilities, but `output='logits'` would apply a second softmax. "
            "Pass `output='probabilities'` or remove the final softmax."
        )
    if output == "probabilities" and activation == "linear":
        raise ValueError(
            f"Member {index} ('{member.name}') ends in a linear activation, so "
            "it outputs logits, but `output='probabilities'` would average them "
            "as probabilities. Pass `output='logits'` or end it in a softmax."
        )


def _check_probabilities(per_member, atol=1e-3):
    if per_member.size == 0:
        return
    sums = per_member.sum(axis=-1)
    if per_member.min() < -atol or np.max(np.abs(sums - 1.0)) > atol:
        raise ValueError(
            "With `output='probabilities'` every member output row must be "
            "non-negative and sum to 1, but the members returned rows with sums "
            f"in [{sums.min():.4g}, {sums.max():.4g}] and minimum entry "
            f"{per_member.min():.4g}. Do the members output logits? Then pass "
            "`output='logits'`."
        )


# ---------------------------------------------------------------------------
# Batched inference: the M members as one program.

_UNPLANNED = object()

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


def _live_weight(layer, name):
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
    probs = plan.probabilities(x, "logits", _live_weight, axis=1)  # [N, M, C]
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
