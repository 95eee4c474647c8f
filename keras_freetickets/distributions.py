"""Per-layer sparsity distributions.

A distribution turns the shapes of the prunable weights and one global
sparsity target `S` into one sparsity per weight. The functions here are pure
(numpy only, no framework state): `shapes` is an ordered mapping from a
variable path (for example `"dense_1/kernel"`) to its shape, and the result
maps the same paths to sparsities in [0, 1).

- `"uniform"`: every layer gets `S`.
- `"er"` (Erdos-Renyi, Mocanu et al. 2018): the density of a layer is
  proportional to `(n_in + n_out) / (n_in * n_out)`, with `n_in, n_out` the
  last two dimensions of its shape (for a conv kernel `(k_h, k_w, c_in, c_out)`
  that is `(c_in + c_out) / (c_in * c_out)`).
- `"erk"` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL): the density is
  proportional to `sum(shape) / prod(shape)`, so the kernel's spatial size
  counts too. For 2-D weights ER and ERK agree.

ER and ERK scale their raw scores by one factor `eps` chosen so that the
number of active weights over all prunable weights equals `(1 - S) * N`
(`N` the total number of prunable weights). A layer whose density would
exceed 1 is made dense and `eps` is solved again for the rest, as in RigL.
Layers named in `overrides` keep their given sparsity and the other layers
make up for them, so that the global target still holds.
"""

import math

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int
from keras_freetickets._validation import check_number
from keras_freetickets._validation import is_number

__all__ = [
    "active_count",
    "compute_sparsities",
    "erdos_renyi",
    "erdos_renyi_kernel",
    "get",
    "register",
    "resolve_counts",
    "uniform",
]


def _check_shapes(shapes):
    if not hasattr(shapes, "items"):
        raise ValueError(
            "Argument `shapes` must be a dict mapping variable paths to shapes. "
            f"Received: shapes={shapes!r}"
        )
    if not shapes:
        raise ValueError(
            "There are no prunable weights: argument `shapes` is empty. "
            f"Received: shapes={shapes!r}"
        )
    checked = {}
    for name, shape in shapes.items():
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            dims = None
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(
                "Argument `shapes` must map each name to a non-empty tuple of "
                f"positive ints. Received: shapes[{name!r}]={shape!r}"
            )
        checked[name] = dims
    return checked


def _check_overrides(overrides, shapes):
    if overrides is None:
        return {}
    if not hasattr(overrides, "items"):
        raise ValueError(
            "Argument `overrides` must be a dict mapping variable paths to "
            f"sparsities. Received: overrides={overrides!r}"
        )
    checked = {}
    for name, value in overrides.items():
        if name not in shapes:
            raise ValueError(
                f"Argument `overrides` names {name!r}, which is not one of the "
                f"prunable weights {list(shapes)}. "
                f"Received: overrides={overrides!r}"
            )
        checked[name] = check_fraction(f"overrides[{name!r}]", value, "[0, 1)")
    return checked


def _check_all(shapes, sparsity, overrides):
    sparsity = check_fraction("sparsity", sparsity, "[0, 1)")
    shapes = _check_shapes(shapes)
    overrides = _check_overrides(overrides, shapes)
    return shapes, sparsity, overrides


def uniform(shapes, sparsity, overrides=None):
    """Gives every prunable weight the same sparsity.

    Layers named in `overrides` get their own value; the others get
    `sparsity` (they do not make up for the overrides).

    Args:
        shapes: dict. Variable path -> shape (tuple of ints), in model order.
        sparsity: float in [0, 1). The sparsity of each layer.
        overrides: optional dict. Variable path -> sparsity in [0, 1).

    Returns:
        dict. Variable path -> sparsity, in the order of `shapes`.

    Example:

    >>> uniform({"d1/kernel": (784, 300), "d2/kernel": (300, 10)}, 0.8)
    {'d1/kernel': 0.8, 'd2/kernel': 0.8}
    """
    shapes, sparsity, overrides = _check_all(shapes, sparsity, overrides)
    return {name: overrides.get(name, sparsity) for name in shapes}


def _er_score(shape):
    if len(shape) < 2:
        raise ValueError(
            "The 'er' distribution needs weights of rank >= 2 (it uses the "
            f"last two dimensions). Received: shape={shape}"
        )
    n_in, n_out = shape[-2], shape[-1]
    return (n_in + n_out) / (n_in * n_out)


