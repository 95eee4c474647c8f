"""Mask arithmetic of one prune-and-grow update, as pure TensorFlow functions.

No Keras here: the functions take flat tensors and return flat tensors, so
they can be tested on their own and traced into any train step. Every shape
is static (`top_k` with a fixed maximum k, then a comparison with
`range(k_max)`), so XLA compiles the update once.
"""

import tensorflow as tf

from keras_freetickets import _keras_compat as compat
from keras_freetickets import native
from keras_freetickets import selection

NEG_INF = float("-inf")


def scatter_flags(indices, flags, size):
    """A [size] bool tensor, True at `indices` where `flags` is True."""
    counts = tf.scatter_nd(
        tf.expand_dims(indices, 1), tf.cast(flags, tf.int32), [size]
    )
    return counts > 0


def pick_largest(score, k, k_max, picks_sorted=True):
    """Flags of the `k` largest entries of a flat `score` (`k <= k_max`).

    `k_max` is a Python int; `k` may be a tensor. Ties go to the lower
    index, as in `tf.math.top_k`. With `picks_sorted=False` the caller
    promises `k == k_max`, and the cheaper unsorted `top_k` is used.
    """
    size = score.shape[0]
    _, index = tf.math.top_k(score, k_max, sorted=picks_sorted)
    return scatter_flags(index, tf.range(k_max) < k, size)


def _count(k, k_max, picks_sorted):
    # A Python int tells the selection that every pick is kept.
    return k if picks_sorted else k_max


def drop_flags(weights, mask, k, k_max, picks_sorted=True):
    """The `k` active weights of smallest magnitude (inactive ones never).

    Large layers use the radix select of `keras_freetickets.selection`,
    which picks exactly what `top_k` does, faster.
    """
    # Exact counts need NaN-free ranks: a non-finite weight ranks as 0,
    # among the first dropped.
    weights = tf.where(tf.math.is_finite(weights), weights,
                       tf.zeros([], weights.dtype))
    return selection.smallest_active_flags(
        weights, mask, _count(k, k_max, picks_sorted), k_max)


def grow_flags(grow_score, kept, k, k_max, picks_sorted=True, blocked=None):
    """The `k` best-scoring weights among those not in `kept`.

    Candidates are all weights outside `kept`, the ones just dropped too
    (RigL's rule). Weights in `blocked` are grown only when fewer than `k`
    other candidates remain (so the count stays exact), in their own score
    order: scores are non-negative, and a blocked score s becomes
    -1 / (1 + s), below every allowed score and above the -inf of `kept`.
    """
    score = tf.cast(grow_score, tf.float32)
    # A non-finite score (a NaN gradient) grows nothing first: it counts 0.
    score = tf.where(tf.math.is_finite(score), score, 0.0)
    if blocked is not None:
        score = tf.where(blocked, -1.0 / (1.0 + score), score)
    return selection.largest_flags_outside(
        score, kept, _count(k, k_max, picks_sorted), k_max)


def favour_unused(grow_score, ever_active, novelty):
    """Multiplies the grow score of never-active weights by `1 + novelty`.

    Scores are non-negative (gradient magnitudes, uniform draws), so
    `novelty = 0` changes nothing and a large `novelty` grows unused weights
    first.
    """
    score = tf.cast(grow_score, tf.float32)
    return tf.where(ever_active, score, score * (1.0 + novelty))


def count_for(fraction, num_active):
    """k = round(fraction * num_active) in float32, as an int32 tensor."""
    fraction = tf.cast(fraction, tf.float32)
    return tf.cast(tf.floor(fraction * float(num_active) + 0.5), tf.int32)


def prune_and_grow(weights, mask, grow_score, k, k_max, picks_sorted=True,
                   blocked=None, nonnegative_score=False):
    """One update of a flat layer: returns (new mask, kept, dropped).

    Drops the `k` smallest-magnitude active weights, then grows the `k`
    best-scoring weights that are inactive after the drop (see `grow_flags`).
    `rewire_masks` computes the same with two passes fewer.
    """
    new, vacated = rewire_masks(weights, mask, grow_score, k, k_max,
                                picks_sorted, blocked, nonnegative_score)
    return new, tf.logical_not(vacated), tf.logical_and(mask, vacated)


