"""Exact k-selection for mask updates, with static shapes.

A mask update picks, per sparse kernel, the k active weights of smallest
magnitude (the drop) and the k inactive entries of largest score (the grow).
The reference way is `tf.math.top_k(score, k_max)` on the whole flattened
kernel followed by a scatter of the first k picks into a boolean mask. The
functions here return the same boolean flags, bit for bit, by a radix
select: the float values are mapped to int32 keys whose integer order is the
float order; three passes of a histogram over 11, 11 and 10 bits of the keys
(most significant first) find the k-th key `T` among the eligible entries;
every eligible entry below `T` is taken, plus, of the entries equal to `T`,
the ones with the lowest flat indices until k are taken. That is exactly
`top_k`'s choice (it prefers the lower index among equal values; `-0.0` and
`0.0` are equal). Every tensor has a static shape and no output shape
depends on the data, so XLA compiles the update once. Below
`RADIX_MIN_SIZE` entries the functions run the reference `top_k` code
itself, which was as fast there.

In `SparseOptimizer._prune_and_grow` (with `kk = k_max if k_is_static
else k`, a Python int when every pick is kept, as there):

```python
dropped = selection.smallest_active_flags(weights, old, kk, k_max)
kept = tf.logical_and(old, tf.logical_not(dropped))
grown = selection.largest_flags(score, tf.logical_not(kept), kk, k_max)
```

replaces the two `top_k` + `_scatter_flags` pairs and gives the same masks.

Weights must be finite and scores free of NaN and `-inf` (with those, top_k
mixes them with the masked-out entries' `-inf`; that order is not
reproduced).
"""

import tensorflow as tf

from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_int

__all__ = ["largest_flags", "select_smallest", "smallest_active_flags"]

_INT32_MAX = 2**31 - 1
_SIGN = -(2**31)
_MAGNITUDE = 2**31 - 1  # the non-sign bits


def _order_keys(values):
    """int32 keys with the float order of `values` (`-0.0` == `0.0`)."""
    values = tf.convert_to_tensor(values)
    values = tf.cast(values, tf.float32)
    values = tf.where(tf.equal(values, 0.0), tf.zeros([], tf.float32), values)
    bits = tf.bitcast(values, tf.int32)
    return tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, _MAGNITUDE), bits)


def _histogram(digits, size):
    """Counts of each value of `digits` in [0, size); others are skipped."""
    return tf.raw_ops.DenseBincount(
        input=digits, size=size, weights=tf.zeros([0], tf.int32),
        binary_output=False,
    )


def _bucket_of_rank(counts, rank):
    """The bucket holding the `rank`-th entry (1-based), and the entries
    in the buckets before it."""
    cumulative = tf.cumsum(counts)
    bucket = tf.reduce_sum(tf.cast(cumulative < rank, tf.int32))
    before = tf.where(
        bucket > 0, tf.gather(cumulative, tf.maximum(bucket - 1, 0)), 0
    )
    return bucket, before


# Digit widths of the radix passes (11 + 11 + 10 bits). Measured on 2 CPU
# cores (benchmarks/selection.py) against two 16-bit and four 8-bit passes:
# fastest or tied at every layer size of the two protocols.
DIGIT_WIDTHS = (11, 11, 10)
# Below this many entries `tf.math.top_k` is as fast or faster (its result
# is the same), so the public functions use it there.
RADIX_MIN_SIZE = 65536


def _digit_widths(n):
    del n
    return DIGIT_WIDTHS


def select_smallest(keys, k):
    """Flags of the k smallest int32 keys, lower index first among equals.

    The exact selection under everything else in this module: a radix select
    of the k-th smallest key `T` (one histogram pass per digit of
    `DIGIT_WIDTHS` bits, most significant first, over the keys in unsigned
    order, each pass over the keys that share the digits found so far), then every
    key below `T`, then the keys equal to `T` by increasing flat index until
    k are flagged (a prefix count over the ties runs only when some tie must
    be left out). Shapes are static: `keys` is 1-D of static length n and
    `k` an int32 scalar in [0, n] (a larger k flags every entry).

    Args:
        keys: int32 tensor of shape `[n]`.
        k: int32 scalar (tensor or Python int): how many entries to flag.

    Returns:
        A bool tensor of shape `[n]` with exactly `min(k, n)` True entries.

    Example:

    ```python
    select_smallest(tf.constant([5, 1, 3, 1]), 2)  # [False, True, False, True]
    ```
    """
    keys = tf.convert_to_tensor(keys, tf.int32)
    n = keys.shape[0]
    if n is None:
        raise ValueError(
            "Argument `keys` must have a static length. Received: "
            f"keys.shape={keys.shape}"
        )
    k = tf.minimum(tf.cast(k, tf.int32), n)
    remaining = tf.maximum(k, 1)  # rank of T among the keys in the prefix
    # Unsigned order: flip the sign bit; digits are then in order.
    ukeys = tf.bitwise.bitwise_xor(keys, _SIGN)
    prefix = tf.constant(0, tf.int32)
    in_prefix = None
    shift = 32
    taken = tf.constant(0, tf.int32)  # keys below the prefix's bucket
    for width in _digit_widths(n):
        shift -= width
        size = 1 << width
        digit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(ukeys, shift), size - 1)
        if in_prefix is not None:
            digit = tf.where(in_prefix, digit, size)
        counts = _histogram(digit, size)
        bucket, before = _bucket_of_rank(counts, remaining)
        remaining -= before
        taken += before
        prefix = tf.bitwise.bitwise_or(prefix, tf.bitwise.left_shift(bucket, shift))
        if shift > 0:
            in_prefix = tf.equal(
                tf.bitwise.bitwise_and(
                    tf.bitwise.bitwise_xor(ukeys, prefix),
                    tf.bitwise.left_shift(tf.constant(-1, tf.int32), shift),
                ),
                0,
            )
    threshold = tf.bitwise.bitwise_xor(prefix, _SIGN)
    wanted = k - taken  # entries equal to T to take
    num_ties = tf.gather(counts, bucket)
    below = keys < threshold
    ties = tf.equal(keys, threshold)

    def all_ties():
        return tf.logical_or(below, ties)

    def first_ties():
        tie_rank = tf.cumsum(tf.cast(ties, tf.int32), exclusive=True)
        return tf.logical_or(below, tf.logical_and(ties, tie_rank < wanted))

    picked = tf.cond(tf.equal(num_ties, wanted), all_ties, first_ties)
    return tf.logical_and(picked, k > 0)


