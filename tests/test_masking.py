"""Tests of keras_freetickets.masking: the pure-TF mask arithmetic."""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from keras_freetickets import masking
from keras_freetickets import native
from keras_freetickets import selection

SETTINGS = dict(deadline=None, max_examples=25, derandomize=True)


def reference(weights, mask, score, k, blocked=None):
    """Numpy drop-and-grow from the definition (ties to the lower index)."""
    active = np.flatnonzero(mask)
    order = active[np.argsort(np.abs(weights[active]), kind="stable")]
    kept = mask.copy()
    kept[order[:k]] = False
    candidates = np.flatnonzero(~kept)
    if blocked is None:
        blocked = np.zeros_like(mask)
    # Unblocked candidates first, each group by descending score.
    key = np.lexsort((-score[candidates], blocked[candidates]))
    new = kept.copy()
    new[candidates[key[:k]]] = True
    return new, kept


@settings(**SETTINGS)
@given(size=st.integers(4, 300), density=st.floats(0.05, 0.9),
       fraction=st.floats(0.0, 1.0), block=st.floats(0.0, 1.0),
       seed=st.integers(0, 1000), ties=st.booleans())
def test_prune_and_grow_matches_reference(size, density, fraction, block,
                                          seed, ties):
    rng = np.random.default_rng(seed)
    active = max(1, int(density * size))
    mask = np.zeros(size, bool)
    mask[rng.permutation(size)[:active]] = True
    weights = np.where(mask, rng.normal(size=size), 0).astype(np.float32)
    score = rng.random(size).astype(np.float32)
    if ties:  # many exact ties in both rankings
        weights = np.round(weights, 0)
        score = np.round(score, 1)
    blocked = rng.random(size) < block
    k = int(math.floor(fraction * active + 0.5))
    new, kept, dropped = masking.prune_and_grow(
        tf.constant(weights), tf.constant(mask), tf.constant(score),
        tf.constant(k), active, True, tf.constant(blocked))
    ref_new, ref_kept = reference(weights, mask, score, k, blocked)
    np.testing.assert_array_equal(kept.numpy(), ref_kept)
    np.testing.assert_array_equal(new.numpy(), ref_new)
    assert int(new.numpy().sum()) == active  # exact count, blocked or not
    np.testing.assert_array_equal(dropped.numpy(), mask & ~ref_kept)


def test_blocked_weights_grow_only_when_nothing_else_is_left():
    mask = np.array([1, 1, 0, 0, 0, 0], bool)
    weights = np.array([0.1, 2.0, 0, 0, 0, 0], np.float32)
    score = np.array([9, 9, 8, 7, 1, 1], np.float32)
    blocked = np.array([0, 0, 1, 1, 0, 0], bool)
    new, _, _ = masking.prune_and_grow(weights, mask, score, 1, 1, True,
                                       blocked)
    # Without the block, index 0 (score 9, just dropped) would come back.
    np.testing.assert_array_equal(new.numpy(), [1, 1, 0, 0, 0, 0])
    new, _, _ = masking.prune_and_grow(weights, mask, score, 1, 1, True,
                                       np.array([1, 0, 1, 1, 0, 0], bool))
    np.testing.assert_array_equal(new.numpy(), [0, 1, 0, 0, 1, 0])
    everything = np.array([1, 1, 1, 1, 1, 1], bool)
    new, _, _ = masking.prune_and_grow(weights, mask, score, 1, 1, True,
                                       everything)
    assert int(new.numpy().sum()) == 2  # still exact when all are blocked


def test_favour_unused_multiplies_only_never_active_scores():
    score = tf.constant([1.0, 2.0, 3.0])
    ever = tf.constant([True, False, True])
    np.testing.assert_array_equal(
        masking.favour_unused(score, ever, 0.0).numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(
        masking.favour_unused(score, ever, 4.0).numpy(), [1.0, 10.0, 3.0])


def test_unsorted_picks_equal_sorted_when_all_are_kept():
    rng = np.random.default_rng(0)
    score = tf.constant(rng.random(1000).astype(np.float32))
    a = masking.pick_largest(score, 37, 37, picks_sorted=False)
    b = masking.pick_largest(score, 37, 37, picks_sorted=True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(a.numpy().sum()) == 37


SPECIAL_VALUES = np.array(
    [0.0, -0.0, 1e-40, -1e-40, 1e-38, 0.5, -0.5, 1.0, 3.4028235e38,
     -3.4028235e38, np.inf, -np.inf, np.nan], np.float32)


@settings(**SETTINGS)
@given(size=st.integers(1, 300), density=st.floats(0.0, 1.0),
       fraction=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       special=st.booleans(), signed=st.booleans(), block=st.booleans())
def test_integer_keys_choose_what_the_top_k_code_chose(
        size, density, fraction, seed, special, signed, block):
    """`rewire_masks` on radix-sized layers (its keys folded into integer
    ops, the kept and inactive entries at the minimum key) gives the masks
    of the top_k composition, bit for bit, also with zeros of both signs,
    subnormals, extreme and non-finite weights and scores."""
    rng = np.random.default_rng(seed)
    active = int(density * size)
    mask = np.zeros(size, bool)
    mask[rng.permutation(size)[:active]] = True
    if special:
        weights = rng.choice(SPECIAL_VALUES, size)
        score = rng.choice(SPECIAL_VALUES, size)
    else:
        weights = np.round(rng.normal(size=size), 1).astype(np.float32)
        score = np.round(rng.normal(size=size), 1).astype(np.float32)
    weights = np.where(mask, weights, 0).astype(np.float32)
    if not signed:
        score = np.abs(score)
    blocked = tf.constant(rng.random(size) < 0.3) if block else None
    k = int(math.floor(fraction * active + 0.5))
    args = (tf.constant(weights), tf.constant(mask), tf.constant(score),
            tf.constant(k), active, True, blocked)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "RADIX_MIN_SIZE", 10**9)
        want_new, want_vacated = masking.rewire_masks(*args)
        patch.setattr(selection, "RADIX_MIN_SIZE", 1)
        got = []
        # TensorFlow's selection ops, and the compiled op where it is built.
        for use_op in (False, None):
            native.set_enabled(use_op)
            try:
                got += [masking.rewire_masks(*args, nonnegative) for nonnegative
                        in ((False, True) if not signed else (False,))]
            finally:
                native.set_enabled(None)
    for new, vacated in got:
        np.testing.assert_array_equal(new.numpy(), want_new.numpy())
        np.testing.assert_array_equal(vacated.numpy(), want_vacated.numpy())
    assert int(new.numpy().sum()) == active


def test_builtin_growth_rules_promise_nonnegative_scores():
    from keras_freetickets import updaters

    assert updaters.RigL.nonnegative_scores
    assert updaters.SET.nonnegative_scores
    assert not updaters.Updater.nonnegative_scores  # custom rules: general
