"""Plots of sparse ensembles: calibration, OOD scores, densities, mask overlap, FLOPs.

Every function takes plain numpy data (what `keras_freetickets.metrics`,
`keras_freetickets.members` and `keras_freetickets.flops` return), draws one
matplotlib `Figure` and returns it; with `path` it also writes the figure as a
PNG. Figures are made with matplotlib's object-oriented API
(`matplotlib.figure.Figure`), not `pyplot`: no global figure state, no change
of the user's backend, and nothing to close. matplotlib is imported on first
use, so importing this module costs nothing.

- `reliability_diagram`: accuracy against confidence per bin (the ECE bins),
  one panel per model, for example an ensemble beside a single model.
- `ood_score_histograms`: histograms of the in-distribution score (max
  probability by default) on the test set and on each out-of-distribution
  set, one panel per model.
- `layer_density_bars`: per-layer densities of several series (the ERK
  target, each member's actual density) as grouped bars.
- `mask_overlap_heatmap`: the matrix of `members.pairwise_mask_overlap`.
- `metric_vs_flops`: accuracy, NLL, ... of each method against its training
  FLOPs, one panel per metric, one line per method.

Figure plumbing is in the private `_plot_helpers` module, argument checks
in `keras_freetickets._validation`.
"""

import numpy as np

from keras_freetickets import metrics as metrics_lib
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int
from keras_freetickets.contrib._plot_helpers import (
    DPI,
    finish,
    named_arrays,
    new_figure,
    short_layer,
)

__all__ = [
    "COLORS",
    "DPI",
    "METRIC_LABELS",
    "layer_density_bars",
    "mask_overlap_heatmap",
    "metric_vs_flops",
    "ood_score_histograms",
    "reliability_diagram",
]

# Colour cycle (matplotlib's tab10, written out so that a style sheet does not
# change which colour a method gets from one plot to the next).
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
METRIC_LABELS = {
    "accuracy": "test accuracy",
    "nll": "test NLL (nats)",
    "ece": "test ECE",
    "brier": "test Brier score",
}


def reliability_diagram(labels, probs, num_bins=15, path=None, title=None):
    """Draws a reliability diagram: accuracy against confidence, per model.

    Each model gets a panel. Its examples are put in the bins of
    `metrics.expected_calibration_error` by confidence (largest class
    probability); a bar shows the bin's accuracy, a hatched band the gap to
    its mean confidence, and the diagonal is perfect calibration. The
    model's ECE is in the panel title. Empty bins have no bar.

    Args:
        labels: int array of shape `(N,)`, the true classes.
        probs: dict mapping a model name to its float array of
            probabilities, shape `(N, C)` (an ordered dict keeps the order
            of the panels). A single array is drawn as one panel named
            "model".
        num_bins: int >= 1. Number of equal-width confidence bins.
        path: str or None. Where to write the PNG.
        title: str or None. Title of the figure.

    Returns:
        A `matplotlib.figure.Figure` with one axes per model.

    Example:

    ```python
    from keras_freetickets.contrib import plots

    plots.reliability_diagram(
        y_test, {"dense": dense_probs, "EDST M=3": ensemble_probs},
        path="reliability.png")
    ```
    """
    probs = named_arrays("probs", probs, ndim=2)
    labels = np.asarray(labels)
    num_bins = check_int("num_bins", num_bins, 1)
    figure, axes = new_figure(1, len(probs), panel_size=(3.4, 3.4))
    width = 1.0 / num_bins
    centers = (np.arange(num_bins) + 0.5) * width
    for index, (ax, (name, p)) in enumerate(zip(axes, probs.items())):
        if p.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Argument `probs` must hold one row per label: "
                f"probs[{name!r}] has {p.shape[0]} rows, labels has "
                f"{labels.shape[0]}."
            )
        confidence, accuracy, count = metrics_lib.reliability_curve(
            labels, p, num_bins=num_bins
        )
        ece = metrics_lib.expected_calibration_error(labels, p, num_bins)
        filled = count > 0
        color = COLORS[index % len(COLORS)]
        ax.bar(centers[filled], accuracy[filled], width=width * 0.95,
               color=color, edgecolor="black", linewidth=0.5,
               label="accuracy", gid="accuracy")
        gap_bottom = np.minimum(accuracy, confidence)[filled]
        gap_height = np.abs(confidence - accuracy)[filled]
        ax.bar(centers[filled], gap_height, bottom=gap_bottom,
               width=width * 0.95, color="none", edgecolor="#d62728",
               hatch="//", linewidth=0.5, label="gap to confidence",
               gid="gap")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE = {ece:.4f}", fontsize=10)
        if index == 0:
            ax.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=8)
    return finish(figure, path, title)


