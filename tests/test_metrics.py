"""Tests of keras_freetickets.metrics against hand-computed cases and scikit-learn."""

import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_freetickets import metrics

HYPOTHESIS = settings(deadline=None, max_examples=20, derandomize=True)


def _random_probs(rng, shape):
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def _two_class(p_first):
    """(N, 2) probabilities whose first column is `p_first`."""
    p_first = np.asarray(p_first, dtype=np.float64)
    return np.stack([p_first, 1.0 - p_first], axis=1)


def test_module_does_not_import_tensorflow():
    # Importing the metrics must not pull in TensorFlow (pure numpy module).
    import os
    import pathlib
    import subprocess

    code = (
        "import sys, keras_freetickets.metrics; "
        "sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    root = str(pathlib.Path(metrics.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode()


# ------------------------------------------------------------------ accuracy


def test_accuracy_hand_case():
    labels = np.array([0, 1, 2, 1])
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    )
    assert metrics.accuracy(labels, probs) == pytest.approx(0.5)


def test_accuracy_matches_direct_count():
    rng = np.random.default_rng(3)
    probs = _random_probs(rng, (200, 5))
    labels = rng.integers(0, 5, size=200)
    expected = sum(int(np.argmax(p) == y) for p, y in zip(probs, labels)) / 200
    assert metrics.accuracy(labels, probs) == pytest.approx(expected)


# ------------------------------------------------------------------ NLL, Brier, entropy


@pytest.mark.parametrize("num_classes", [2, 10])
def test_nll_of_uniform_is_log_num_classes(num_classes):
    probs = np.full((7, num_classes), 1.0 / num_classes)
    labels = np.arange(7) % num_classes
    assert metrics.negative_log_likelihood(labels, probs) == pytest.approx(
        math.log(num_classes)
    )


def test_nll_hand_case_and_eps_clipping():
    labels = np.array([0, 1])
    probs = np.array([[0.25, 0.75], [0.5, 0.5]])
    expected = -(math.log(0.25) + math.log(0.5)) / 2
    assert metrics.negative_log_likelihood(labels, probs) == pytest.approx(expected)
    # A zero probability on the true class costs -log(eps), not infinity.
    zero = np.array([[0.0, 1.0]])
    assert metrics.negative_log_likelihood(np.array([0]), zero, eps=1e-6) == (
        pytest.approx(-math.log(1e-6))
    )


def test_brier_of_one_hot_is_zero_and_hand_case():
    labels = np.array([2, 0, 1])
    one_hot = np.eye(3)[labels]
    assert metrics.brier_score(labels, one_hot) == 0.0
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    # Example 0 (label 0): 0.25 + 0.25; example 1 (label 0): 0.64 + 0.64.
    assert metrics.brier_score(np.array([0, 0]), probs) == pytest.approx((0.5 + 1.28) / 2)


def test_predictive_entropy():
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    entropy = metrics.predictive_entropy(probs)
    np.testing.assert_allclose(entropy, [math.log(2), 0.0, math.log(3)], atol=1e-12)


def test_mutual_information():
    # Members that fully disagree: entropy of the mean is log 2, members have 0.
    members = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    mi = metrics.mutual_information(members)
    np.testing.assert_allclose(mi, [math.log(2), 0.0], atol=1e-12)
    rng = np.random.default_rng(0)
    members = _random_probs(rng, (4, 30, 6))
    mean = members.mean(axis=0)
    entropy = lambda p: -np.sum(p * np.log(p), axis=-1)  # noqa: E731
    expected = entropy(mean) - entropy(members).mean(axis=0)
    np.testing.assert_allclose(metrics.mutual_information(members), expected, atol=1e-12)
    assert np.all(metrics.mutual_information(members) >= 0)


# ------------------------------------------------------------------ calibration


def test_ece_of_perfect_classifier_is_zero():
    labels = np.array([0, 1, 2, 2])
    assert metrics.expected_calibration_error(labels, np.eye(3)[labels]) == 0.0


def test_ece_two_bin_hand_case():
    # With 2 bins: bin 0 = (0, 0.5], bin 1 = (0.5, 1]; a confidence of exactly
    # 0.5 belongs to bin 0.
    probs = _two_class([0.5, 0.5, 0.9, 0.9, 0.9, 0.7])
    labels = np.array([0, 0, 0, 0, 1, 0])
    # argmax picks class 0 on ties, so bin 0 holds 2 examples: conf 0.5, acc 1.
    # Bin 1 holds 4: mean conf (0.9 * 3 + 0.7) / 4 = 0.85, accuracy 3/4.
    expected = 2 / 6 * abs(1.0 - 0.5) + 4 / 6 * abs(0.75 - 0.85)
    ece = metrics.expected_calibration_error(labels, probs, num_bins=2)
    assert ece == pytest.approx(expected)
    assert ece == pytest.approx(1.4 / 6)


