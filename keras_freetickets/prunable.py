"""Which weights of a model may be pruned.

Keras 3 variables carry no reference to the layer that owns them, and an
optimizer only ever sees variables. So a weight is prunable when either

1. it was marked explicitly with `mark_prunable` (the hook for custom layers;
   `mark_not_prunable` opts a weight out), or
2. its name is a registered prunable weight name and it has rank >= 2.

The built-in names cover the kernels of `Dense`, `EinsumDense`,
`Conv1D/2D/3D`, `Conv1D/2D/3DTranspose`, `DepthwiseConv1D/2D` (`kernel`) and
`SeparableConv1D/2D` (`depthwise_kernel`, `pointwise_kernel`). `Embedding`
tables (`embeddings`) are prunable on request only. Biases, normalization
scales and every other 1-D variable are never pruned, whatever their name.

Which weights of which built-in layer are sparse kernels, and what kind of
product each one computes, is written once, in `kernel_roles` (with
`kernel_variable` to read them): FLOPs accounting asks it, and the built-in
prunable names come from it.
"""

# Built-in layers with sparse kernels: (layer class names, ((attribute, kind),
# ...)). Checked in this order; the classes' hierarchies are disjoint.
_KERNEL_ROLES = (
    (
        ("SeparableConv1D", "SeparableConv2D"),
        (("depthwise_kernel", "conv"), ("pointwise_kernel", "conv")),
    ),
    (
        ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"),
        (("kernel", "transpose"),),
    ),
    (
        ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D"),
        (("kernel", "conv"),),
    ),
    (("EinsumDense",), (("kernel", "einsum"),)),
    (("Dense",), (("kernel", "dense"),)),
)
KERNEL_KINDS = ("dense", "einsum", "conv", "transpose")

_PRUNABLE_NAMES = {
    attribute for _, roles in _KERNEL_ROLES for attribute, _ in roles
}
_EMBEDDING_NAMES = {"embeddings"}
_MARK_ATTR = "_kft_prunable"


def register_prunable_name(name, embedding=False):
    """Registers a weight name whose rank >= 2 variables are prunable.

    Args:
        name: str. The variable's own name (the last part of its path), for
            example `"w"` for a custom layer that creates
            `self.add_weight(name="w", ...)`.
        embedding: bool. If True, the name is treated like an embedding table:
            pruned only when the optimizer is built with
            `include_embeddings=True`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Argument `name` must be a non-empty string. Received: name={name!r}"
        )
    (_EMBEDDING_NAMES if embedding else _PRUNABLE_NAMES).add(name)


def mark_prunable(*variables):
    """Marks variables as prunable, whatever their name.

    Call it from a custom layer's `build()` after creating the weight:

    ```python
    class MyLayer(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 8), name="w")
            kft.mark_prunable(self.w)
    ```

    Args:
        *variables: `keras.Variable`s of rank >= 2.
    """
    for variable in variables:
        if len(variable.shape) < 2:
            raise ValueError(
                "Only weights of rank >= 2 can be pruned. Received: "
                f"variable={variable.path} with shape={tuple(variable.shape)}"
            )
        setattr(variable, _MARK_ATTR, True)


def mark_not_prunable(*variables):
    """Excludes variables from pruning, whatever their name."""
    for variable in variables:
        setattr(variable, _MARK_ATTR, False)


def is_prunable(variable, include_embeddings=False):
    """Returns whether `variable` may be pruned (see the module docstring)."""
    if not getattr(variable, "trainable", True):
        return False
    shape = tuple(variable.shape)
    mark = getattr(variable, _MARK_ATTR, None)
    if mark is not None:
        return bool(mark) and len(shape) >= 2
    if len(shape) < 2:
        return False
    name = variable.name.split("/")[-1].split(":")[0]
    if name in _PRUNABLE_NAMES:
        return True
    return include_embeddings and name in _EMBEDDING_NAMES


def prunable_variables(variables, include_embeddings=False):
    """Filters a list of variables down to the prunable ones, keeping order."""
    return [v for v in variables if is_prunable(v, include_embeddings)]


def matches(key, path):
    """Whether an override `key` names the variable at `path`.

    A key matches the full variable path (`"sequential/dense/kernel"`), a
    suffix of it made of whole components (`"dense/kernel"`), the name of any
    layer on the path (`"dense"`), or a longer path that ends with the
    variable's path (a model rebuilt from a file loses its name prefix).
    """
    parts = path.split("/")
    if key == path or path.endswith("/" + key):
        return True
    # Keras drops the model's name from variable paths when it rebuilds a
    # saved model: a key saved as "mlp/dense/kernel" must still name
    # "dense/kernel".
    if "/" in path and key.endswith("/" + path):
        return True
    return key in parts[:-1]


def kernel_roles(layer):
    """Returns the sparse kernels of a built-in layer and the product each computes.

    This is the one place that knows which weights of which Keras layer are
    the kernels that dynamic sparse training prunes. The kind says how a
    kernel is applied, which is what FLOPs accounting and compact export
    need:

    - `"dense"`: `Dense`, a matrix product over the input's last axis.
    - `"einsum"`: `EinsumDense`, the layer's einsum equation.
    - `"conv"`: `Conv1D/2D/3D` (grouped or not), `DepthwiseConv1D/2D`, and
      both kernels of `SeparableConv1D/2D`, applied at every output position.
    - `"transpose"`: `Conv1D/2D/3DTranspose`, applied at every input position.

    Any other layer (embeddings, normalization, recurrent and custom layers)
    has no roles, even if some of its weights are prunable by name or mark.

    Args:
        layer: a `keras.layers.Layer`.

    Returns:
        A list of `(attribute, kind)` pairs, for example
        `[("depthwise_kernel", "conv"), ("pointwise_kernel", "conv")]` for a
        `SeparableConv2D`, or `[]`. `attribute` names the weight on the layer
        (read it with `kernel_variable`), `kind` is one of `KERNEL_KINDS`.

    Example:

    ```python
    layer = keras.layers.Dense(10)
    prunable.kernel_roles(layer)  # [("kernel", "dense")]
    ```
    """
    import keras

    for class_names, roles in _KERNEL_ROLES:
        classes = tuple(getattr(keras.layers, name) for name in class_names)
        if isinstance(layer, classes):
            return list(roles)
    return []


def kernel_variable(layer, attribute):
    """Returns the `keras.Variable` a layer holds as `attribute`, or None.

    `Dense`, `EinsumDense` and the convolutions keep the kernel variable in
    `_kernel` and expose `kernel` as a property (which adds the LoRA terms
    when LoRA is enabled), so the variable itself is looked up first.

    Args:
        layer: a `keras.layers.Layer`.
        attribute: str, an attribute named by `kernel_roles(layer)`.

    Returns:
        The `keras.Variable`, or None when the layer holds none there (for
        example a layer that is not built yet).
    """
    import keras

    from keras_freetickets import _keras_compat as compat

    stored = compat.kernel_variable(layer, attribute)
    if stored is not None:
        return stored
    value = getattr(layer, attribute, None)
    return value if isinstance(value, keras.Variable) else None
