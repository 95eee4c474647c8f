"""The benchmark's metrics of an ensemble and its members in one dict, and a text table of them."""

import numpy as np

from keras_freetickets._validation import check_int
from keras_freetickets.metrics._arrays import as_members, check_labels, entropy
from keras_freetickets.metrics.diversity import (
    disagreement,
    kl_divergence,
    mutual_information,
)
from keras_freetickets.metrics.ood import ood_aupr, ood_auroc
from keras_freetickets.metrics.scores import (
    accuracy,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)


def report(labels, member_probs, ood_member_probs=None, num_bins=15):
    """Computes the benchmark's metrics for an ensemble and for each of its members.

    The ensemble's prediction is the mean of the members' probabilities. For
    the ensemble and for each member the dict holds `accuracy`, `nll`, `ece`
    (with `num_bins` bins), `brier` and `entropy` (mean predictive entropy),
    and, for each out-of-distribution set, `auroc_<name>` and `aupr_<name>`
    (max-probability score, in-distribution positive). The top level also
    holds `disagreement` and `kl_divergence` (None for a single member) and
    `mutual_information` (mean over the test examples).

    Args:
        labels: int array of shape `(N,)`.
        member_probs: float array of shape `(M, N, C)`, or `(N, C)` for a
            single model.
        ood_member_probs: None, or a dict mapping a name (for example
            `"digits"`) to the same members' predictions on that
            out-of-distribution set, shape `(M, N_name, C)` (or
            `(N_name, C)` when `member_probs` is 2-D).
        num_bins: int >= 1. ECE bins.

    Returns:
        A dict with keys `"ensemble"` (dict of floats), `"members"` (list of
        M such dicts), `"disagreement"`, `"kl_divergence"` and
        `"mutual_information"`.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    rng = np.random.default_rng(0)
    members = rng.dirichlet(np.ones(10), size=(3, 100))
    labels = rng.integers(0, 10, size=100)
    ood = {"noise": rng.dirichlet(np.ones(10), size=(3, 50))}
    result = metrics.report(labels, members, ood)
    print(result["ensemble"]["accuracy"], result["ensemble"]["auroc_noise"])
    ```
    """
    member_probs = as_members(member_probs, "member_probs")
    num_members, num_examples, num_classes = member_probs.shape
    labels = check_labels(labels, num_examples, num_classes, member_probs.shape[1:])
    ood = {}
    for name, value in (ood_member_probs or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                "Argument `ood_member_probs` must map non-empty string names to "
                f"predictions. Received a key: {name!r}"
            )
        value = as_members(value, f"ood_member_probs[{name!r}]")
        if value.shape[0] != num_members or value.shape[2] != num_classes:
            raise ValueError(
                f"Argument `ood_member_probs[{name!r}]` must hold the predictions "
                f"of the same {num_members} members over {num_classes} classes. "
                f"Received: ood_member_probs[{name!r}].shape={value.shape}, "
                f"member_probs.shape={member_probs.shape}"
            )
        ood[name] = value

    def scores(probs, ood_probs):
        result = {
            "accuracy": accuracy(labels, probs),
            "nll": negative_log_likelihood(labels, probs),
            "ece": expected_calibration_error(labels, probs, num_bins=num_bins),
            "brier": brier_score(labels, probs),
            "entropy": float(np.mean(entropy(probs))),
        }
        for ood_name, out_probs in ood_probs.items():
            result[f"auroc_{ood_name}"] = ood_auroc(probs, out_probs)
            result[f"aupr_{ood_name}"] = ood_aupr(probs, out_probs)
        return result

    ensemble = scores(
        np.mean(member_probs, axis=0),
        {name: np.mean(value, axis=0) for name, value in ood.items()},
    )
    members = [
        scores(member_probs[m], {name: value[m] for name, value in ood.items()})
        for m in range(num_members)
    ]
    several = num_members >= 2
    return {
        "ensemble": ensemble,
        "members": members,
        "disagreement": disagreement(member_probs) if several else None,
        "kl_divergence": kl_divergence(member_probs) if several else None,
        "mutual_information": float(np.mean(mutual_information(member_probs))),
    }


def format_table(rows, columns=None, precision=4):
    """Formats rows of metrics as a fixed-width text table.

    Each row is a name and a dict of values. Floats are written with
    `precision` decimals (very large or very small ones in `g` notation),
    None and missing values as `-`. By default the columns are the keys with
    scalar values, in order of first appearance.

    Args:
        rows: dict mapping a row name (str) to a dict of column name -> value.
        columns: None or a list of column names to show, in order.
        precision: int >= 0. Decimals of floats.

    Returns:
        str, the table without a trailing newline.

    Example:

    ```python
    from keras_freetickets import metrics

    print(metrics.format_table({
        "dense": {"accuracy": 0.8971, "nll": 0.2936},
        "EDST M=3": {"accuracy": 0.8789, "nll": 0.3290},
    }))
    ```
    """
    if not isinstance(rows, dict):
        raise ValueError(
            "Argument `rows` must be a dict mapping row names to dicts of values. "
            f"Received: rows of type {type(rows).__name__}"
        )
    for name, row in rows.items():
        if not isinstance(row, dict):
            raise ValueError(
                f"Argument `rows` must map each name to a dict of values. "
                f"Received: rows[{name!r}] of type {type(row).__name__}"
            )
    precision = check_int("precision", precision, 0)
    if columns is None:
        columns = []
        for row in rows.values():
            for key, value in row.items():
                if key not in columns and _is_scalar(value):
                    columns.append(key)
    else:
        columns = list(columns)
    header = [""] + [str(c) for c in columns]
    body = [
        [str(name)] + [_format_value(row.get(c), precision) for c in columns]
        for name, row in rows.items()
    ]
    widths = [max(len(line[k]) for line in [header] + body) for k in range(len(header))]

    def join(cells):
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([join(header), rule] + [join(line) for line in body])


def _is_scalar(value):
    return value is None or isinstance(value, (int, float, str, np.number, np.bool_))


def _format_value(value, precision):
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if np.isfinite(value) and value != 0 and (
            abs(value) >= 1e6 or abs(value) < 10.0 ** -precision
        ):
            return f"{value:.{max(precision, 1)}g}"
        return f"{value:.{precision}f}"
    return str(value)