def ood_score_histograms(in_probs, ood_probs, score="max_prob", bins=30,
                         path=None, title=None):
    """Draws histograms of in-distribution scores, test set vs OOD sets.

    One panel per model. Each panel overlays density histograms of
    `metrics.ood_scores(probs, score)` on the in-distribution test set and on
    each out-of-distribution set; the legend gives each OOD set's AUROC
    (`metrics.ood_auroc`). A model that separates the sets well puts the
    test set's mass at high scores and the OOD sets' mass at low ones.

    Args:
        in_probs: dict mapping a model name to its probabilities on the
            in-distribution test set, shape `(N, C)`.
        ood_probs: dict mapping the same model names to dicts from an OOD
            set name (for example `"digits"`) to probabilities, shape
            `(N_set, C)`.
        score: str, `"max_prob"` or `"entropy"` (see `metrics.ood_scores`).
        bins: int >= 1. Number of histogram bins over the score range.
        path: str or None. Where to write the PNG.
        title: str or None. Title of the figure.

    Returns:
        A `matplotlib.figure.Figure`, one panel per model.

    Example:

    ```python
    plots.ood_score_histograms(
        {"EDST M=3": test_probs},
        {"EDST M=3": {"digits": digits_probs, "noise": noise_probs}},
        path="ood_histograms.png")
    ```
    """
    in_probs = named_arrays("in_probs", in_probs, ndim=2)
    if not isinstance(ood_probs, dict) or set(ood_probs) != set(in_probs):
        raise ValueError(
            "Argument `ood_probs` must be a dict with the same model names as "
            f"`in_probs` ({sorted(in_probs)}). Received: "
            f"{sorted(ood_probs) if isinstance(ood_probs, dict) else ood_probs!r}"
        )
    bins = check_int("bins", bins, 1)
    figure, axes = new_figure(1, len(in_probs), panel_size=(3.6, 3.0))
    for index, (ax, (name, p)) in enumerate(zip(axes, in_probs.items())):
        sets = named_arrays(f"ood_probs[{name!r}]", ood_probs[name], ndim=2,
                             allow_empty=True)
        in_scores = metrics_lib.ood_scores(p, score)
        all_scores = [in_scores] + [
            metrics_lib.ood_scores(q, score) for q in sets.values()
        ]
        low = min(float(s.min()) for s in all_scores)
        high = max(float(s.max()) for s in all_scores)
        if high <= low:
            high = low + 1e-6
        edges = np.linspace(low, high, bins + 1)
        ax.hist(in_scores, bins=edges, density=True, alpha=0.55,
                color=COLORS[0], label="test (in-dist.)")
        for k, (set_name, q) in enumerate(sets.items()):
            auroc = metrics_lib.ood_auroc(p, q, score)
            ax.hist(all_scores[k + 1], bins=edges, density=True,
                    histtype="step", linewidth=1.6,
                    color=COLORS[(k + 1) % len(COLORS)],
                    label=f"{set_name} (AUROC {auroc:.3f})")
        ax.set_xlabel("max probability" if score == "max_prob"
                      else "negative entropy")
        ax.set_title(name, fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        if index == 0:
            ax.set_ylabel("density")
    return finish(figure, path, title)


def layer_density_bars(densities, path=None, title=None, reference=None,
                       layer_notes=None):
    """Draws per-layer densities of several series as grouped bars.

    Typical series: the target of a distribution (ERK) and the actual
    density (nonzero fraction) of each member's kernels. Layers are taken in
    the order of the first series; every series must cover the same layers.

    Args:
        densities: dict mapping a series name to a dict from a layer name to
            its density in [0, 1].
        path: str or None. Where to write the PNG.
        title: str or None. Title of the figure.
        reference: float or None. A global density drawn as a dashed line
            (for example `1 - sparsity`).
        layer_notes: dict or None. Layer name -> a short text written under
            its name on the x axis (for example the kernel's shape).

    Returns:
        A `matplotlib.figure.Figure` with one axes.

    Example:

    ```python
    plots.layer_density_bars(
        {"ERK target": {"dense/kernel": 0.19, "dense_1/kernel": 0.43},
         "member 0": {"dense/kernel": 0.19, "dense_1/kernel": 0.43}},
        reference=0.2, path="layer_density.png")
    ```
    """
    if not isinstance(densities, dict) or not densities:
        raise ValueError(
            "Argument `densities` must be a non-empty dict of series. "
            f"Received: densities={densities!r}"
        )
    layers = list(next(iter(densities.values())))
    if not layers:
        raise ValueError("Argument `densities` holds a series with no layer.")
    for series, values in densities.items():
        if not isinstance(values, dict) or set(values) != set(layers):
            raise ValueError(
                f"Every series of `densities` must cover the layers "
                f"{layers}. Received for {series!r}: "
                f"{sorted(values) if isinstance(values, dict) else values!r}"
            )
        for layer, value in values.items():
            check_fraction(f"densities[{series!r}][{layer!r}]", value, "[0, 1]")
    figure, (ax,) = new_figure(1, 1, panel_size=(max(4.5, 1.3 * len(layers)
                                                  + 2.0), 3.2))
    count = len(densities)
    width = 0.8 / count
    x = np.arange(len(layers))
    for k, (series, values) in enumerate(densities.items()):
        heights = [float(values[layer]) for layer in layers]
        ax.bar(x - 0.4 + width * (k + 0.5), heights, width=width * 0.95,
               color=COLORS[k % len(COLORS)], label=series, gid=series)
    if reference is not None:
        ax.axhline(float(reference), linestyle="--", color="gray",
                   linewidth=1, label=f"global density {float(reference):.2f}")
    notes = layer_notes or {}
    ax.set_xticks(x)
    ax.set_xticklabels(
        [short_layer(layer) + (f"\n{notes[layer]}" if layer in notes else "")
         for layer in layers],
        rotation=20 if len(layers) > 4 else 0, fontsize=8,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("density (active fraction)")
    ax.legend(fontsize=8, loc="upper left")
    return finish(figure, path, title)


def mask_overlap_heatmap(overlap, labels=None, path=None, title=None,
                         reference=None):
    """Draws the matrix of pairwise mask overlaps between members.

    Entry `(i, j)` is the fraction of member i's active weights also active
    in member j (`members.pairwise_mask_overlap`); each cell is annotated
    with its value. Members of one EDST run share more weights than
    independent DST members; independent random masks at density d overlap
    by about d.

    Args:
        overlap: float array of shape `(M, M)` with values in [0, 1].
        labels: list of M str, or None for "0".."M-1".
        path: str or None. Where to write the PNG.
        title: str or None. Title of the figure.
        reference: float or None. The overlap of independent random masks
            (the density), written under the figure.

    Returns:
        A `matplotlib.figure.Figure` with the heatmap axes and a colour bar.

    Example:

    ```python
    matrix = kft.members.pairwise_mask_overlap(member_paths)
    plots.mask_overlap_heatmap(matrix, ["member 0", "member 1", "member 2"],
                               path="mask_overlap.png")
    ```
    """
    overlap = np.asarray(overlap, dtype=np.float64)
    if overlap.ndim != 2 or overlap.shape[0] != overlap.shape[1] or (
        overlap.shape[0] == 0
    ):
        raise ValueError(
            "Argument `overlap` must be a non-empty square matrix. Received: "
            f"shape {overlap.shape}"
        )
    if not np.all((overlap >= 0.0) & (overlap <= 1.0)):
        raise ValueError("Argument `overlap` must hold values in [0, 1].")
    size = overlap.shape[0]
    labels = [str(i) for i in range(size)] if labels is None else list(labels)
    if len(labels) != size:
        raise ValueError(
            f"Argument `labels` must hold {size} names, one per row of "
            f"`overlap`. Received: {len(labels)}"
        )
    side = max(3.2, 0.65 * size + 2.2)
    figure, (ax,) = new_figure(1, 1, panel_size=(side + 0.8, side))
    image = ax.imshow(overlap, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(size):
        for j in range(size):
            value = overlap[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                    fontsize=8 if size <= 8 else 6,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                    label="shared active weights")
    if reference is not None:
        ax.set_xlabel(
            f"independent random masks overlap ~{float(reference):.2f}",
            fontsize=8,
        )
    return finish(figure, path, title)


def metric_vs_flops(curves, metrics=("accuracy", "nll"), path=None,
                    title=None, flops_label="training FLOPs"):
    """Draws metrics against training FLOPs, one line per method.

    Each method is a sequence of points, for example the ensemble of its
    first k members at the FLOPs spent to train them (k = 1..M), or a single
    point for a single model. One panel per metric; the x axis is
    logarithmic when the FLOPs span more than a factor of 10.

    Args:
        curves: dict mapping a method name to a dict with a `"flops"` list
            and one list of the same length per name in `metrics`.
        metrics: list of str, the metrics to draw (keys of each curve).
        path: str or None. Where to write the PNG.
        title: str or None. Title of the figure.
        flops_label: str. Label of the x axis (for example "training FLOPs
            (x one dense run)").

    Returns:
        A `matplotlib.figure.Figure` with one axes per metric.

    Example:

    ```python
    plots.metric_vs_flops({
        "dense": {"flops": [1.0], "accuracy": [0.89], "nll": [0.30]},
        "EDST": {"flops": [0.14, 0.17, 0.20], "accuracy": [0.87, 0.875, 0.877],
                 "nll": [0.35, 0.34, 0.338]},
    }, path="flops_tradeoff.png")
    ```
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError(
            f"Argument `curves` must be a non-empty dict. Received: {curves!r}"
        )
    metrics = list(metrics)
    if not metrics:
        raise ValueError("Argument `metrics` must name at least one metric.")
    all_flops = []
    for name, curve in curves.items():
        if not isinstance(curve, dict) or "flops" not in curve:
            raise ValueError(
                f"Each curve must be a dict with a 'flops' list. Received for "
                f"{name!r}: {curve!r}"
            )
        length = len(curve["flops"])
        if length == 0:
            raise ValueError(f"Curve {name!r} has no point.")
        for metric in metrics:
            if metric not in curve or len(curve[metric]) != length:
                raise ValueError(
                    f"Curve {name!r} must hold a list {metric!r} of {length} "
                    "values, one per FLOPs value."
                )
        flops = np.asarray(curve["flops"], dtype=np.float64)
        if np.any(~np.isfinite(flops)) or np.any(flops <= 0):
            raise ValueError(
                f"FLOPs must be positive numbers. Received for {name!r}: "
                f"{list(curve['flops'])}"
            )
        all_flops.extend(flops.tolist())
    figure, axes = new_figure(1, len(metrics), panel_size=(3.8, 3.2))
    log_x = max(all_flops) / min(all_flops) > 10.0
    for ax, metric in zip(axes, metrics):
        for k, (name, curve) in enumerate(curves.items()):
            x = np.asarray(curve["flops"], dtype=np.float64)
            y = np.asarray(curve[metric], dtype=np.float64)
            ax.plot(x, y, marker="o" if len(x) > 1 else "*",
                    markersize=5 if len(x) > 1 else 11,
                    color=COLORS[k % len(COLORS)], label=name)
            if len(x) > 1:
                for m, (xi, yi) in enumerate(zip(x, y)):
                    ax.annotate(str(m + 1), (xi, yi), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(flops_label)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    return finish(figure, path, title)
