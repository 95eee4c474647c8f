"""Tests for keras_freetickets.distributions."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from keras_freetickets import distributions

DIST_NAMES = ("uniform", "er", "erk")

dims = st.integers(min_value=1, max_value=400)
shape_2d = st.tuples(dims, dims)
shape_4d = st.tuples(
    st.sampled_from([1, 3, 5]),
    st.sampled_from([1, 3, 5]),
    st.integers(1, 64),
    st.integers(1, 64),
)
shape_lists = st.lists(st.one_of(shape_2d, shape_4d), min_size=1, max_size=6)
sparsities = st.floats(min_value=0.05, max_value=0.98)


def as_shapes(shape_list):
    return {f"layer_{i}/kernel": s for i, s in enumerate(shape_list)}


def total_active(shapes, result):
    return sum(distributions.resolve_counts(shapes, result).values())


def mlp_shapes():
    return {
        "dense/kernel": (784, 300),
        "dense_1/kernel": (300, 100),
        "dense_2/kernel": (100, 10),
    }


@settings(deadline=None, max_examples=20, derandomize=True)
@given(shape_lists, sparsities, st.sampled_from(DIST_NAMES))
def test_values_in_range_and_keys_kept(shape_list, sparsity, name):
    shapes = as_shapes(shape_list)
    result = distributions.compute_sparsities(shapes, sparsity, name)
    assert list(result) == list(shapes)
    for value in result.values():
        assert isinstance(value, float)
        assert 0.0 <= value < 1.0


@settings(deadline=None, max_examples=20, derandomize=True)
@given(shape_lists, sparsities, st.sampled_from(["er", "erk"]))
def test_global_target_reached(shape_list, sparsity, name):
    shapes = as_shapes(shape_list)
    n_total = sum(math.prod(s) for s in shapes.values())
    result = distributions.compute_sparsities(shapes, sparsity, name)
    target = (1.0 - sparsity) * n_total
    # Each layer's count rounds by at most 0.5.
    assert abs(total_active(shapes, result) - target) <= 0.5 * len(shapes) + 1e-6
    # Before rounding the fit is exact.
    exact = sum((1 - result[k]) * math.prod(s) for k, s in shapes.items())
    assert exact == pytest.approx(target, rel=1e-9, abs=1e-6)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(shape_lists, sparsities)
def test_erk_density_follows_raw_score(shape_list, sparsity):
    shapes = as_shapes(shape_list)
    result = distributions.erdos_renyi_kernel(shapes, sparsity)
    score = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    for a in shapes:
        for b in shapes:
            if score[a] < score[b]:
                assert result[a] >= result[b] - 1e-12


def test_larger_square_layers_are_sparser_under_erk():
    shapes = {f"l{n}/kernel": (n, n) for n in (16, 64, 256, 1024)}
    result = distributions.erdos_renyi_kernel(shapes, 0.9)
    values = [result[k] for k in shapes]
    # Small layers may be dense (all 0.0); every sparse one is sparser than
    # the smaller layer before it.
    assert values[-1] > 0.0
    assert all(a < b or a == b == 0.0 for a, b in zip(values, values[1:]))


def test_mlp_erk_monotone_and_last_layer_dense():
    """RigL-style MLP 784-300-100-10 at S = 0.8.

    For reference (not asserted): densities come out about 0.162, 0.469 and
    1.0; the official FreeTickets run also left the 100x10 layer dense.
    """
    shapes = mlp_shapes()
    result = distributions.erdos_renyi_kernel(shapes, 0.8)
    values = [result[k] for k in shapes]
    assert values[0] > values[1] > values[2]
    assert result["dense_2/kernel"] == 0.0


def test_small_layer_made_dense_and_rest_refit():
    shapes = mlp_shapes()
    sparsity = 0.9
    result = distributions.erdos_renyi_kernel(shapes, sparsity)
    assert result["dense_2/kernel"] == 0.0
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    # Without the dense-layer rule, the small layer's density would exceed 1.
    n_total = sum(sizes.values())
    naive_eps = (1 - sparsity) * n_total / sum(sum(s) for s in shapes.values())
    assert naive_eps * sum((100, 10)) / 1000 > 1.0
    # The remaining budget is spread over the two big layers with one eps.
    budget = (1 - sparsity) * n_total - sizes["dense_2/kernel"]
    eps = budget / (sum((784, 300)) + sum((300, 100)))
    assert 1 - result["dense/kernel"] == pytest.approx(eps * 1084 / 235200)
    assert 1 - result["dense_1/kernel"] == pytest.approx(eps * 400 / 30000)


def test_hand_computed_erk_two_layers():
    shapes = {"a/kernel": (100, 50), "b/kernel": (200, 100)}
    sparsity = 0.5
    # density_l = eps * (n_in + n_out) / (n_in * n_out), so the active count
    # of layer l is eps * (n_in + n_out): eps = budget / sum of (n_in + n_out).
    eps = (1 - sparsity) * (100 * 50 + 200 * 100) / ((100 + 50) + (200 + 100))
    expected_a = 1 - eps * 150 / 5000
    expected_b = 1 - eps * 300 / 20000
    result = distributions.erdos_renyi_kernel(shapes, sparsity)
    assert result["a/kernel"] == pytest.approx(expected_a, rel=1e-12)
    assert result["b/kernel"] == pytest.approx(expected_b, rel=1e-12)


def test_hand_computed_conv_er_vs_erk():
    shapes = {"conv/kernel": (3, 3, 16, 32), "dense/kernel": (512, 10)}
    sparsity = 0.7
    n_conv, n_dense = 3 * 3 * 16 * 32, 512 * 10
    budget = (1 - sparsity) * (n_conv + n_dense)
    # ER: the conv's raw score uses only (c_in, c_out).
    er_conv, er_dense = (16 + 32) / (16 * 32), (512 + 10) / (512 * 10)
    eps = budget / (er_conv * n_conv + er_dense * n_dense)
    er = distributions.erdos_renyi(shapes, sparsity)
    assert er["conv/kernel"] == pytest.approx(1 - eps * er_conv)
    assert er["dense/kernel"] == pytest.approx(1 - eps * er_dense)
    # ERK: the kernel's spatial size adds to the sum.
    erk_conv = (3 + 3 + 16 + 32) / n_conv
    eps = budget / (erk_conv * n_conv + er_dense * n_dense)
    erk = distributions.erdos_renyi_kernel(shapes, sparsity)
    assert erk["conv/kernel"] == pytest.approx(1 - eps * erk_conv)
    assert er["conv/kernel"] != pytest.approx(erk["conv/kernel"])


@settings(deadline=None, max_examples=20, derandomize=True)
@given(st.lists(shape_2d, min_size=1, max_size=6), sparsities)
def test_er_equals_erk_for_2d(shape_list, sparsity):
    shapes = as_shapes(shape_list)
    er = distributions.erdos_renyi(shapes, sparsity)
    erk = distributions.erdos_renyi_kernel(shapes, sparsity)
    for key in shapes:
        assert er[key] == pytest.approx(erk[key], abs=1e-12)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(shape_lists, sparsities)
def test_uniform_exact(shape_list, sparsity):
    shapes = as_shapes(shape_list)
    result = distributions.uniform(shapes, sparsity)
    assert result == {k: sparsity for k in shapes}


def test_uniform_overrides():
    shapes = mlp_shapes()
    result = distributions.uniform(shapes, 0.8, overrides={"dense_2/kernel": 0.1})
    assert result == {
        "dense/kernel": 0.8,
        "dense_1/kernel": 0.8,
        "dense_2/kernel": 0.1,
    }


@settings(deadline=None, max_examples=20, derandomize=True)
@given(
    st.lists(st.one_of(shape_2d, shape_4d), min_size=2, max_size=6),
    st.floats(0.3, 0.9),
    st.floats(0.0, 0.95),
    st.sampled_from(["er", "erk"]),
)
def test_overrides_respected_and_rest_compensate(
    shape_list, sparsity, override, name
):
    shapes = as_shapes(shape_list)
    first = next(iter(shapes))
    overrides = {first: override}
    try:
        result = distributions.compute_sparsities(
            shapes, sparsity, name, overrides=overrides
        )
    except ValueError as e:
        # Only an infeasible budget may refuse.
        assert "cannot be reached" in str(e)
        return
    assert result[first] == override
    n_total = sum(math.prod(s) for s in shapes.values())
    exact = sum((1 - result[k]) * math.prod(s) for k, s in shapes.items())
    assert exact == pytest.approx((1 - sparsity) * n_total, rel=1e-9, abs=1e-6)


def test_override_dense_layer_makes_others_sparser():
    shapes = mlp_shapes()
    base = distributions.erdos_renyi_kernel(shapes, 0.8)
    result = distributions.erdos_renyi_kernel(
        shapes, 0.8, overrides={"dense_1/kernel": 0.0}
    )
    assert result["dense_1/kernel"] == 0.0
    assert result["dense/kernel"] > base["dense/kernel"]


def test_sparsity_zero_is_dense():
    shapes = mlp_shapes()
    for name in DIST_NAMES:
        result = distributions.compute_sparsities(shapes, 0.0, name)
        assert all(v == 0.0 for v in result.values())


def test_all_overridden_returns_overrides():
    shapes = {"a/kernel": (10, 10), "b/kernel": (20, 20)}
    overrides = {"a/kernel": 0.3, "b/kernel": 0.6}
    result = distributions.erdos_renyi_kernel(shapes, 0.5, overrides=overrides)
    assert result == overrides


def test_infeasible_overrides_raise():
    shapes = {"a/kernel": (100, 100), "b/kernel": (10, 10)}
    # The big layer alone already holds more than the global budget.
    with pytest.raises(ValueError, match="cannot be reached"):
        distributions.erdos_renyi_kernel(shapes, 0.9, overrides={"a/kernel": 0.5})
    # The big layer is so sparse that the small one cannot make up for it.
    with pytest.raises(ValueError, match="cannot be reached"):
        distributions.erdos_renyi_kernel(shapes, 0.1, overrides={"a/kernel": 0.9})


def test_power_scale_zero_is_uniform():
    shapes = mlp_shapes()
    result = distributions.erdos_renyi_kernel(shapes, 0.7, power_scale=0.0)
    for value in result.values():
        assert value == pytest.approx(0.7)


def test_active_count_rounding():
    assert distributions.active_count(1000, 0.8) == 200
    assert distributions.active_count(10, 0.25) == 8  # 7.5 rounds up
    assert distributions.active_count(10, 0.35) == 7  # 6.5 rounds up
    assert distributions.active_count(10, 0.0) == 10
    assert distributions.active_count(3, 0.9) == 0
    for n in range(1, 50):
        for s in (0.1, 0.33, 0.5, 0.9):
            assert distributions.active_count(n, s) == int(
                math.floor((1 - s) * n + 0.5)
            )


def test_resolve_counts():
    shapes = mlp_shapes()
    result = distributions.erdos_renyi_kernel(shapes, 0.8)
    counts = distributions.resolve_counts(shapes, result)
    assert list(counts) == list(shapes)
    assert counts["dense_2/kernel"] == 1000
    for key, shape in shapes.items():
        assert counts[key] == distributions.active_count(
            math.prod(shape), result[key]
        )
    with pytest.raises(ValueError, match="same keys"):
        distributions.resolve_counts(shapes, {"dense/kernel": 0.5})


def test_registry_and_callable():
    assert distributions.get("erk") is distributions.erdos_renyi_kernel
    assert distributions.get("er") is distributions.erdos_renyi
    assert distributions.get("uniform") is distributions.uniform
    with pytest.raises(ValueError) as info:
        distributions.get("foo")
    assert str(info.value) == (
        "Argument `distribution` must be one of ['er', 'erk', 'uniform'] or "
        "a callable. Received: distribution='foo'"
    )

    def half(shapes, sparsity, overrides=None):
        return {k: sparsity / 2 for k in shapes}

    shapes = mlp_shapes()
    assert distributions.compute_sparsities(shapes, 0.6, half) == {
        k: 0.3 for k in shapes
    }
    distributions.register("test_half", half)
    try:
        assert distributions.get("test_half") is half
        assert distributions.compute_sparsities(shapes, 0.6, "test_half") == {
            k: 0.3 for k in shapes
        }
    finally:
        distributions._REGISTRY.pop("test_half")

    def broken(shapes, sparsity, overrides=None):
        return {k: 1.0 for k in shapes}

    with pytest.raises(ValueError, match=r"sparsities in \[0, 1\)"):
        distributions.compute_sparsities(shapes, 0.6, broken)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "0.5", None, True])
@pytest.mark.parametrize("name", DIST_NAMES)
def test_bad_sparsity(bad, name):
    with pytest.raises(ValueError, match=r"Argument `sparsity` must be in \[0, 1\)"):
        distributions.compute_sparsities(mlp_shapes(), bad, name)


def test_bad_shapes_and_overrides():
    with pytest.raises(ValueError, match="no prunable weights"):
        distributions.erdos_renyi_kernel({}, 0.5)
    with pytest.raises(ValueError, match="positive ints"):
        distributions.uniform({"a/kernel": (0, 3)}, 0.5)
    with pytest.raises(ValueError, match="rank >= 2"):
        distributions.erdos_renyi({"a/kernel": (5,)}, 0.5)
    with pytest.raises(ValueError, match=r"overrides\['dense/kernel'\]=1.0"):
        distributions.uniform(mlp_shapes(), 0.5, overrides={"dense/kernel": 1.0})
    with pytest.raises(ValueError, match="not one of the prunable weights"):
        distributions.uniform(mlp_shapes(), 0.5, overrides={"nope/kernel": 0.1})
    with pytest.raises(ValueError, match="power_scale"):
        distributions.erdos_renyi_kernel(mlp_shapes(), 0.5, power_scale=-1)