def test_ece_matches_loop_computation():
    rng = np.random.default_rng(1)
    probs = _random_probs(rng, (300, 4))
    labels = rng.integers(0, 4, size=300)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            expected += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(expected)


def test_reliability_curve():
    probs = _two_class([0.55, 0.65, 0.95, 0.91])
    labels = np.array([0, 1, 0, 0])
    conf, acc, count = metrics.reliability_curve(labels, probs, num_bins=5)
    # Bins: (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1].
    np.testing.assert_array_equal(count, [0, 0, 1, 1, 2])
    np.testing.assert_allclose(conf[2:], [0.55, 0.65, 0.93])
    np.testing.assert_allclose(acc[2:], [1.0, 0.0, 1.0])
    assert np.isnan(conf[0]) and np.isnan(acc[1])
    assert count.dtype == np.int64 and count.sum() == 4


# ------------------------------------------------------------------ OOD


def test_ood_scores():
    probs = np.array([[0.9, 0.1], [0.5, 0.5]])
    np.testing.assert_allclose(metrics.ood_scores(probs), [0.9, 0.5])
    entropy = metrics.predictive_entropy(probs)
    np.testing.assert_allclose(metrics.ood_scores(probs, score="entropy"), -entropy)


def test_ood_auroc_and_aupr_hand_cases():
    in_probs = _two_class([0.9, 0.8])
    out_probs = _two_class([0.5, 0.8])
    # Pairs (in > out): 0.9 > both, 0.8 > 0.5, 0.8 = 0.8 counts one half.
    assert metrics.ood_auroc(in_probs, out_probs) == pytest.approx(3.5 / 4)
    # Perfect separation and the reverse.
    assert metrics.ood_auroc(in_probs, _two_class([0.5, 0.6])) == 1.0
    assert metrics.ood_auroc(_two_class([0.5, 0.6]), in_probs) == 0.0
    in_probs = _two_class([0.9, 0.6])
    out_probs = _two_class([0.7])
    assert metrics.ood_aupr(in_probs, out_probs) == pytest.approx(0.5 + 0.5 * 2 / 3)


@st.composite
def _tied_score_sets(draw):
    # Max-probabilities from a small grid, so that scores tie often.
    grid = st.integers(min_value=5, max_value=9)
    num_in = draw(st.integers(min_value=1, max_value=25))
    num_out = draw(st.integers(min_value=1, max_value=25))
    in_p = [draw(grid) / 10 for _ in range(num_in)]
    out_p = [draw(grid) / 10 for _ in range(num_out)]
    return _two_class(in_p), _two_class(out_p)


@HYPOTHESIS
@given(_tied_score_sets(), st.sampled_from(metrics.OOD_SCORES))
def test_ood_auroc_aupr_match_sklearn(score_sets, score):
    sk = pytest.importorskip("sklearn.metrics")
    in_probs, out_probs = score_sets
    scores = np.concatenate(
        [metrics.ood_scores(in_probs, score), metrics.ood_scores(out_probs, score)]
    )
    is_in = np.concatenate([np.ones(len(in_probs)), np.zeros(len(out_probs))])
    assert metrics.ood_auroc(in_probs, out_probs, score) == pytest.approx(
        sk.roc_auc_score(is_in, scores), abs=1e-12
    )
    assert metrics.ood_aupr(in_probs, out_probs, score) == pytest.approx(
        sk.average_precision_score(is_in, scores), abs=1e-12
    )


def test_ood_auroc_aupr_match_sklearn_on_many_classes():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    in_probs = _random_probs(rng, (400, 10))
    out_probs = _random_probs(rng, (300, 10))
    # Sharpen the in-distribution predictions so the sets differ.
    in_probs = in_probs**3 / np.sum(in_probs**3, axis=1, keepdims=True)
    for score in metrics.OOD_SCORES:
        scores = np.concatenate(
            [metrics.ood_scores(in_probs, score), metrics.ood_scores(out_probs, score)]
        )
        is_in = np.r_[np.ones(400), np.zeros(300)]
        auroc = metrics.ood_auroc(in_probs, out_probs, score)
        assert auroc == pytest.approx(sk.roc_auc_score(is_in, scores), abs=1e-12)
        assert auroc > 0.6
        assert metrics.ood_aupr(in_probs, out_probs, score) == pytest.approx(
            sk.average_precision_score(is_in, scores), abs=1e-12
        )