def rewire_masks(weights, mask, grow_score, k, k_max, picks_sorted=True,
                 blocked=None, nonnegative_score=False):
    """`prune_and_grow` as (new mask, vacated), vacated = not kept.

    Flat tensors of a static size n. From `selection.RADIX_MIN_SIZE`
    entries on, the two selections run on keys that fold several
    elementwise passes into two integer ops each, and the entries that
    are in the result anyway (inactive ones in the drop's, kept ones in
    the grow's) get the minimum key, so that each selection's flags are
    the mask wanted: `vacated` = inactive or dropped, `new` = kept or
    grown. With `nonnegative_score=True` the caller promises scores >= 0
    (an `Updater` with `nonnegative_scores`); a negative one counts as 0,
    as a non-finite one always does.
    """
    size = weights.shape[0]
    if size < selection.RADIX_MIN_SIZE:
        dropped = drop_flags(weights, mask, k, k_max, picks_sorted)
        kept = tf.logical_and(mask, tf.logical_not(dropped))
        grown = grow_flags(grow_score, kept, k, k_max, picks_sorted, blocked)
        return tf.logical_or(kept, grown), tf.logical_not(kept)
    k = tf.minimum(tf.cast(k, tf.int32), k_max)
    vacated = _select_keyed(weights, mask, k, "magnitude")
    if not nonnegative_score or blocked is not None:
        kept = tf.logical_not(vacated)
        grown = grow_flags(grow_score, kept, k, k_max, True, blocked)
        return tf.logical_or(kept, grown), vacated
    new = _select_keyed(grow_score, vacated, k, "descending")
    return new, vacated


def _select_keyed(values, eligible, k, kind):
    """`select_smallest(where(eligible, keys(values), -2**31), k,
    after_minimum=True)` with `_magnitude_keys` or `_descending_keys`: one
    compiled op where `keras_freetickets.native` is built (outside XLA),
    else the key ops and the selection."""
    if not compat.in_xla_context():
        flags = native.select_by_keys(values, eligible, k, kind)
        if flags is not None:
            return flags
    keys = _magnitude_keys if kind == "magnitude" else _descending_keys
    return selection.select_smallest(
        tf.where(eligible, keys(values), _INT32_MIN), k, after_minimum=True)


_INT32_MIN = -2**31


def _magnitude_keys(weights):
    """int32 keys in the order of |weights|. Every magnitude that is zero,
    subnormal (zero to TensorFlow's kernels, which flush them) or not
    finite gets key 2**24 - 1, below all others: the drop ranks a
    non-finite weight as 0, as `drop_flags` does."""
    bits = tf.bitcast(tf.abs(tf.cast(weights, tf.float32)), tf.uint32)
    # + 2**23, wrapping: normal magnitudes from 2**24 up, in order; zero and
    # subnormals below 2**24; non-finite ones past 2**31, negative as int32.
    shifted = tf.bitcast(bits + tf.constant(1 << 23, tf.uint32), tf.int32)
    return tf.maximum(shifted, (1 << 24) - 1)


def _descending_keys(score):
    """int32 keys in descending order of a score >= 0. Every score that is
    zero, subnormal, not finite or negative gets key 0x7F000000, above all
    others: it grows last, as 0 does in `grow_flags`."""
    bits = tf.bitcast(tf.cast(score, tf.float32), tf.uint32)
    # 0x7F7FFFFF - bits, wrapping: normal scores onto [0, 0x7F000000), the
    # largest first; zero and subnormals onto [0x7F000000, 0x7F800000);
    # the others past 2**31 as unsigned. The min gathers those on one key.
    flipped = tf.constant(0x7F7FFFFF, tf.uint32) - bits
    return tf.bitcast(
        tf.minimum(flipped, tf.constant(0x7F000000, tf.uint32)), tf.int32
    )
