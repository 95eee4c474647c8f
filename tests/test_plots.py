"""Tests of keras_freetickets.contrib.plots: what is drawn, the PNGs, argument checks."""

import sys

import numpy as np
import pytest

from keras_freetickets import metrics, plots

matplotlib_image = pytest.importorskip("matplotlib.image")


def _probs(rng, n, c, sharp=3.0):
    logits = rng.normal(size=(n, c)) * sharp
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=400)
    return labels, _probs(rng, 400, 10), _probs(rng, 400, 10, sharp=1.0), rng


def _read_png(path):
    image = matplotlib_image.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def test_module_imports_no_matplotlib_until_used():
    # Importing the module must not import matplotlib (lazy import).
    import subprocess

    code = ("import sys, keras_freetickets.contrib.plots; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


def test_reliability_bars_are_the_bin_accuracies(data, tmp_path):
    labels, a, b, _ = data
    path = tmp_path / "rel.png"
    figure = plots.reliability_diagram(labels, {"a": a, "b": b}, num_bins=10,
                                       path=path, title="t")
    assert len(figure.axes) == 2
    for ax, probs in zip(figure.axes, (a, b)):
        _, accuracy, count = metrics.reliability_curve(labels, probs, 10)
        bars = [p for p in ax.patches if p.get_gid() == "accuracy"]
        assert len(bars) == int(np.count_nonzero(count))
        np.testing.assert_allclose(
            [bar.get_height() for bar in bars], accuracy[count > 0]
        )
        ece = metrics.expected_calibration_error(labels, probs, 10)
        assert f"{ece:.4f}" in ax.get_title()
    image = _read_png(path)
    assert image.shape[1] > image.shape[0]  # two panels side by side


def test_reliability_rejects_mismatched_rows(data):
    labels, a, _, _ = data
    with pytest.raises(ValueError, match="one row per label"):
        plots.reliability_diagram(labels[:10], {"a": a})
    with pytest.raises(ValueError, match="num_bins"):
        plots.reliability_diagram(labels, a, num_bins=0)


def test_ood_histograms_legend_has_auroc(data, tmp_path):
    labels, a, b, rng = data
    ood = {"digits": _probs(rng, 100, 10, 0.5), "noise": _probs(rng, 50, 10, 0.2)}
    path = tmp_path / "ood.png"
    figure = plots.ood_score_histograms({"m": a}, {"m": ood}, bins=20,
                                        path=path)
    (ax,) = figure.axes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    auroc = metrics.ood_auroc(a, ood["digits"])
    assert f"digits (AUROC {auroc:.3f})" in texts
    assert len(texts) == 3
    _read_png(path)
    with pytest.raises(ValueError, match="same model names"):
        plots.ood_score_histograms({"m": a}, {"other": ood})


def test_layer_density_bars(tmp_path):
    series = {
        "ERK target": {"seq/dense/kernel": 0.1, "seq/dense_1/kernel": 0.5},
        "member 0": {"seq/dense/kernel": 0.12, "seq/dense_1/kernel": 0.48},
    }
    path = tmp_path / "density.png"
    figure = plots.layer_density_bars(
        series, reference=0.2, path=path,
        layer_notes={"seq/dense_1/kernel": "300x100"})
    (ax,) = figure.axes
    for name, values in series.items():
        heights = [p.get_height() for p in ax.patches if p.get_gid() == name]
        assert heights == pytest.approx(list(values.values()))
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "dense", "dense_1\n300x100"]
    _read_png(path)
    with pytest.raises(ValueError, match="cover the layers"):
        plots.layer_density_bars({"a": {"x": 0.1}, "b": {"y": 0.1}})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        plots.layer_density_bars({"a": {"x": 1.5}})


def test_mask_overlap_heatmap(tmp_path):
    matrix = np.array([[1.0, 0.3, 0.25], [0.3, 1.0, 0.7], [0.25, 0.7, 1.0]])
    path = tmp_path / "overlap.png"
    figure = plots.mask_overlap_heatmap(matrix, ["a", "b", "c"], path=path,
                                        reference=0.2)
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), matrix)
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(f"{v:.2f}" for v in matrix.ravel())
    _read_png(path)
    with pytest.raises(ValueError, match="square"):
        plots.mask_overlap_heatmap(np.ones((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        plots.mask_overlap_heatmap(matrix, ["a"])


def test_metric_vs_flops(tmp_path):
    curves = {
        "dense": {"flops": [1.0], "accuracy": [0.89], "nll": [0.30]},
        "EDST": {"flops": [0.01, 0.015, 0.02], "accuracy": [0.86, 0.87, 0.875],
                 "nll": [0.36, 0.35, 0.34]},
    }
    path = tmp_path / "flops.png"
    figure = plots.metric_vs_flops(curves, path=path)
    acc_ax, nll_ax = figure.axes
    assert acc_ax.get_xscale() == "log"  # the FLOPs span a factor of 100
    lines = {line.get_label(): line for line in nll_ax.get_lines()}
    np.testing.assert_allclose(lines["EDST"].get_ydata(), [0.36, 0.35, 0.34])
    _read_png(path)
    linear = plots.metric_vs_flops({"a": {"flops": [1, 2], "accuracy": [0, 1]}},
                                   metrics=["accuracy"])
    assert linear.axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="'nll'"):
        plots.metric_vs_flops({"a": {"flops": [1.0], "accuracy": [0.5]}})
    with pytest.raises(ValueError, match="positive"):
        plots.metric_vs_flops({"a": {"flops": [0.0], "accuracy": [0.5],
                                     "nll": [1.0]}})