# ------------------------------------------------------------------ diversity


def test_disagreement():
    rng = np.random.default_rng(0)
    member = _random_probs(rng, (50, 4))
    assert metrics.disagreement(np.stack([member, member, member])) == 0.0
    # Predicted classes: m0 = [0, 1, 1, 0], m1 = [0, 0, 1, 1], m2 = [1, 1, 1, 0].
    # Pairs: (0, 1) differ on 2/4, (0, 2) on 1/4, (1, 2) on 3/4 -> mean 1/2.
    members = np.stack(
        [
            _two_class([0.9, 0.2, 0.3, 0.6]),
            _two_class([0.8, 0.7, 0.1, 0.4]),
            _two_class([0.3, 0.4, 0.2, 0.8]),
        ]
    )
    assert metrics.disagreement(members) == pytest.approx(0.5)
    assert metrics.disagreement(members[:2]) == pytest.approx(0.5)
    assert metrics.disagreement(members[1:]) == pytest.approx(0.75)


def test_kl_divergence():
    rng = np.random.default_rng(0)
    member = _random_probs(rng, (20, 3))
    assert metrics.kl_divergence(np.stack([member, member])) == pytest.approx(0.0, abs=1e-12)
    # One example, two classes: p = (0.5, 0.5), q = (0.9, 0.1).
    p, q = 0.5, 0.9
    kl_pq = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    kl_qp = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    members = np.stack([_two_class([p]), _two_class([q])])
    assert metrics.kl_divergence(members) == pytest.approx((kl_pq + kl_qp) / 2)
    # Three members: the mean over the six ordered pairs, against a loop.
    members = _random_probs(rng, (3, 15, 4))
    pairs = [
        np.mean(np.sum(members[i] * np.log(members[i] / members[j]), axis=1))
        for i in range(3)
        for j in range(3)
        if i != j
    ]
    assert metrics.kl_divergence(members) == pytest.approx(np.mean(pairs))


@pytest.mark.parametrize("fn", [metrics.disagreement, metrics.kl_divergence])
def test_pairwise_measures_need_two_members(fn):
    with pytest.raises(ValueError, match="at least 2 members"):
        fn(np.full((1, 3, 2), 0.5))


# ------------------------------------------------------------------ report, table


def test_report():
    rng = np.random.default_rng(0)
    members = _random_probs(rng, (3, 60, 5))
    labels = rng.integers(0, 5, size=60)
    ood = {"digits": _random_probs(rng, (3, 40, 5)), "noise": _random_probs(rng, (3, 10, 5))}
    result = metrics.report(labels, members, ood)
    ensemble_probs = members.mean(axis=0)
    ens = result["ensemble"]
    assert ens["accuracy"] == pytest.approx(metrics.accuracy(labels, ensemble_probs))
    assert ens["nll"] == pytest.approx(metrics.negative_log_likelihood(labels, ensemble_probs))
    assert ens["ece"] == pytest.approx(
        metrics.expected_calibration_error(labels, ensemble_probs)
    )
    assert ens["brier"] == pytest.approx(metrics.brier_score(labels, ensemble_probs))
    assert ens["auroc_digits"] == pytest.approx(
        metrics.ood_auroc(ensemble_probs, ood["digits"].mean(axis=0))
    )
    assert ens["aupr_noise"] == pytest.approx(
        metrics.ood_aupr(ensemble_probs, ood["noise"].mean(axis=0))
    )
    assert len(result["members"]) == 3
    assert result["members"][1]["nll"] == pytest.approx(
        metrics.negative_log_likelihood(labels, members[1])
    )
    assert result["members"][2]["auroc_noise"] == pytest.approx(
        metrics.ood_auroc(members[2], ood["noise"][2])
    )
    assert result["disagreement"] == pytest.approx(metrics.disagreement(members))
    assert result["kl_divergence"] == pytest.approx(metrics.kl_divergence(members))
    assert result["mutual_information"] == pytest.approx(
        float(np.mean(metrics.mutual_information(members)))
    )


def test_report_single_model():
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, (30, 4))
    labels = rng.integers(0, 4, size=30)
    result = metrics.report(labels, probs, {"noise": _random_probs(rng, (9, 4))})
    assert result["disagreement"] is None and result["kl_divergence"] is None
    assert result["ensemble"] == result["members"][0]
    assert result["ensemble"]["accuracy"] == pytest.approx(metrics.accuracy(labels, probs))


