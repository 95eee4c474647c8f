"""FLOPs accounting for sparse models and ensembles (RigL's convention).

Forward FLOPs are counted per example, 2 per multiply-add, for the layers
whose kernels do the work, scaled by the density of each kernel:

- `Dense`: `2 * in * out * positions` (positions: the product of the input's
  dimensions other than the last, 1 for a plain vector input).
- `EinsumDense`: 2 per term of the einsum, i.e. `2 * prod(kernel.shape)`
  times the sizes of the input dimensions the kernel does not contract.
- `Conv1D/2D/3D`, grouped or not: `2 * prod(kernel.shape) * prod(output
  spatial dims)`; the kernel holds `c_in / groups` input channels, so grouped
  convolutions are divided by the number of groups.
- `DepthwiseConv1D/2D`: `2 * k * c_in * depth_multiplier * prod(output spatial
  dims)`.
- `SeparableConv1D/2D`: the depthwise and the pointwise part, each with its own
  kernel and density, both over the output's spatial dims.
- `Conv1D/2D/3DTranspose`: `2 * prod(kernel.shape) * prod(input spatial dims)`.

Every other layer counts 0: biases, activations, normalization, pooling and
embedding lookups are ignored, as in RigL's accounting, and so are recurrent
layers and custom layers. The shapes are found by one forward pass on zeros
(batch 1) with each layer's `call` wrapped to record its input and output, so
Sequential, Functional, nested and subclassed models all work and a shared
layer counts once per call. Sequential and Functional models use their own
input shapes; a subclassed model (or one with unknown dimensions) needs
`input_shape`.

Training FLOPs follow BENCHMARK.md: an ordinary sparse step costs `3 f_S` per
example (forward `f_S`, backward `2 f_S`), a mask-update step `2 f_S + f_D`
(the dense gradient replaces the sparse weight-gradient pass), a dense step
`3 f_D`.
"""

import math

import numpy as np

__all__ = [
    "METHODS",
    "dense_forward_flops",
    "ensemble_training_flops",
    "forward_flops",
    "inference_flops",
    "layer_flops",
    "relative_training_flops",
    "training_flops",
]

METHODS = ("dense", "dense_ensemble", "dst", "dst_ensemble", "edst")


def _kernel_roles(layer):
    """[(attribute, kind)] for a counted layer, or [] for one that is not."""
    import keras

    layers = keras.layers
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return [("depthwise_kernel", "conv"), ("pointwise_kernel", "conv")]
    if isinstance(
        layer,
        (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose),
    ):
        return [("kernel", "transpose")]
    if isinstance(
        layer,
        (
            layers.Conv1D,
            layers.Conv2D,
            layers.Conv3D,
            layers.DepthwiseConv1D,
            layers.DepthwiseConv2D,
        ),
    ):
        return [("kernel", "conv")]
    if isinstance(layer, layers.EinsumDense):
        return [("kernel", "einsum")]
    if isinstance(layer, layers.Dense):
        return [("kernel", "dense")]
    return []


def _variable(layer, attribute):
    import keras

    # Dense, EinsumDense and Conv keep the variable in `_kernel` and expose
    # `kernel` as a property (which adds LoRA terms when enabled).
    for name in ("_" + attribute, attribute):
        value = getattr(layer, name, None)
        if isinstance(value, keras.Variable):
            return value
    return None


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


def _positions(layer, kind, input_shape, output_shape):
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
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None and model_inputs and len(model_inputs) == len(arrays):
        flat = iter(arrays)
        return keras.tree.map_structure(lambda _: next(flat), struct)
    return arrays[0] if len(arrays) == 1 else arrays


def _trace_calls(model, input_shape):
    """Runs the model once; returns [(layer, input_shape, output_shape)]."""
    inputs = _zeros_inputs(model, input_shape)
    sublayers = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if _kernel_roles(layer)
    ]
    if not all(
        layer.built for layer in model._flatten_layers(include_self=True)
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


def _densities_from(model, densities, masks):
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
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not 0.0 <= float(value) <= 1.0
            ):
                raise ValueError(
                    "Argument `densities` must map to values in [0, 1]. "
                    f"Received: densities[{path!r}]={value!r}"
                )
            result[path] = float(value)
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


