"""`FreeTicketsEnsemble`: a Keras model that averages its members' softmax."""

import os
import weakref

import keras
import numpy as np
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

    Args:
        members: list of built `keras.Model`s, at least one, distinct objects,
            sharing input and output shapes.
        output: str. What the members output: `"logits"` (the default; a
            softmax is applied) or `"probabilities"`.
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

    def __init__(self, members, output="logits", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
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

    def call(self, inputs, training=False):
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
            stack_model = _MemberStack(self._members, self._member_output)
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

    def __init__(self, member_models, member_output):
        super().__init__(name="free_tickets_member_stack")
        # Not tracked: the members belong to the ensemble.
        object.__setattr__(self, "_member_models", list(member_models))
        object.__setattr__(self, "_kind", member_output)
        self.built = True

    def call(self, inputs):
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
