"""Exact k-selection for mask updates.

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
`0.0` are equal). Outside XLA the keys still in play are gathered after
each pass, so only the first pass reads every key; where XLA compiles the
code (`jit_compile`, TPU) every tensor keeps its static shape instead, and
no shape depends on the data, so XLA compiles the update once. Below
`RADIX_MIN_SIZE` entries the functions run the reference `top_k` code
itself, which was as fast there.

In `keras_freetickets.masking` (`drop_flags` and `grow_flags`, with
`kk = k_max` as a Python int when every pick is kept, else `k`):

```python
dropped = selection.smallest_active_flags(weights, old, kk, k_max)
kept = tf.logical_and(old, tf.logical_not(dropped))
grown = selection.largest_flags_outside(score, kept, kk, k_max)
```

replaces the two `top_k` + scatter pairs and gives the same masks;
`masking.rewire_masks` calls `select_smallest` directly on its own keys.

Weights must be finite and scores free of NaN and `-inf` (with those, top_k
mixes them with the masked-out entries' `-inf`; that order is not
reproduced).
"""

import tensorflow as tf

from keras_freetickets import _keras_compat as compat
from keras_freetickets import native
from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_int

__all__ = [
    "largest_flags", "largest_flags_outside", "select_smallest",
    "smallest_active_flags",
]

_INT32_MAX = 2**31 - 1
_MAGNITUDE = 2**31 - 1  # the non-sign bits


def _float_bits(values):
    """The int32 bits of `values` as float32, every zero as `+0.0`.

    "Zero" is what TensorFlow's comparisons call zero, so `-0.0` and, where
    the CPU flushes subnormals (as TensorFlow's kernels do), subnormals too:
    `top_k` ranks them all equal.
    """
    values = tf.cast(tf.convert_to_tensor(values), tf.float32)
    values = tf.where(tf.equal(values, 0.0), tf.zeros([], tf.float32), values)
    return tf.bitcast(values, tf.int32)


def _order_keys(values):
    """int32 keys with the float order of `values` (zeros equal): a
    negative float's magnitude bits are flipped. The sign, spread over all
    bits by the arithmetic shift, picks which: no select over the keys."""
    bits = _float_bits(values)
    sign = tf.bitwise.right_shift(bits, 31)  # 0 or -1
    return tf.bitwise.bitwise_xor(bits, tf.bitwise.bitwise_and(sign, _MAGNITUDE))


def _magnitude_keys(values):
    """`_order_keys(abs(values))`: the bits of a non-negative float are
    already in its order, which saves three elementwise ops."""
    return _float_bits(tf.abs(values))


def _histogram(digits, size):
    """Counts of each value of `digits` in [0, size); others are skipped."""
    return tf.raw_ops.DenseBincount(
        input=digits, size=size, weights=tf.zeros([0], tf.int32),
        binary_output=False,
    )


def _bucket_of_rank(counts, rank):
    """The bucket holding the `rank`-th entry (1-based), and the entries
    in the buckets before it."""
    below = tf.cast(tf.cumsum(counts) < rank, tf.int32)  # 1 up to bucket
    return tf.reduce_sum(below), tf.reduce_sum(counts * below)


# Digit widths of the radix passes, most significant first (11 + 11 + 10
# bits). Two 16-bit passes cost more: a 65536-bin histogram took 1.2 ms on
# 235200 keys against 0.5 ms for 2048 bins (2 CPU cores).
DIGIT_WIDTHS = (11, 11, 10)
# Below this many entries `tf.math.top_k` is as fast or faster (its result
# is the same), so the public functions use it there. Measured with the
# compacting passes on 2 CPU cores, drop and grow at half the active
# entries: top_k ahead at 4096 entries (0.43 against 0.50 ms), the radix
# select from 8192 (0.57 against 0.75 ms) and 3x at 30000 (1.2 against
# 3.1 ms).
RADIX_MIN_SIZE = 8192