def layer_flops(model, densities=None, input_shape=None, masks=None):
    """Forward FLOPs per example of each counted kernel of a model.

    See the module docstring for what is counted. The model is run once on
    zeros (batch 1) to find the shapes.

    Args:
        model: a Keras model (Sequential, Functional, nested or subclassed) or
            a layer.
        densities: optional dict. Variable path (`variable.path`, e.g.
            `"sequential/dense/kernel"`, or a suffix of whole components such
            as `"dense/kernel"`) -> density in [0, 1]. Missing kernels are
            dense.
        input_shape: optional tuple of ints, the shape of one example without
            the batch dimension (or a list of them for several inputs).
            Needed for subclassed models.
        masks: optional dict. Variable path -> 0/1 array (or variable) of the
            kernel's shape; the density is its mean. Not with `densities`.

    Returns:
        list of dicts, in the order of the forward pass, one per kernel:
        `{"layer", "class", "variable", "dense_flops", "flops", "density"}`.

    Example:

    ```python
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(300), keras.layers.Dense(10)]
    )
    rows = layer_flops(model, densities={"dense/kernel": 0.5})
    # rows[0]["flops"] == 0.5 * 2 * 784 * 300
    ```
    """
    sublayers, records = _trace_calls(model, input_shape)
    density_of = _densities_from(model, densities, masks)
    positions = {}
    order = []
    for layer, in_shape, out_shape in records:
        if in_shape is None or out_shape is None:
            raise ValueError(
                f"Layer {layer.name!r} ran on a tensor of unknown shape "
                f"(input {in_shape}, output {out_shape}); FLOPs need static "
                "shapes."
            )
        for attribute, kind in _kernel_roles(layer):
            key = (id(layer), attribute)
            if key not in positions:
                positions[key] = 0
                order.append((layer, attribute))
            positions[key] += _positions(layer, kind, in_shape, out_shape)
    for layer in sublayers:  # layers the forward pass never called
        for attribute, _ in _kernel_roles(layer):
            if (id(layer), attribute) not in positions:
                positions[(id(layer), attribute)] = 0
                order.append((layer, attribute))
    rows = []
    for layer, attribute in order:
        variable = _variable(layer, attribute)
        if variable is None:
            continue
        dense = 2 * math.prod(variable.shape) * positions[(id(layer), attribute)]
        density = density_of.get(variable.path, 1.0)
        rows.append(
            {
                "layer": layer.name,
                "class": type(layer).__name__,
                "variable": variable.path,
                "dense_flops": int(dense),
                "flops": float(dense) * density,
                "density": density,
            }
        )
    return rows


def forward_flops(model, densities=None, input_shape=None, masks=None):
    """Forward FLOPs per example of a (sparse) model: the sum of `layer_flops`.

    Args:
        model: a Keras model or layer.
        densities: optional dict. Variable path -> density in [0, 1].
        input_shape: optional tuple, one example's shape (no batch dim).
        masks: optional dict. Variable path -> 0/1 array.

    Returns:
        float.

    Example:

    ```python
    f_sparse = forward_flops(model, densities=optimizer_densities)
    ```
    """
    rows = layer_flops(model, densities, input_shape=input_shape, masks=masks)
    return float(sum(row["flops"] for row in rows))


def dense_forward_flops(model, input_shape=None):
    """Forward FLOPs per example of the dense model (every density 1).

    Args:
        model: a Keras model or layer.
        input_shape: optional tuple, one example's shape (no batch dim).

    Returns:
        int.
    """
    rows = layer_flops(model, input_shape=input_shape)
    return int(sum(row["dense_flops"] for row in rows))


def _check_nonneg_number(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"Argument `{name}` must be a finite number >= 0. "
            f"Received: {name}={value!r}"
        )


def _check_count(value, name, minimum=0):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"Argument `{name}` must be an int >= {minimum}. "
            f"Received: {name}={value!r}"
        )


def training_flops(f_sparse, f_dense, num_steps, num_update_steps, batch_size):
    """Total training FLOPs of one run under RigL's accounting.

    Per example, an ordinary step costs `3 * f_sparse` and a mask-update step
    `2 * f_sparse + f_dense`. For a dense run pass `f_sparse == f_dense` and
    `num_update_steps=0` (the result is then `3 * f_dense` per example and
    step either way).

    Args:
        f_sparse: float >= 0. Forward FLOPs per example at the sparse density
            (`forward_flops(model, densities)`).
        f_dense: float >= f_sparse. Forward FLOPs per example when dense.
        num_steps: int >= 0. Training steps, mask-update steps included.
        num_update_steps: int in [0, num_steps]. Steps that update the masks.
        batch_size: int >= 1.

    Returns:
        float. Total FLOPs.

    Example:

    >>> training_flops(20.0, 100.0, num_steps=10, num_update_steps=1,
    ...                batch_size=2)
    1360.0
    """
    _check_nonneg_number(f_sparse, "f_sparse")
    _check_nonneg_number(f_dense, "f_dense")
    if f_sparse > f_dense * (1 + 1e-12):
        raise ValueError(
            "Argument `f_sparse` must not exceed `f_dense`. "
            f"Received: f_sparse={f_sparse}, f_dense={f_dense}"
        )
    _check_count(num_steps, "num_steps")
    _check_count(num_update_steps, "num_update_steps")
    if num_update_steps > num_steps:
        raise ValueError(
            "Argument `num_update_steps` must not exceed `num_steps`. "
            f"Received: num_update_steps={num_update_steps}, "
            f"num_steps={num_steps}"
        )
    _check_count(batch_size, "batch_size", minimum=1)
    ordinary = (num_steps - num_update_steps) * 3.0 * f_sparse
    updates = num_update_steps * (2.0 * f_sparse + f_dense)
    return float(batch_size * (ordinary + updates))


