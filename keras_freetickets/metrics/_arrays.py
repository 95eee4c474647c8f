"""Array helpers shared by the metrics: array checks and the entropy.

The checks name the argument at fault and return the array they checked as
float64 (probabilities) or int64 (labels). Scalar arguments are checked with
`keras_freetickets._validation`.
"""

import numpy as np

SUM_ATOL = 1e-3


def entropy(probs):
    """Entropy along the last axis, in nats, with 0 log 0 = 0."""
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(probs * np.log(safe), axis=-1)


def check_probs(probs, name):
    """Returns probs as a float64 (N, C) array after checking it holds probabilities."""
    array = np.asarray(probs)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"Argument `{name}` must have shape (num_examples, num_classes) with "
            f"both at least 1. Received: {name}.shape={array.shape}"
        )
    return check_values(array, name)


def check_values(array, name):
    """Checks the last axis of a float array holds probability distributions."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"Argument `{name}` must hold probabilities (floats). "
            f"Received: {name}.dtype={array.dtype}"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        index = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"Argument `{name}` must hold probabilities: all values must be "
            f"finite. Received {array[tuple(index)]} at index {tuple(int(i) for i in index)}"
        )
    if np.any(array < 0):
        index = np.argwhere(array < 0)[0]
        raise ValueError(
            f"Argument `{name}` must hold probabilities: values must be >= 0. "
            f"Received {array[tuple(index)]!r} at index {tuple(int(i) for i in index)}"
        )
    sums = np.sum(array, axis=-1)
    bad = np.abs(sums - 1.0) > SUM_ATOL
    if np.any(bad):
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"row {index[0]}" if len(index) == 1 else f"member {index[0]}, row {index[1]}"
        raise ValueError(
            f"Argument `{name}` must hold probabilities: rows must sum to 1 "
            f"(within {SUM_ATOL}). Received: {where} sums to {float(sums[index]):.6g}"
        )
    return array


def check_member_probs(member_probs, name, min_members=1):
    """Returns member predictions as a float64 (M, N, C) array after checking them."""
    array = np.asarray(member_probs)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(
            f"Argument `{name}` must have shape (num_members, num_examples, "
            f"num_classes) with all at least 1. Received: {name}.shape={array.shape}"
        )
    if array.shape[0] < min_members:
        raise ValueError(
            f"Argument `{name}` must hold the predictions of at least "
            f"{min_members} members: a pairwise measure needs two. "
            f"Received: {name}.shape={array.shape}"
        )
    return check_values(array, name)


def as_members(value, name):
    """Accepts (M, N, C) member predictions or (N, C) predictions of one model."""
    if np.ndim(value) == 2:
        return check_probs(value, name)[None]
    return check_member_probs(value, name)


def check_labels(labels, num_examples, num_classes, probs_shape, probs_name="probs"):
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != num_examples:
        raise ValueError(
            f"Arguments `labels` and `{probs_name}` must describe the same "
            f"examples: `labels` must have shape ({num_examples},). "
            f"Received: labels.shape={array.shape}, {probs_name}.shape={probs_shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "Argument `labels` must hold integer class ids. "
            f"Received: labels.dtype={array.dtype}"
        )
    if np.any(array < 0) or np.any(array >= num_classes):
        index = int(np.argmax((array < 0) | (array >= num_classes)))
        raise ValueError(
            f"Argument `labels` must hold class ids in [0, {num_classes}) "
            f"({probs_name} has {num_classes} classes). Received: "
            f"labels[{index}]={int(array[index])}"
        )
    return array.astype(np.int64)


def check_labels_and_probs(labels, probs):
    probs = check_probs(probs, "probs")
    labels = check_labels(labels, probs.shape[0], probs.shape[1], probs.shape)
    return labels, probs