def _solve_global(shapes, sparsity, overrides, scores):
    """RigL's loop: densities eps * score, fitting the global budget."""
    if sparsity == 0.0:
        return {name: overrides.get(name, 0.0) for name in shapes}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = float(sum(sizes.values()))
    free = [name for name in shapes if name not in overrides]
    if not free:
        # Every weight has its own sparsity: the global target has no layer
        # left to act on.
        return dict(overrides)
    budget = (1.0 - sparsity) * total - sum(
        (1.0 - overrides[name]) * sizes[name] for name in overrides
    )
    free_size = float(sum(sizes[name] for name in free))
    tolerance = 1e-9 * total
    if budget <= tolerance:
        raise ValueError(
            f"The global sparsity {sparsity} cannot be reached: the "
            f"overridden layers {sorted(overrides)} already hold "
            f"{(1.0 - sparsity) * total - budget:.0f} active weights, while "
            f"the target allows {(1.0 - sparsity) * total:.0f} in total. "
            "Lower their density (raise their sparsity) or lower `sparsity`. "
            f"Received: sparsity={sparsity}, overrides={overrides}"
        )
    if budget > free_size + tolerance:
        raise ValueError(
            f"The global sparsity {sparsity} cannot be reached: the "
            f"overridden layers {sorted(overrides)} are so sparse that the "
            f"other layers would need {budget:.0f} active weights but only "
            f"have {free_size:.0f}. Lower their sparsity or raise `sparsity`. "
            f"Received: sparsity={sparsity}, overrides={overrides}"
        )
    dense = set()
    while True:
        sparse = [name for name in free if name not in dense]
        remaining = budget - sum(sizes[name] for name in dense)
        if not sparse or remaining >= float(
            sum(sizes[name] for name in sparse)
        ) - tolerance:
            # Everything left fits only when dense.
            dense.update(sparse)
            eps = 0.0
            break
        divisor = sum(scores[name] * sizes[name] for name in sparse)
        eps = remaining / divisor
        worst = max(sparse, key=lambda name: scores[name])
        if eps * scores[worst] > 1.0:
            dense.add(worst)
            continue
        break
    result = {}
    for name in shapes:
        if name in overrides:
            result[name] = overrides[name]
        elif name in dense:
            result[name] = 0.0
        else:
            result[name] = min(max(1.0 - eps * scores[name], 0.0), 1.0)
            if result[name] >= 1.0:
                raise ValueError(
                    f"The weight {name!r} with shape {shapes[name]} would get "
                    "no active weight at all. Lower `sparsity`. "
                    f"Received: sparsity={sparsity}"
                )
    return result


def erdos_renyi(shapes, sparsity, overrides=None):
    """Erdos-Renyi (ER) sparsities reaching a global target.

    The density of a layer is `eps * (n_in + n_out) / (n_in * n_out)` with
    `n_in, n_out` the last two dimensions of its shape, `eps` chosen so that
    the active weights over all layers number `(1 - sparsity) * N`. Layers
    that would exceed density 1 are dense; overridden layers keep their value.

    Args:
        shapes: dict. Variable path -> shape (tuple of ints, rank >= 2).
        sparsity: float in [0, 1). The global sparsity over all weights.
        overrides: optional dict. Variable path -> sparsity in [0, 1).

    Returns:
        dict. Variable path -> sparsity, in the order of `shapes`.

    Example:

    >>> s = erdos_renyi({"conv/kernel": (3, 3, 64, 64), "d/kernel": (1024, 10)},
    ...                 0.9)
    >>> round(s["conv/kernel"], 3), round(s["d/kernel"], 3)
    (0.933, 0.782)
    """
    shapes, sparsity, overrides = _check_all(shapes, sparsity, overrides)
    scores = {name: _er_score(shape) for name, shape in shapes.items()}
    return _solve_global(shapes, sparsity, overrides, scores)


def erdos_renyi_kernel(shapes, sparsity, overrides=None, power_scale=1.0):
    """Erdos-Renyi-Kernel (ERK) sparsities reaching a global target.

    RigL's distribution: the density of a layer is
    `eps * (sum(shape) / prod(shape)) ** power_scale`, `eps` chosen so that
    the active weights over all layers number `(1 - sparsity) * N`. Smaller
    layers are denser; a layer that would exceed density 1 is dense, and `eps`
    is solved again for the others. Overridden layers keep their value and
    the others make up for them. `power_scale=0` gives a uniform density
    (except for overrides and the global fit).

    Args:
        shapes: dict. Variable path -> shape (tuple of ints).
        sparsity: float in [0, 1). The global sparsity over all weights.
        overrides: optional dict. Variable path -> sparsity in [0, 1).
        power_scale: float >= 0. Exponent of the raw score (RigL's
            `erk_power_scale`).

    Returns:
        dict. Variable path -> sparsity, in the order of `shapes`.

    Example:

    >>> s = erdos_renyi_kernel(
    ...     {"d1/kernel": (784, 300), "d2/kernel": (300, 100),
    ...      "d3/kernel": (100, 10)}, 0.8)
    >>> s["d3/kernel"]
    0.0
    """
    check_number("power_scale", power_scale, 0)
    shapes, sparsity, overrides = _check_all(shapes, sparsity, overrides)
    scores = {
        name: (sum(shape) / math.prod(shape)) ** float(power_scale)
        for name, shape in shapes.items()
    }
    return _solve_global(shapes, sparsity, overrides, scores)


