"""`keras_freetickets._validation`: numpy scalars pass, bools and NaN do not."""

import numpy as np
import pytest

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.float64(1.0),
                                   np.float16(0.25), np.int64(1)])
def test_check_fraction_accepts_python_and_numpy_numbers(value):
    check_fraction("sparsity", value)


@pytest.mark.parametrize("value", [0.0, 1.5, np.float32(-0.1), float("nan"),
                                   np.float32("nan"), True, np.bool_(True), "0.5",
                                   None])
def test_check_fraction_rejects_with_name_and_value(value):
    with pytest.raises(ValueError, match=r"Argument `sparsity` must be in \(0, 1\]"
                       r"\. Received: sparsity=") as info:
        check_fraction("sparsity", value)
    assert repr(value) in str(info.value)


def test_check_fraction_allow_zero_is_half_open():
    check_fraction("s", np.float32(0.0), allow_zero=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_fraction("s", np.float32(1.0), allow_zero=True)


@pytest.mark.parametrize("value", [3, np.int32(3), np.int64(7), np.uint8(5)])
def test_check_int_accepts_numpy_integers(value):
    check_int("update_interval", value, 1)


@pytest.mark.parametrize("value", [0, np.int64(0), 2.0, np.float32(2), True,
                                   np.bool_(True), "3"])
def test_check_int_rejects_with_name_and_value(value):
    with pytest.raises(ValueError, match="Argument `update_interval` must be an "
                       "integer >= 1. Received: update_interval="):
        check_int("update_interval", value, 1)


# The entry points that now share these checks accept numpy scalars and give
# the same results as with Python scalars; they refuse numpy bools and NaN
# with the argument's name and value.

def _probs(rng, n, c):
    logits = rng.normal(size=(n, c)) * 3.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_metrics_accept_numpy_scalars():
    from keras_freetickets import metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=50)
    probs = _probs(rng, 50, 4)
    members = np.stack([probs, _probs(rng, 50, 4)])
    assert metrics.negative_log_likelihood(labels, probs, eps=np.float32(1e-6)) \
        == metrics.negative_log_likelihood(labels, probs, eps=1e-6)
    assert metrics.expected_calibration_error(labels, probs, np.int64(7)) \
        == metrics.expected_calibration_error(labels, probs, 7)
    curve = metrics.reliability_curve(labels, probs, num_bins=np.uint8(5))
    assert len(curve[0]) == 5
    assert metrics.kl_divergence(members, eps=np.float64(1e-9)) \
        == metrics.kl_divergence(members, eps=1e-9)
    assert metrics.format_table({"a": {"x": 0.123456}}, precision=np.int64(2)) \
        == metrics.format_table({"a": {"x": 0.123456}}, precision=2)
    np.testing.assert_array_equal(
        metrics.ood_scores(probs, np.str_("entropy")),
        metrics.ood_scores(probs, "entropy"))


def test_metrics_reject_numpy_bools_and_nan_with_name_and_value():
    from keras_freetickets import metrics

    labels, probs = np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"Argument `num_bins` must be an "
                       r"integer >= 1\. Received: num_bins=(np\.)?True"):
        metrics.expected_calibration_error(labels, probs, np.bool_(True))
    with pytest.raises(ValueError, match=r"Argument `eps` must be in \(0, 1\)\. "
                       r"Received: eps=(np\.float32\()?nan"):
        metrics.negative_log_likelihood(labels, probs, eps=np.float32("nan"))


def test_flops_accept_numpy_scalars():
    from keras_freetickets import flops

    assert flops.training_flops(
        np.float32(20.0), np.float64(100.0), num_steps=np.int64(10),
        num_update_steps=np.int32(1), batch_size=np.uint8(2)) == 1360.0
    assert flops.ensemble_training_flops(
        "dense_ensemble", np.float32(100.0), steps=np.int64(10),
        batch_size=np.int16(1), num_members=np.int64(3)) == 9000.0
    assert flops.relative_training_flops(
        np.str_("dst"), 100.0, np.float32(20.0), steps=np.int64(100)) \
        == pytest.approx(0.2)


def test_flops_reject_numpy_bools_and_nan_with_name_and_value():
    from keras_freetickets import flops

    with pytest.raises(ValueError, match=r"Argument `batch_size` must be an "
                       r"integer >= 1\. Received: batch_size="):
        flops.training_flops(1.0, 1.0, 1, 0, np.bool_(True))
    with pytest.raises(ValueError, match=r"Argument `f_sparse` must be a finite "
                       r"number >= 0\. Received: f_sparse="):
        flops.training_flops(np.float64("nan"), 1.0, 1, 0, 1)


def test_plots_accept_numpy_scalars():
    pytest.importorskip("matplotlib")
    from keras_freetickets.contrib import plots

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    probs = _probs(rng, 60, 4)
    figure = plots.reliability_diagram(labels, {"m": probs}, num_bins=np.int64(6))
    assert len(figure.axes) == 1
    figure = plots.ood_score_histograms(
        {"m": probs}, {"m": {"noise": _probs(rng, 30, 4)}}, bins=np.int32(8))
    assert len(figure.axes) == 1
    figure = plots.layer_density_bars(
        {"target": {"d/kernel": np.float32(0.25)}, "member": {"d/kernel": np.float64(1.0)}})
    assert len(figure.axes) == 1


def test_plots_reject_numpy_bools_and_strings_with_name_and_value():
    pytest.importorskip("matplotlib")
    from keras_freetickets.contrib import plots

    labels, probs = np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"Argument `num_bins` must be an "
                       r"integer >= 1\. Received: num_bins="):
        plots.reliability_diagram(labels, probs, num_bins=np.bool_(True))
    with pytest.raises(ValueError, match=r"Argument `densities\['a'\]\['x'\]` "
                       r"must be in \[0, 1\]\. Received: densities\['a'\]\['x'\]='0.5'"):
        plots.layer_density_bars({"a": {"x": "0.5"}})


def test_other_entry_points_accept_numpy_scalars():
    import tensorflow as tf

    from keras_freetickets import distributions
    from keras_freetickets import members
    from keras_freetickets import selection

    assert distributions.active_count(np.int64(1000), np.float32(0.8)) == 200
    assert members.member_path("d", np.int64(2)).endswith("member_2.kftm")
    flags = selection.largest_flags(
        tf.constant([0.2, 0.9, 0.9, 0.1]), tf.constant([True, False, True, True]),
        2, np.int64(2), radix=np.bool_(True))
    assert flags.numpy().tolist() == [True, False, True, False]
