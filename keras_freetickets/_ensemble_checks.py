"""Checks of an ensemble's members: shapes and what they output."""

import keras
import numpy as np

from keras_freetickets import _keras_compat as compat


def _single_tensor(member, index, attribute):
    """The one symbolic input or output (`attribute` "inputs" or "outputs")
    of a member, or None where the model has no symbolic ones."""
    tensors = (
        getattr(member, attribute, None) if _has_attr(member, attribute) else None
    )
    if not tensors:
        return None
    if len(tensors) != 1:
        raise ValueError(
            f"Every member must have one {attribute[:-1]}. Member {index} "
            f"('{member.name}') has {len(tensors)}."
        )
    return tensors[0]


def member_shapes(member, index):
    """(input_shape, output_shape) of a built single-input, single-output model."""
    if not member.built:
        raise ValueError(
            f"Member {index} ('{member.name}') is not built: call it on data or "
            "call `model.build(input_shape)` first."
        )
    tensor = _single_tensor(member, index, "inputs")
    if tensor is not None:
        input_shape = tuple(tensor.shape)
        input_dtype = tensor.dtype
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
    tensor = _single_tensor(member, index, "outputs")
    if tensor is not None:
        output_shape = tuple(tensor.shape)
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
        layer = compat.producing_operation(outputs[0])
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


def check_output_kind(member, index, output):
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


def check_probabilities(per_member, atol=1e-3):
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
