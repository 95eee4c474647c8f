"""`keras_freetickets.selection` chooses exactly what the top_k code chose.

The reference below is the selection `SparseOptimizer._prune_and_grow` used
(top_k of the masked score with k_max picks, the first k kept, scattered into
a bool mask). Every test compares flags bit for bit, on random inputs with
many ties, signed zeros and subnormals, for the radix path (forced on small
inputs by lowering `RADIX_MIN_SIZE`) and for the top_k fallback.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

from keras_freetickets import native, selection

NEG_INF = float("-inf")
SETTINGS = dict(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],  # a constant patch
)


def _reference(score, k, k_max, sorted_picks):
    n = score.shape[0]
    select = tf.range(k_max) < tf.minimum(k, k_max)
    _, idx = tf.math.top_k(score, k_max, sorted=sorted_picks)
    counts = tf.scatter_nd(tf.expand_dims(idx, 1), tf.cast(select, tf.int32), [n])
    return (counts > 0).numpy()


def reference_drop(weights, mask, k, k_max, sorted_picks=True):
    w = tf.reshape(tf.constant(weights), [-1])
    m = tf.reshape(tf.constant(mask), [-1])
    return _reference(tf.where(m, -tf.abs(w), NEG_INF), k, k_max, sorted_picks)


def reference_grow(score, candidates, k, k_max, sorted_picks=True):
    s = tf.reshape(tf.constant(score), [-1])
    c = tf.reshape(tf.constant(candidates), [-1])
    return _reference(tf.where(c, s, NEG_INF), k, k_max, sorted_picks)


@pytest.fixture(params=["radix", "radix_static", "top_k"])
def path(request, monkeypatch):
    if request.param.startswith("radix"):
        monkeypatch.setattr(selection, "RADIX_MIN_SIZE", 1)
    if request.param == "radix_static":
        # The shape-keeping passes XLA gets, here outside XLA.
        monkeypatch.setattr(selection.compat, "in_xla_context", lambda: True)
    return request.param


VALUE_KINDS = ("normal", "ties", "zeros", "subnormal", "huge")


def _values(rng, n, kind):
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # a handful of distinct magnitudes, both signs
        return (rng.integers(-3, 4, n) * 0.25).astype(np.float32)
    if kind == "zeros":  # +0.0 and -0.0 mixed with small values
        v = rng.choice(np.array([0.0, -0.0, 1e-3, -1e-3], np.float32), n)
        return v.astype(np.float32)
    if kind == "subnormal":
        tiny = np.float32(1e-40)
        return (rng.integers(-2, 3, n) * tiny).astype(np.float32)
    # "huge": extreme finite values (an infinite weight would tie with the
    # reference's -inf for inactive entries; weights must be finite)
    return rng.choice(
        np.array([3.4e38, -3.4e38, 3e38, 1.0], np.float32), n
    ).astype(np.float32)


@st.composite
def drop_cases(draw):
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(VALUE_KINDS))
    rng = np.random.default_rng(seed)
    num_active = draw(st.integers(0, n))
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:num_active]] = True
    weights = np.where(mask, _values(rng, n, kind), 0).astype(np.float32)
    k_max = draw(st.integers(0, num_active))
    k = draw(st.integers(0, k_max))
    return weights, mask, k, k_max


@given(drop_cases())
@settings(**SETTINGS)
def test_drop_matches_top_k(path, case):
    weights, mask, k, k_max = case
    got = selection.smallest_active_flags(
        tf.constant(weights), tf.constant(mask), tf.constant(k), k_max
    ).numpy()
    np.testing.assert_array_equal(got, reference_drop(weights, mask, k, k_max))
    assert got.sum() == k
    assert not np.any(got & ~mask)


@st.composite
def grow_cases(draw):
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(VALUE_KINDS))
    rng = np.random.default_rng(seed)
    score = np.abs(_values(rng, n, kind)).astype(np.float32)
    if draw(st.booleans()):
        score[rng.random(n) < 0.1] = np.inf  # +inf scores are allowed
    if draw(st.booleans()):  # gradients may be signed in a custom score
        score = _values(rng, n, kind)
    candidates = rng.random(n) < draw(st.floats(0.0, 1.0))
    k_max = draw(st.integers(0, n))
    k = draw(st.integers(0, k_max))
    return score, candidates, k, k_max


@given(grow_cases())
@settings(**SETTINGS)
def test_grow_matches_top_k(path, case):
    score, candidates, k, k_max = case
    got = selection.largest_flags(
        tf.constant(score), tf.constant(candidates), tf.constant(k), k_max
    ).numpy()
    np.testing.assert_array_equal(got, reference_grow(score, candidates, k, k_max))
    assert got.sum() == k
    # The same choice named by the entries to leave out (RigL's kept).
    outside = selection.largest_flags_outside(
        tf.constant(score), tf.constant(~candidates), tf.constant(k), k_max
    ).numpy()
    np.testing.assert_array_equal(outside, got)


def test_static_k_uses_unsorted_picks_with_same_result(path):
    rng = np.random.default_rng(0)
    weights = (rng.integers(-5, 6, 500) * 0.5).astype(np.float32)
    mask = rng.random(500) < 0.4
    k_max = int(mask.sum()) // 2
    got = selection.smallest_active_flags(weights, mask, k_max, k_max).numpy()
    np.testing.assert_array_equal(
        got, reference_drop(weights, mask, k_max, k_max, sorted_picks=False)
    )


def test_layer_sized_inputs_match_in_and_out_of_xla():
    # The first FMNIST-MLP v1 kernel (784 x 300) at its ERK density for
    # S = 0.8, drop fraction 0.5: above RADIX_MIN_SIZE, so the radix path.
    rng = np.random.default_rng(3)
    shape = (784, 300)
    n = 784 * 300
    assert n >= selection.RADIX_MIN_SIZE
    num_active = 38_102
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:num_active]] = True
    # Rounded, so that many magnitudes tie, and some active weights are 0.
    weights = np.where(mask, np.round(rng.standard_normal(n) * 0.05, 3), 0)
    weights = weights.astype(np.float32)
    grad = np.round(np.abs(rng.standard_normal(n)), 2).astype(np.float32)  # ties
    k_max = num_active // 2

    def both(w, m, g, k):
        dropped = selection.smallest_active_flags(w, m, k, k_max)
        kept = tf.logical_and(tf.reshape(m, [-1]), tf.logical_not(dropped))
        grown = selection.largest_flags(g, tf.logical_not(kept), k, k_max)
        return dropped, grown

    eager_fn = tf.function(both)
    xla_fn = tf.function(both, jit_compile=True)
    args = (weights.reshape(shape), mask.reshape(shape), grad.reshape(shape))
    for k in (k_max, 1234):
        expected_drop = reference_drop(weights, mask, k, k_max)
        kept = mask & ~expected_drop
        expected_grow = reference_grow(grad, ~kept, k, k_max)
        for fn in (eager_fn, xla_fn):
            dropped, grown = fn(*args, tf.constant(k))
            np.testing.assert_array_equal(dropped.numpy(), expected_drop)
            np.testing.assert_array_equal(grown.numpy(), expected_grow)
    assert xla_fn.experimental_get_tracing_count() == 1


def test_select_smallest_takes_lower_index_among_ties():
    keys = tf.constant([5, 1, 3, 1, 1, 0], tf.int32)
    np.testing.assert_array_equal(
        selection.select_smallest(keys, 3).numpy(),
        [False, True, False, True, False, True],
    )
    np.testing.assert_array_equal(
        selection.select_smallest(keys, 0).numpy(), [False] * 6
    )
    assert selection.select_smallest(keys, 99).numpy().all()


@st.composite
def int32_key_cases(draw):
    """Raw int32 keys that stress each radix digit: the extremes of the
    range (where a key minus T overflows), keys sharing their top 11 or 22
    bits with a few others, and many ties."""
    n = draw(st.integers(1, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lo, hi = -(2**31), 2**31 - 1
    base = int(rng.integers(lo, hi, endpoint=True))
    pools = [
        np.array([lo, lo + 1, -1, 0, 1, hi - 1, hi], np.int64),
        base + rng.integers(-(2**10), 2**10, 8),  # same top 22 bits, mostly
        base + rng.integers(-(2**21), 2**21, 8),  # same top 11 bits, mostly
        rng.integers(lo, hi, 8, endpoint=True),
    ]
    values = np.clip(np.concatenate(pools), lo, hi)
    keys = rng.choice(values, n).astype(np.int32)
    k = draw(st.integers(0, n + 2))
    return keys, k


def selection_paths():
    """The three ways `select_smallest` computes its flags: the static
    shapes (XLA's), the compacting TensorFlow ops, and the compiled op of
    `keras_freetickets.native` when it is built here. Yields each path's
    name with the function set up to take it."""
    yield "static", False
    native.set_enabled(False)
    try:
        yield "compacting", True
    finally:
        native.set_enabled(None)
    if native.available():
        yield "compiled", True


@given(int32_key_cases())
@settings(**SETTINGS)
def test_select_smallest_matches_a_stable_sort_on_raw_keys(case):
    keys, k = case
    expected = np.zeros(len(keys), bool)
    expected[np.argsort(keys, kind="stable")[:k]] = True
    for path, compact in selection_paths():
        got = selection.select_smallest(tf.constant(keys), k, compact=compact)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=path)


@given(int32_key_cases(), st.floats(0.0, 1.0))
@settings(**SETTINGS)
def test_after_minimum_flags_the_minimum_then_k_of_the_rest(case, share):
    keys, k = case
    # The promise: no key between the minimum and -2**31 + 2**21.
    keys = np.where(keys < -(2**31) + 2**21, -(2**31) + 2**21, keys)
    rng = np.random.default_rng(len(keys) + k)
    at_minimum = rng.random(len(keys)) < share
    keys = np.where(at_minimum, -(2**31), keys).astype(np.int32)
    expected = at_minimum.copy()
    rest = np.flatnonzero(~at_minimum)
    expected[rest[np.argsort(keys[rest], kind="stable")[:k]]] = True
    for path, compact in selection_paths():
        got = selection.select_smallest(tf.constant(keys), k, compact=compact,
                                        after_minimum=True)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=path)


def test_select_smallest_compacts_outside_xla_and_not_inside():
    keys = tf.constant(np.arange(5000, 0, -1, dtype=np.int32))

    def op_types(fn):
        # The ops of the traced graph and of the functions it calls.
        graph_def = fn.get_concrete_function(keys).graph.as_graph_def()
        types = {node.op for node in graph_def.node}
        for function in graph_def.library.function:
            types |= {node.op for node in function.node_def}
        return types

    native.set_enabled(False)
    try:
        plain = tf.function(lambda x: selection.select_smallest(x, 7))
        assert "Where" in op_types(plain)  # the gather of the keys in play
    finally:
        native.set_enabled(None)
    xla = tf.function(lambda x: selection.select_smallest(x, 7),
                      jit_compile=True)
    assert "Where" not in op_types(xla)
    assert "FtSelectSmallest" not in op_types(xla)
    np.testing.assert_array_equal(plain(keys).numpy(), xla(keys).numpy())
    assert int(tf.reduce_sum(tf.cast(xla(keys), tf.int32))) == 7
    with pytest.raises(ValueError, match="compact.*Received: compact=1"):
        selection.select_smallest(keys, 1, compact=1)


@pytest.fixture
def tensorflow_ops_only():
    native.set_enabled(False)
    yield
    native.set_enabled(None)


def test_selections_outside_xla_share_one_traced_program(tensorflow_ops_only):
    """Every compacting selection, whatever its length, calls one traced
    function (the first train step traced four copies on FMNIST-MLP v1)."""
    rng = np.random.default_rng(3)
    before = selection._compact_select.experimental_get_tracing_count()
    for n in (300, 5000):
        keys = tf.constant(rng.integers(-50, 50, n, dtype=np.int32))
        traced = tf.function(lambda x: selection.select_smallest(x, 40))
        flags = traced(keys).numpy()
        assert flags.shape == (n,)
        expected = np.zeros(n, bool)
        expected[np.argsort(keys.numpy(), kind="stable")[:40]] = True
        np.testing.assert_array_equal(flags, expected)
    assert selection._compact_select.experimental_get_tracing_count() <= max(
        before, 1
    )


def test_bad_k_max_names_argument():
    with pytest.raises(ValueError, match="k_max.*Received: k_max=5"):
        selection.smallest_active_flags(tf.zeros([4]), tf.ones([4], tf.bool), 1, 5)
    with pytest.raises(ValueError, match="k_max.*Received: k_max=1.5"):
        selection.largest_flags(tf.zeros([4]), tf.ones([4], tf.bool), 1, 1.5)


def test_radix_argument_forces_a_path_with_the_same_result():
    rng = np.random.default_rng(5)
    weights = (rng.integers(-4, 5, 400) * 0.5).astype(np.float32)
    mask = rng.random(400) < 0.5
    k_max = int(mask.sum()) // 2
    expected = reference_drop(weights, mask, 17, k_max)
    for radix in (True, False, None):
        got = selection.smallest_active_flags(weights, mask, 17, k_max, radix=radix)
        np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(ValueError, match="radix.*Received: radix='yes'"):
        selection.largest_flags(weights, mask, 1, 1, radix="yes")