def _flat_k(k, k_max):
    k = tf.convert_to_tensor(k)
    return tf.minimum(tf.cast(k, tf.int32), k_max)


def _use_radix(radix, n):
    radix = check_bool("radix", radix, allow_none=True)
    return n >= RADIX_MIN_SIZE if radix is None else radix


def _select(values, flags, k, k_max, radix, top_k_score, radix_keys):
    """The body of both selections: the k entries among `flags` of largest
    `top_k_score(values)`, by `top_k` or, equally, by the radix select of the
    k smallest `radix_keys(values)` (entries outside `flags` come last)."""
    values = tf.reshape(values, [-1])
    flags = tf.reshape(tf.cast(flags, tf.bool), [-1])
    n = values.shape[0]
    k_max = check_int("k_max", k_max, 0, n)
    if not _use_radix(radix, n):
        score = tf.where(flags, top_k_score(values), float("-inf"))
        return _top_k_flags(score, k, k_max)
    # The sentinel only ties with itself; among those, index order decides,
    # as top_k does among its -inf scores. A real key never reaches it: the
    # largest non-NaN key is +inf's, 0x7F800000.
    keys = tf.where(flags, radix_keys(values), _INT32_MAX)
    return select_smallest(keys, _flat_k(k, k_max))


def _top_k_flags(score, k, k_max):
    """The reference selection: `top_k(score, k_max)`, first k picks kept.

    The picks are sorted (so that "the first k" is defined) unless k is a
    Python int equal to `k_max`, when every pick is kept and order is moot.
    """
    n = score.shape[0]
    if k_max == 0:
        return tf.zeros([n], tf.bool)
    every_pick = isinstance(k, int) and k >= k_max
    _, indices = tf.math.top_k(score, k_max, sorted=not every_pick)
    select = tf.range(k_max) < _flat_k(k, k_max)
    counts = tf.scatter_nd(
        tf.expand_dims(indices, 1), tf.cast(select, tf.int32), [n]
    )
    return counts > 0


def smallest_active_flags(weights, mask, k, k_max, radix=None):
    """The drop: flags of the k active weights of smallest magnitude.

    Equal, bit for bit, to `top_k(where(mask, -|w|, -inf), k_max)` followed
    by keeping the first k picks (sorted by value, lower index first among
    equal values) and scattering them into a flat bool mask, which is how
    `SparseOptimizer` chose the drop. As there, `k` is capped at `k_max`, and
    when k exceeds the number of active entries the lowest-index inactive
    entries fill up the rest (top_k's choice among `-inf` scores).

    Args:
        weights: float tensor, any shape with a static size n, finite.
        mask: bool tensor of the same size: the active entries.
        k: int scalar (tensor or Python int): how many to drop.
        k_max: Python int: the static upper bound on k.
        radix: bool or None. Whether to use the radix select (True) or
            `top_k` (False); None picks by size (`RADIX_MIN_SIZE`). Under
            XLA, whose `top_k` sorts, the radix select was faster at every
            layer size measured (benchmarks/selection_speed.py).

    Returns:
        A flat bool tensor of shape `[n]` with exactly `min(k, k_max)` True.

    Example:

    ```python
    w = tf.constant([0.5, -0.1, 0.0, 0.3])
    m = tf.constant([True, True, False, True])
    smallest_active_flags(w, m, 2, 2)  # [False, True, False, True]
    ```
    """
    return _select(weights, mask, k, k_max, radix,
                   top_k_score=lambda w: -tf.abs(w),
                   radix_keys=lambda w: _order_keys(tf.abs(w)))


def largest_flags(score, candidates, k, k_max, radix=None):
    """The grow: flags of the k candidate entries of largest score.

    Equal, bit for bit, to `top_k(where(candidates, score, -inf), k_max)`
    followed by keeping the first k picks and scattering them into a flat
    bool mask (with `candidates` the entries inactive after the drop, this is
    how `SparseOptimizer` chose the grow). When k exceeds the number of
    candidates, the lowest-index non-candidates fill up the rest, as with
    top_k's `-inf` scores.

    Args:
        score: float tensor, any shape with a static size n, no NaN and no
            `-inf` among the candidates.
        candidates: bool tensor of the same size.
        k: int scalar (tensor or Python int): how many to grow.
        k_max: Python int: the static upper bound on k.
        radix: bool or None. As in `smallest_active_flags`.

    Returns:
        A flat bool tensor of shape `[n]` with exactly `min(k, k_max)` True.

    Example:

    ```python
    g = tf.constant([0.2, 0.9, 0.9, 0.1])
    c = tf.constant([True, False, True, True])
    largest_flags(g, c, 2, 2)  # [True, False, True, False]
    ```
    """
    # Larger score -> smaller key; ~key reverses the int32 order exactly.
    return _select(score, candidates, k, k_max, radix,
                   top_k_score=lambda s: s,
                   radix_keys=lambda s: tf.bitwise.invert(_order_keys(s)))