_REGISTRY = {
    "uniform": uniform,
    "er": erdos_renyi,
    "erk": erdos_renyi_kernel,
}


def register(name, fn):
    """Registers a distribution under `name` for `get` and the optimizer.

    Args:
        name: str. The name to look it up by.
        fn: callable `fn(shapes, sparsity, overrides=None) -> dict`, returning
            a sparsity in [0, 1) for every key of `shapes`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Argument `name` must be a non-empty string. Received: name={name!r}"
        )
    if not callable(fn):
        raise ValueError(f"Argument `fn` must be callable. Received: fn={fn!r}")
    _REGISTRY[name] = fn


def get(name):
    """Returns the distribution function registered as `name`.

    Args:
        name: str (`"uniform"`, `"er"`, `"erk"` or a name given to
            `register`) or a callable, which is returned as is.

    Returns:
        The distribution function.
    """
    if callable(name):
        return name
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise ValueError(
        f"Argument `distribution` must be one of {sorted(_REGISTRY)} or a "
        f"callable. Received: distribution={name!r}"
    )


def compute_sparsities(shapes, sparsity, distribution="erk", overrides=None):
    """Per-weight sparsities for a global target under a distribution.

    Args:
        shapes: dict. Variable path -> shape (tuple of ints), in model order.
        sparsity: float in [0, 1). The target.
        distribution: str (a registered name: `"uniform"`, `"er"`, `"erk"`)
            or a callable `fn(shapes, sparsity, overrides=None) -> dict`.
        overrides: optional dict. Variable path -> sparsity in [0, 1).

    Returns:
        dict. Variable path -> sparsity in [0, 1), in the order of `shapes`.

    Example:

    >>> compute_sparsities({"a/kernel": (10, 10), "b/kernel": (10, 10)}, 0.5)
    {'a/kernel': 0.5, 'b/kernel': 0.5}
    """
    fn = get(distribution)
    shapes, sparsity, overrides = _check_all(shapes, sparsity, overrides)
    result = fn(shapes, sparsity, overrides=overrides or None)
    if not hasattr(result, "items") or set(result) != set(shapes):
        raise ValueError(
            "A distribution must return a dict with one sparsity for each of "
            f"the weights {list(shapes)}. Received: {result!r} from "
            f"distribution={distribution!r}"
        )
    checked = {}
    for name in shapes:
        value = result[name]
        if not is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                "A distribution must return sparsities in [0, 1). Received: "
                f"{name!r} -> {value!r} from distribution={distribution!r}"
            )
        checked[name] = float(value)
    return checked


def active_count(num_weights, layer_sparsity):
    """Number of active weights of a layer: `(1 - s) * n` rounded half up.

    Args:
        num_weights: int > 0. The size of the weight.
        layer_sparsity: float in [0, 1].

    Returns:
        int in [0, num_weights].

    Example:

    >>> active_count(1000, 0.8)
    200
    """
    check_int("num_weights", num_weights, 0)
    check_fraction("layer_sparsity", layer_sparsity, "[0, 1]")
    count = int(math.floor((1.0 - float(layer_sparsity)) * int(num_weights) + 0.5))
    return min(max(count, 0), int(num_weights))


def resolve_counts(shapes, sparsities):
    """Active-weight counts for each weight from its shape and sparsity.

    Args:
        shapes: dict. Variable path -> shape (tuple of ints).
        sparsities: dict. Variable path -> sparsity, with the same keys.

    Returns:
        dict. Variable path -> int, in the order of `shapes`.

    Example:

    >>> resolve_counts({"a/kernel": (10, 10)}, {"a/kernel": 0.75})
    {'a/kernel': 25}
    """
    shapes = _check_shapes(shapes)
    if not hasattr(sparsities, "items") or set(sparsities) != set(shapes):
        raise ValueError(
            "Argument `sparsities` must have the same keys as `shapes` "
            f"{list(shapes)}. Received: sparsities={sparsities!r}"
        )
    return {
        name: active_count(math.prod(shape), sparsities[name])
        for name, shape in shapes.items()
    }