def select_smallest(keys, k, compact=None, after_minimum=False):
    """Flags of the k smallest int32 keys, lower index first among equals.

    The exact selection under everything else in this module: a radix select
    of the k-th smallest key `T`, then every key below `T`, then the keys
    equal to `T` by increasing flat index until k are flagged. The passes
    read the digits of `DIGIT_WIDTHS` bits of the signed keys, most
    significant first (the first digit offset so that its order is the
    signed order); each pass histograms the keys whose earlier digits are
    the buckets found so far. When every key equal to `T` is taken (the
    usual case) the flags are one comparison, `keys <= T`; otherwise the
    ties of lowest index are kept (found from the ties' positions when
    compacting, by a prefix count over all keys in the static way).

    Two ways to restrict a pass to the keys still in play give the same
    flags. Compacting gathers those keys after each pass (a few hundred of a
    layer's keys after the first), so the later passes cost next to nothing,
    but the gathered length depends on the data; every compacting call
    runs one shared traced function, whatever the length. The static way
    masks the other keys out and every tensor keeps its length, as XLA
    needs.

    Args:
        keys: int32 tensor of static shape `[n]`.
        k: int32 scalar (tensor or Python int) in [0, n]: how many entries
            to flag (a larger k flags every entry).
        compact: bool or None. Whether to compact (True) or keep static
            shapes (False); None compacts except where XLA will compile the
            code (a `jit_compile` function, a TPU step).
        after_minimum: bool. With True, every entry whose key is -2**31
            is flagged, and k more among the others (so a caller can flag
            "these, then the k smallest of the rest" in one pass). The
            caller promises that no other key lies below -2**31 + 2**21:
            the first pass counts that range as the minimum's.

    Returns:
        A bool tensor of shape `[n]` with exactly `min(k, n)` True entries
        (`min(k + m, n)` with `after_minimum`, m entries at the minimum).

    Example:

    ```python
    select_smallest(tf.constant([5, 1, 3, 1]), 2)  # [False, True, False, True]
    ```
    """
    compact = check_bool("compact", compact, allow_none=True)
    if compact is None:
        compact = not compat.in_xla_context()
    keys = tf.convert_to_tensor(keys, tf.int32)
    n = keys.shape[0]
    if n is None:
        raise ValueError(
            "Argument `keys` must have a static length. Received: "
            f"keys.shape={keys.shape}"
        )
    if n == 0:
        return tf.zeros([0], tf.bool)
    after_minimum = check_bool("after_minimum", after_minimum)
    k = tf.cast(k, tf.int32)
    if compact:
        # The compiled op when built (`keras_freetickets.native`), the same
        # flags in one op; else one traced program for every kernel and
        # both selections: the compacting passes do not need the static
        # length.
        flags = native.select_smallest(keys, k, tf.constant(after_minimum))
        if flags is not None:
            return flags
        return tf.ensure_shape(
            _compact_select(keys, k, tf.constant(after_minimum)), [n]
        )
    return _radix_select(keys, k, compact, after_minimum)


def _radix_select(keys, k, compact, after_minimum=False):
    """`select_smallest` of int32 `keys` of shape `[n]` (n may be unknown
    when compacting), an int32 scalar `k` and `after_minimum` (a bool or
    a bool tensor)."""
    n = tf.size(keys) if keys.shape[0] is None else keys.shape[0]
    k = tf.minimum(k, n)
    # Rank of T among the keys still in play. With k = 0 it is 1: T is then
    # the smallest key, nothing is below it and no tie is wanted.
    remaining = tf.maximum(k, 1)
    taken = tf.constant(0, tf.int32)  # keys below the buckets found so far
    threshold = tf.constant(0, tf.int32)  # the digits of T found so far
    shift = 32
    digit = None
    in_play = keys
    for width in DIGIT_WIDTHS:
        shift -= width
        size = 1 << width
        if digit is None:
            # Top digit of the key read as unsigned (one logical shift).
            # A negative key's digit is then at least size / 2: the
            # histogram is rotated by half into the signed order, and its
            # bucket b holds the keys of digit b ^ (size / 2).
            offset = size // 2
            digit = tf.bitcast(
                tf.bitwise.right_shift(tf.bitcast(keys, tf.uint32), shift),
                tf.int32,
            )
            counts = _histogram(digit, size)
            # (Two slices: tf.roll took 20 us more on 2048 counts.)
            counts = tf.concat([counts[offset:], counts[:offset]], 0)
            if after_minimum is not False:
                # Bucket 0 holds the keys below -2**31 + 2**21: by the
                # caller's promise, the minimum's only.
                k = tf.minimum(k + tf.where(after_minimum, counts[0], 0), n)
                remaining = tf.maximum(k, 1)
        else:
            if compact:
                in_play = tf.gather(in_play, tf.reshape(
                    tf.where(tf.equal(digit, digit_in_play)), [-1]
                ))
                high = (in_play if shift == 0
                        else tf.bitwise.right_shift(in_play, shift))
                digit = tf.bitwise.bitwise_and(high, size - 1)
            elif shift > 0:
                # The key's bits above `shift` minus T's: in [0, size)
                # exactly for the keys still in play. The others, negative
                # or at least `size` (and above -2**31: both terms fit in
                # 32 - shift bits), become at least 2**31 - 2**(32 - shift)
                # with the sign bit cleared, a value no bucket counts.
                digit = tf.bitwise.bitwise_and(
                    tf.bitwise.right_shift(keys, shift)
                    - tf.bitwise.right_shift(threshold, shift),
                    _MAGNITUDE,
                )
            else:
                # The lowest digit, where that difference could overflow:
                # the keys in play are those in the last pass's bucket.
                digit = tf.where(tf.equal(digit, digit_in_play),
                                 tf.bitwise.bitwise_and(keys, size - 1), size)
            offset = 0
            counts = _histogram(digit, size)
        bucket, before = _bucket_of_rank(counts, remaining)
        # The digit value of the keys in the bucket found.
        digit_in_play = tf.bitwise.bitwise_xor(bucket, offset)
        remaining -= before
        taken += before
        threshold = tf.bitwise.bitwise_or(
            threshold, tf.bitwise.left_shift(bucket - offset, shift)
        )
    wanted = k - taken  # keys equal to T to take
    num_ties = tf.gather(counts, bucket)

    def all_ties():
        return keys <= threshold

    def first_ties():
        ties = tf.equal(keys, threshold)
        if compact:
            # The flat index of the last tie to take (-1: none), from the
            # ties' positions; a prefix count over all keys costs more
            # (cumsum: 1.9 ms on 235200 keys, 2 cores).
            positions = tf.cast(tf.reshape(tf.where(ties), [-1]), tf.int32)
            last = tf.where(
                wanted > 0, tf.gather(positions, tf.maximum(wanted - 1, 0)), -1
            )
            take = tf.range(n) <= last
        else:
            take = tf.cumsum(tf.cast(ties, tf.int32), exclusive=True) < wanted
        return tf.logical_or(keys < threshold, tf.logical_and(ties, take))

    return tf.cond(tf.equal(num_ties, wanted), all_ties, first_ties)


