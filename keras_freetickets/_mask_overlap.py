"""How much two members' sparse masks overlap (`mask_overlap`)."""

import os

import keras
import numpy as np

from keras_freetickets import prunable
from keras_freetickets._member_file import read_member_weights


def mask_overlap(a, b):
    """Overlap of the active (nonzero) prunable weights of two sparse models.

    With `A` and `B` the sets of positions of nonzero entries over all
    prunable kernels (taken in order, see `keras_freetickets.prunable`), the
    overlap is `|A & B| / |A|`: the fraction of `a`'s active weights that are
    also active in `b`. Members trained at the same exact per-layer counts
    have `|A| == |B|`, so the value is then symmetric. 1.0 means identical
    masks; two independent random masks at density d overlap by about d.

    Args:
        a: A `keras.Model`, a member file path, or a dict from variable paths
            to arrays (only rank >= 2 entries named `kernel`,
            `depthwise_kernel` or `pointwise_kernel` are used).
        b: The same kinds as `a`, with prunable kernels of the same shapes.

    Returns:
        A float in [0, 1].
    """
    kernels_a = _prunable_arrays(a, "a")
    kernels_b = _prunable_arrays(b, "b")
    if len(kernels_a) != len(kernels_b) or any(
        x.shape != y.shape for x, y in zip(kernels_a, kernels_b)
    ):
        raise ValueError(
            "Arguments `a` and `b` must have prunable kernels of the same "
            f"shapes. Received: a={[x.shape for x in kernels_a]}, "
            f"b={[y.shape for y in kernels_b]}"
        )
    active_a = 0
    both = 0
    for x, y in zip(kernels_a, kernels_b):
        nz_x = x != 0
        active_a += int(np.count_nonzero(nz_x))
        both += int(np.count_nonzero(nz_x & (y != 0)))
    if active_a == 0:
        raise ValueError("Argument `a` has no active (nonzero) prunable weights.")
    return both / active_a


def pairwise_mask_overlap(members):
    """Matrix of `mask_overlap(members[i], members[j])` for all pairs.

    Args:
        members: A list of models, member file paths or weight dicts (see
            `mask_overlap`).

    Returns:
        A float64 numpy array of shape (M, M), ones on the diagonal.
    """
    members = list(members)
    count = len(members)
    result = np.ones((count, count))
    arrays = [_prunable_arrays(m, f"members[{i}]") for i, m in enumerate(members)]
    for i in range(count):
        for j in range(count):
            if i != j:
                result[i, j] = mask_overlap(_as_dict(arrays[i]), _as_dict(arrays[j]))
    return result


def _as_dict(arrays):
    return {f"w{i}/kernel": array for i, array in enumerate(arrays)}


def _prunable_arrays(obj, name):
    if isinstance(obj, keras.Model):
        return [
            np.asarray(keras.ops.convert_to_numpy(v))
            for v in prunable.prunable_variables(obj.weights)
        ]
    if isinstance(obj, (str, os.PathLike)):
        return list(read_member_weights(obj, prunable_only=True).values())
    if isinstance(obj, dict):
        arrays = []
        for key, value in obj.items():
            value = np.asarray(value)
            weight_name = str(key).split("/")[-1].split(":")[0].split("#")[0]
            if value.ndim >= 2 and weight_name in prunable._PRUNABLE_NAMES:
                arrays.append(value)
        return arrays
    raise ValueError(
        f"Argument `{name}` must be a keras.Model, a member file path or a "
        f"dict of weights. Received: {name}={obj!r} of type {type(obj).__name__}"
    )
