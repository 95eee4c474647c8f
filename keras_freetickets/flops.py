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

The layers and kernels counted are those of `prunable.kernel_roles`. Every
other layer counts 0: biases, activations, normalization, pooling and
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

from keras_freetickets import prunable
from keras_freetickets._flops_trace import (
    densities_from,
    kernel_positions,
    trace_calls,
)
from keras_freetickets._validation import check_int
from keras_freetickets._validation import check_number
from keras_freetickets._validation import check_one_of

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
    sublayers, records = trace_calls(model, input_shape)
    density_of = densities_from(model, densities, masks)
    positions = {}
    order = []
    for layer, in_shape, out_shape in records:
        if in_shape is None or out_shape is None:
            raise ValueError(
                f"Layer {layer.name!r} ran on a tensor of unknown shape "
                f"(input {in_shape}, output {out_shape}); FLOPs need static "
                "shapes."
            )
        for attribute, kind in prunable.kernel_roles(layer):
            key = (id(layer), attribute)
            if key not in positions:
                positions[key] = 0
                order.append((layer, attribute))
            positions[key] += kernel_positions(layer, kind, in_shape, out_shape)
    for layer in sublayers:  # layers the forward pass never called
        for attribute, _ in prunable.kernel_roles(layer):
            if (id(layer), attribute) not in positions:
                positions[(id(layer), attribute)] = 0
                order.append((layer, attribute))
    rows = []
    for layer, attribute in order:
        variable = prunable.kernel_variable(layer, attribute)
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
    check_number("f_sparse", f_sparse, 0)
    check_number("f_dense", f_dense, 0)
    if f_sparse > f_dense * (1 + 1e-12):
        raise ValueError(
            "Argument `f_sparse` must not exceed `f_dense`. "
            f"Received: f_sparse={f_sparse}, f_dense={f_dense}"
        )
    check_int("num_steps", num_steps, 0)
    check_int("num_update_steps", num_update_steps, 0)
    if num_update_steps > num_steps:
        raise ValueError(
            "Argument `num_update_steps` must not exceed `num_steps`. "
            f"Received: num_update_steps={num_update_steps}, "
            f"num_steps={num_steps}"
        )
    check_int("batch_size", batch_size, 1)
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
    check_one_of("method", method, METHODS)
    check_int("num_members", num_members, 1)
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