# Outside XLA every selection calls this one function instead of tracing its
# own copy of the passes (about 150 ops): four selections on FMNIST-MLP v1,
# traced in the first train step. It is not inlined into the train step, so
# TensorFlow also optimizes and instantiates it once.
_compact_select = tf.function(
    lambda keys, k, after_minimum: _radix_select(
        keys, k, compact=True, after_minimum=after_minimum),
    input_signature=[tf.TensorSpec([None], tf.int32),
                     tf.TensorSpec([], tf.int32),
                     tf.TensorSpec([], tf.bool)],
    autograph=False,
    experimental_attributes={"_noinline": True},
)


def _flat_k(k, k_max):
    k = tf.convert_to_tensor(k)
    return tf.minimum(tf.cast(k, tf.int32), k_max)


def _use_radix(radix, n):
    radix = check_bool("radix", radix, allow_none=True)
    return n >= RADIX_MIN_SIZE if radix is None else radix


def _select(values, flags, k, k_max, radix, top_k_score, radix_keys,
            excluded=False):
    """The body of the selections: the k entries among `flags` (outside
    them with `excluded=True`) of largest `top_k_score(values)`, by `top_k`
    or, equally, by the radix select of the k smallest `radix_keys(values)`
    (the other entries come last)."""
    values = tf.reshape(values, [-1])
    flags = tf.reshape(tf.cast(flags, tf.bool), [-1])
    n = values.shape[0]
    k_max = check_int("k_max", k_max, 0, n)

    def where_eligible(value, other):
        # Swapping the branches saves a pass of logical_not over the flags.
        return (tf.where(flags, other, value) if excluded
                else tf.where(flags, value, other))

    if not _use_radix(radix, n):
        score = where_eligible(top_k_score(values), float("-inf"))
        return _top_k_flags(score, k, k_max)
    # The sentinel only ties with itself; among those, index order decides,
    # as top_k does among its -inf scores. A real key never reaches it: the
    # largest non-NaN key is +inf's, 0x7F800000.
    keys = where_eligible(radix_keys(values), _INT32_MAX)
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
                   radix_keys=_magnitude_keys)


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
    return _select(score, candidates, k, k_max, radix,
                   top_k_score=lambda s: s, radix_keys=_descending_keys)


def largest_flags_outside(score, excluded, k, k_max, radix=None):
    """`largest_flags(score, logical_not(excluded), k, k_max, radix)`, one
    pass over the flags cheaper: RigL grows outside the kept weights.

    Example:

    ```python
    g = tf.constant([0.2, 0.9, 0.9, 0.1])
    kept = tf.constant([False, True, False, False])
    largest_flags_outside(g, kept, 2, 2)  # [True, False, True, False]
    ```
    """
    return _select(score, excluded, k, k_max, radix,
                   top_k_score=lambda s: s, radix_keys=_descending_keys,
                   excluded=True)


def _descending_keys(score):
    # Larger score -> smaller key; ~key reverses the int32 order exactly.
    return tf.bitwise.invert(_order_keys(score))