def test_report_rejects_mismatched_ood_members():
    rng = np.random.default_rng(0)
    members = _random_probs(rng, (3, 10, 4))
    labels = rng.integers(0, 4, size=10)
    with pytest.raises(ValueError, match=r"ood_member_probs\['noise'\]"):
        metrics.report(labels, members, {"noise": _random_probs(rng, (2, 10, 4))})


def test_format_table():
    rows = {
        "dense": {"accuracy": 0.89712, "nll": 0.2936, "flops": 1.5e9, "note": None},
        "EDST Ensemble M=3": {"accuracy": 0.8789, "nll": 0.329, "members": [1, 2]},
    }
    table = metrics.format_table(rows)
    lines = table.split("\n")
    assert len(lines) == 4
    assert len({len(line) for line in lines[:2]}) == 1  # Header and rule align.
    header = lines[0].split()
    assert header == ["accuracy", "nll", "flops", "note"]  # List values skipped.
    assert lines[2].split() == ["dense", "0.8971", "0.2936", "1.5e+09", "-"]
    assert lines[3].startswith("EDST Ensemble M=3")
    assert lines[3].split()[-4:] == ["0.8789", "0.3290", "-", "-"]
    # Values end at the right edge of their column.
    assert lines[2].index("0.2936") + 6 == lines[3].index("0.3290") + 6
    table = metrics.format_table(rows, columns=["nll"], precision=2)
    assert table.split("\n")[2].split() == ["dense", "0.29"]
    with pytest.raises(ValueError, match="Argument `rows`"):
        metrics.format_table({"dense": 0.9})


# ------------------------------------------------------------------ validation


def test_shape_mismatch_names_both_shapes():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"labels\.shape=\(5,\), probs\.shape=\(4, 3\)"):
        metrics.accuracy(np.zeros(5, dtype=int), probs)
    with pytest.raises(ValueError, match=r"in_probs\.shape=\(4, 3\), out_probs\.shape=\(2, 2\)"):
        metrics.ood_auroc(probs, np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"probs\.shape=\(12,\)"):
        metrics.predictive_entropy(probs.reshape(-1))


def test_rows_must_sum_to_one():
    probs = np.array([[0.5, 0.5], [0.6, 0.6]])
    message = (
        r"Argument `probs` must hold probabilities: rows must sum to 1 .*"
        r"row 1 sums to 1\.2"
    )
    with pytest.raises(ValueError, match=message):
        metrics.negative_log_likelihood(np.array([0, 1]), probs)
    # Within the 1e-3 tolerance is accepted (float32 softmax outputs).
    ok = np.array([[0.5, 0.5005]], dtype=np.float32)
    assert metrics.accuracy(np.array([1]), ok) == 1.0
    members = np.stack([np.full((2, 2), 0.5), probs])
    with pytest.raises(ValueError, match="member 1, row 1 sums to 1.2"):
        metrics.disagreement(members)


def test_negative_and_non_finite_probabilities():
    with pytest.raises(ValueError, match="values must be >= 0"):
        metrics.brier_score(np.array([0]), np.array([[1.1, -0.1]]))
    with pytest.raises(ValueError, match="finite"):
        metrics.predictive_entropy(np.array([[np.nan, 1.0]]))


def test_labels_out_of_range_and_wrong_dtype():
    probs = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\).*labels\[2\]=4"):
        metrics.accuracy(np.array([0, 1, 4]), probs)
    with pytest.raises(ValueError, match=r"labels\[0\]=-1"):
        metrics.expected_calibration_error(np.array([-1, 1, 2]), probs)
    with pytest.raises(ValueError, match="integer class ids"):
        metrics.accuracy(np.array([0.0, 1.0, 2.0]), probs)


def test_argument_validation():
    probs = np.full((2, 2), 0.5)
    labels = np.array([0, 1])
    with pytest.raises(ValueError, match=r"Argument `score` must be one of .*score='logit'"):
        metrics.ood_auroc(probs, probs, score="logit")
    message = r"Argument `num_bins` must be an integer >= 1\. Received: num_bins=0"
    with pytest.raises(ValueError, match=message):
        metrics.expected_calibration_error(labels, probs, num_bins=0)
    with pytest.raises(ValueError, match=r"Argument `eps` must be in \(0, 1\)"):
        metrics.negative_log_likelihood(labels, probs, eps=0.0)
    with pytest.raises(ValueError, match=r"member_probs\.shape=\(2, 2\)"):
        metrics.mutual_information(probs)
