"""What FLOPs counting reads from a model: shapes, positions and densities.

`trace_calls` runs the model once on zeros (batch 1) with the `call` of each
layer that has sparse kernels (`prunable.kernel_roles`) wrapped to record its
input and output shapes; `kernel_positions` turns those shapes into the number
of positions at which a kernel is applied; `densities_from` resolves the
`densities` or `masks` argument of `flops.layer_flops` to one density per
variable path. The counting convention itself is described in `flops`.
"""

import math

import numpy as np

from keras_freetickets import _keras_compat as compat
from keras_freetickets import prunable
from keras_freetickets._validation import check_fraction


def _spatial(shape, data_format):
    # shape includes the batch dimension, which is 1 in the traced call (or
    # the folded batch * time of a TimeDistributed wrapper); keep it.
    if data_format == "channels_first":
        return math.prod(shape[:1]) * math.prod(shape[2:])
    return math.prod(shape[:-1])


def _einsum_positions(equation, input_shape):
    """Product of the input dimensions that the kernel does not contract."""
    lhs = equation.split("->")[0]
    input_spec, kernel_spec = lhs.split(",")
    kernel_letters = set(kernel_spec.replace(".", ""))
    if "..." in input_spec:
        head, tail = input_spec.split("...")
        n_ellipsis = len(input_shape) - len(head) - len(tail)
        letters = list(head) + [None] * n_ellipsis + list(tail)
    else:
        letters = list(input_spec)
    positions = 1
    for letter, size in zip(letters, input_shape):
        if letter is None or letter not in kernel_letters:
            positions *= size
    return positions


def kernel_positions(layer, kind, input_shape, output_shape):
    """Number of positions at which a kernel of `kind` is applied in one call."""
    if kind == "dense":
        return math.prod(input_shape[:-1])
    if kind == "einsum":
        return _einsum_positions(layer.equation, input_shape)
    data_format = getattr(layer, "data_format", "channels_last")
    if kind == "transpose":
        return _spatial(input_shape, data_format)
    return _spatial(output_shape, data_format)


def _shape_of(x):
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    shape = tuple(shape)
    if any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _zeros_inputs(model, input_shape):
    """Batch-1 zero inputs for `model`, from `input_shape` or model.inputs."""
    import keras

    model_inputs = None
    try:
        model_inputs = model.inputs
    except (AttributeError, ValueError):
        model_inputs = None
    if input_shape is None:
        if not model_inputs:
            raise ValueError(
                f"Cannot tell the input shape of model {model.name!r} (a "
                "subclassed or unbuilt model). Pass `input_shape`, the shape "
                "of one example without the batch dimension, for example "
                "input_shape=(28, 28, 1)."
            )
        shapes = []
        for tensor in model_inputs:
            shape = tuple(tensor.shape)[1:]
            if any(d is None for d in shape):
                raise ValueError(
                    f"The input {tensor.name!r} of model {model.name!r} has "
                    f"unknown dimensions {tuple(tensor.shape)}. Pass "
                    "`input_shape` (without the batch dimension)."
                )
            shapes.append(shape)
    else:
        if all(isinstance(d, (int, np.integer)) for d in input_shape):
            shapes = [tuple(int(d) for d in input_shape)]
        else:
            shapes = [tuple(int(d) for d in s) for s in input_shape]
    dtypes = ["float32"] * len(shapes)
    if model_inputs and len(model_inputs) == len(shapes):
        dtypes = [str(getattr(t, "dtype", "float32")) for t in model_inputs]
    arrays = [np.zeros((1,) + s, dtype=d) for s, d in zip(shapes, dtypes)]
    struct = compat.inputs_struct(model)
    if struct is not None and model_inputs and len(model_inputs) == len(arrays):
        flat = iter(arrays)
        return keras.tree.map_structure(lambda _: next(flat), struct)
    return arrays[0] if len(arrays) == 1 else arrays


def trace_calls(model, input_shape):
    """Runs the model once; returns (the layers with sparse kernels, their
    calls as [(layer, input_shape, output_shape)])."""
    inputs = _zeros_inputs(model, input_shape)
    sublayers = [
        layer
        for layer in compat.flatten_layers(model)
        if prunable.kernel_roles(layer)
    ]
    if not all(
        layer.built for layer in compat.flatten_layers(model)
    ):
        # Building a subclassed model may trace `call` once more; do it
        # before recording.
        model(inputs, training=False)
    records = []

    def wrap(layer, original):
        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            x = args[0] if args else kwargs.get("inputs")
            records.append((layer, _shape_of(x), _shape_of(outputs)))
            return outputs

        return call

    wrapped = []
    try:
        for layer in sublayers:
            object.__setattr__(layer, "call", wrap(layer, layer.call))
            wrapped.append(layer)
        model(inputs, training=False)
    finally:
        for layer in wrapped:
            object.__delattr__(layer, "call")
    return sublayers, records


def _match(mapping, paths, argument):
    """Resolves keys (full variable paths or whole-component suffixes)."""
    resolved = {}
    for key, value in mapping.items():
        if key in paths:
            resolved.setdefault(key, value)
            continue
        hits = [p for p in paths if p.endswith("/" + key)]
        if not hits:
            raise ValueError(
                f"Argument `{argument}` names {key!r}, which is no variable of "
                f"the model. Variables: {sorted(paths)}"
            )
        for path in hits:
            if path not in mapping:
                resolved.setdefault(path, value)
    return resolved


def densities_from(model, densities, masks):
    """{variable path: density} from `densities` or `masks` (not both)."""
    import keras

    if densities is not None and masks is not None:
        raise ValueError(
            "Pass either `densities` or `masks`, not both. Received: "
            f"densities={densities!r}, masks={list(masks)}"
        )
    paths = {v.path: v for v in model.variables}
    result = {}
    if densities is not None:
        for path, value in _match(densities, paths, "densities").items():
            result[path] = check_fraction(f"densities[{path!r}]", value, "[0, 1]")
    if masks is not None:
        for path, mask in _match(masks, paths, "masks").items():
            array = np.asarray(keras.ops.convert_to_numpy(mask), dtype=np.float64)
            if array.shape != tuple(paths[path].shape):
                raise ValueError(
                    f"The mask for {path!r} has shape {array.shape}, but the "
                    f"variable has shape {tuple(paths[path].shape)}."
                )
            if array.size and (array.min() < 0.0 or array.max() > 1.0):
                raise ValueError(
                    f"Argument `masks` must hold values in [0, 1]. Received: "
                    f"masks[{path!r}] with values in [{array.min()}, "
                    f"{array.max()}]"
                )
            result[path] = float(array.mean()) if array.size else 1.0
    return result