def ensemble_training_flops(
    method,
    f_dense,
    f_sparse=None,
    steps=0,
    update_steps=0,
    batch_size=1,
    num_members=1,
):
    """Total training FLOPs of a method of the FreeTickets benchmark.

    - `"dense"`: one dense run of `steps` steps.
    - `"dense_ensemble"`: `num_members` dense runs.
    - `"dst"`: one sparse run.
    - `"dst_ensemble"`: `num_members` independent sparse runs.
    - `"edst"`: ONE sparse run; `steps` is the whole EDST run (exploration and
      every refinement phase) and `update_steps` counts the local mask updates
      plus the global explorations between members. `num_members` is unused.

    Args:
        method: str, one of `METHODS`.
        f_dense: float. Dense forward FLOPs per example.
        f_sparse: float. Sparse forward FLOPs per example (for the sparse
            methods).
        steps: int. Training steps of one run.
        update_steps: int. Mask-update steps of one run (sparse methods).
        batch_size: int.
        num_members: int >= 1. Ensemble size.

    Returns:
        float. Total FLOPs.

    Example:

    >>> ensemble_training_flops("dense_ensemble", 100.0, steps=10,
    ...                         batch_size=1, num_members=3)
    9000.0
    """
    if method not in METHODS:
        raise ValueError(
            f"Argument `method` must be one of {list(METHODS)}. "
            f"Received: method={method!r}"
        )
    _check_count(num_members, "num_members", minimum=1)
    if method in ("dense", "dense_ensemble"):
        one = training_flops(f_dense, f_dense, steps, 0, batch_size)
        return one * (num_members if method == "dense_ensemble" else 1)
    if f_sparse is None:
        raise ValueError(
            f"Method {method!r} needs `f_sparse`. Received: f_sparse=None"
        )
    one = training_flops(f_sparse, f_dense, steps, update_steps, batch_size)
    return one * (num_members if method == "dst_ensemble" else 1)


def relative_training_flops(
    method,
    f_dense,
    f_sparse=None,
    steps=0,
    update_steps=0,
    batch_size=1,
    num_members=1,
    dense_steps=None,
):
    """Training FLOPs of a method divided by those of one dense run.

    Args:
        method, f_dense, f_sparse, steps, update_steps, batch_size,
            num_members: as in `ensemble_training_flops`.
        dense_steps: optional int. Steps of the single dense reference run,
            when they differ from `steps` (EDST trains longer than one dense
            run). Defaults to `steps`.

    Returns:
        float.

    Example:

    >>> relative_training_flops("dst", 100.0, 20.0, steps=100,
    ...                         update_steps=0)
    0.2
    """
    dense_steps = steps if dense_steps is None else dense_steps
    total = ensemble_training_flops(
        method, f_dense, f_sparse, steps, update_steps, batch_size, num_members
    )
    reference = training_flops(f_dense, f_dense, dense_steps, 0, batch_size)
    if reference <= 0:
        raise ValueError(
            "The dense reference run has no FLOPs: `f_dense` and "
            f"`dense_steps` must be > 0. Received: f_dense={f_dense}, "
            f"dense_steps={dense_steps}"
        )
    return total / reference


def inference_flops(model_or_members, densities_per_member=None, input_shape=None):
    """Forward FLOPs per example of an ensemble: the sum over its members.

    Args:
        model_or_members: a Keras model, or a list of models (one per
            member). A single model with a list in `densities_per_member`
            stands for members that share its architecture (EDST members).
        densities_per_member: optional list of density dicts (or None for a
            dense member), one per member; or one dict for a single model.
        input_shape: optional tuple, one example's shape (no batch dim).

    Returns:
        float.

    Example:

    ```python
    total = inference_flops(model, [member_0_densities, member_1_densities])
    ```
    """
    if isinstance(model_or_members, (list, tuple)):
        members = list(model_or_members)
        if densities_per_member is None:
            densities_per_member = [None] * len(members)
        elif hasattr(densities_per_member, "items"):
            densities_per_member = [densities_per_member] * len(members)
    else:
        if densities_per_member is None or hasattr(
            densities_per_member, "items"
        ):
            densities_per_member = [densities_per_member]
        members = [model_or_members] * len(densities_per_member)
    densities_per_member = list(densities_per_member)
    if not members or len(members) != len(densities_per_member):
        raise ValueError(
            "Argument `densities_per_member` must have one entry per member. "
            f"Received: {len(members)} members and "
            f"{len(densities_per_member)} density dicts"
        )
    return float(
        sum(
            forward_flops(member, densities, input_shape=input_shape)
            for member, densities in zip(members, densities_per_member)
        )
    )
