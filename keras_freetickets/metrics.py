"""Metrics of classifier ensembles: accuracy, calibration, diversity, OOD detection.

Pure numpy, so that benchmarks and tests can score saved predictions without
TensorFlow. Predictions are class probabilities: `probs` of shape `(N, C)` for
one model, `member_probs` of shape `(M, N, C)` for the M members of an
ensemble, whose prediction is the mean of its members' probabilities.
`labels` are integer class ids of shape `(N,)`. Every function checks its
inputs and names the argument at fault.
"""

import numpy as np

OOD_SCORES = ("max_prob", "entropy")

_SUM_ATOL = 1e-3


def accuracy(labels, probs):
    """Returns the fraction of examples whose most probable class is the label.

    Ties between classes go to the lowest class id (`numpy.argmax`).

    Args:
        labels: int array of shape `(N,)`, class ids in `[0, C)`.
        probs: float array of shape `(N, C)`, rows summing to 1.

    Returns:
        float in [0, 1].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    metrics.accuracy(np.array([0, 1]), np.array([[0.9, 0.1], [0.6, 0.4]]))  # 0.5
    ```
    """
    labels, probs = _check_labels_and_probs(labels, probs)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def negative_log_likelihood(labels, probs, eps=1e-12):
    """Returns the mean negative log-probability of the true labels, in nats.

    Probabilities are clipped below at `eps`, so a confident wrong answer
    costs at most `-log(eps)` instead of infinity.

    Args:
        labels: int array of shape `(N,)`.
        probs: float array of shape `(N, C)`.
        eps: float in (0, 1). Smallest probability used in the logarithm.

    Returns:
        float >= 0.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    metrics.negative_log_likelihood(np.array([0]), np.array([[0.5, 0.5]]))  # log 2
    ```
    """
    labels, probs = _check_labels_and_probs(labels, probs)
    _check_eps(eps)
    true_probs = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(true_probs, eps, 1.0))))


def expected_calibration_error(labels, probs, num_bins=15):
    """Returns the expected calibration error (ECE) over equal-width confidence bins.

    The confidence of an example is its largest class probability. Bin `b`
    holds the examples with confidence in `(b / num_bins, (b + 1) / num_bins]`;
    ECE is the sum over bins of `count_b / N * |accuracy_b - confidence_b|`,
    with `confidence_b` the mean confidence in the bin. BENCHMARK.md uses 15
    bins.

    Args:
        labels: int array of shape `(N,)`.
        probs: float array of shape `(N, C)`.
        num_bins: int >= 1. Number of bins over (0, 1].

    Returns:
        float in [0, 1].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    metrics.expected_calibration_error(np.array([0, 1]), probs)  # |0.5 - 0.8| = 0.3
    ```
    """
    confidence, acc, count = reliability_curve(labels, probs, num_bins=num_bins)
    filled = count > 0
    weights = count[filled] / count.sum()
    return float(np.sum(weights * np.abs(acc[filled] - confidence[filled])))


def reliability_curve(labels, probs, num_bins=15):
    """Returns the per-bin mean confidence, accuracy and count, for reliability diagrams.

    The bins are those of `expected_calibration_error`: bin `b` covers
    confidences in `(b / num_bins, (b + 1) / num_bins]`. Empty bins have
    count 0 and NaN confidence and accuracy.

    Args:
        labels: int array of shape `(N,)`.
        probs: float array of shape `(N, C)`.
        num_bins: int >= 1.

    Returns:
        A tuple `(confidence, accuracy, count)` of arrays of length
        `num_bins`: float64, float64 and int64.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    conf, acc, count = metrics.reliability_curve(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.3, 0.7]]), num_bins=10)
    ```
    """
    labels, probs = _check_labels_and_probs(labels, probs)
    _check_positive_int(num_bins, "num_bins")
    confidence = np.max(probs, axis=1)
    correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # searchsorted(side="left") on the upper edges puts a confidence equal to
    # an edge in the bin that edge closes: bins are (lower, upper].
    bins = np.clip(np.searchsorted(edges[1:], confidence, side="left"), 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins).astype(np.int64)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, correct_sum / count, np.nan)
    return mean_conf, mean_acc, count


def brier_score(labels, probs):
    """Returns the Brier score: the mean over examples of the squared error to the one-hot label.

    For each example the squared errors are summed over the classes, so the
    score lies in [0, 2].

    Args:
        labels: int array of shape `(N,)`.
        probs: float array of shape `(N, C)`.

    Returns:
        float in [0, 2].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    metrics.brier_score(np.array([0]), np.array([[0.5, 0.5]]))  # 0.25 + 0.25 = 0.5
    ```
    """
    labels, probs = _check_labels_and_probs(labels, probs)
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def predictive_entropy(probs):
    """Returns the entropy of each example's predicted distribution, in nats.

    `0 * log 0` counts as 0.

    Args:
        probs: float array of shape `(N, C)`.

    Returns:
        float64 array of shape `(N,)`, values in [0, log C].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    metrics.predictive_entropy(np.array([[0.5, 0.5], [1.0, 0.0]]))  # [log 2, 0]
    ```
    """
    probs = _check_probs(probs, "probs")
    return _entropy(probs)


def mutual_information(member_probs):
    """Returns, per example, the mutual information between prediction and member.

    It is the entropy of the ensemble's mean prediction minus the mean of the
    members' entropies (the "epistemic" part of the predictive entropy), in
    nats. It is never negative; float round-off below 0 is clipped to 0.

    Args:
        member_probs: float array of shape `(M, N, C)`.

    Returns:
        float64 array of shape `(N,)`.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    members = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    metrics.mutual_information(members)  # [log 2]: the members fully disagree
    ```
    """
    member_probs = _check_member_probs(member_probs, "member_probs")
    mean_entropy = np.mean(_entropy(member_probs), axis=0)
    return np.maximum(_entropy(np.mean(member_probs, axis=0)) - mean_entropy, 0.0)


def ood_scores(probs, score="max_prob"):
    """Returns per-example in-distribution scores: higher means more in-distribution.

    `"max_prob"` is the largest class probability (the maximum softmax
    probability baseline); `"entropy"` is the negative predictive entropy.

    Args:
        probs: float array of shape `(N, C)`.
        score: str, `"max_prob"` or `"entropy"`.

    Returns:
        float64 array of shape `(N,)`.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    metrics.ood_scores(np.array([[0.9, 0.1]]), score="entropy")
    ```
    """
    if score not in OOD_SCORES:
        raise ValueError(
            f"Argument `score` must be one of {OOD_SCORES}. Received: score={score!r}"
        )
    probs = _check_probs(probs, "probs")
    if score == "max_prob":
        return np.max(probs, axis=1)
    return -_entropy(probs)


def ood_auroc(in_probs, out_probs, score="max_prob"):
    """Returns the area under the ROC curve for telling in- from out-of-distribution inputs.

    In-distribution examples are the positive class and `ood_scores` is the
    score. The area is the Mann-Whitney statistic: the probability that a
    random in-distribution example scores higher than a random
    out-of-distribution one, ties counting one half (average ranks). 0.5 is
    chance, 1.0 a perfect separation.

    Args:
        in_probs: float array of shape `(N_in, C)`, predictions on
            in-distribution data.
        out_probs: float array of shape `(N_out, C)`, predictions on
            out-of-distribution data, same C.
        score: str, `"max_prob"` or `"entropy"`.

    Returns:
        float in [0, 1].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    in_probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    out_probs = np.array([[0.5, 0.5], [0.8, 0.2]])
    metrics.ood_auroc(in_probs, out_probs)  # (2 + 0.5 + 1) / 4 = 0.875
    ```
    """
    in_scores, out_scores = _ood_score_pair(in_probs, out_probs, score)
    scores = np.concatenate([in_scores, out_scores])
    ranks = _average_ranks(scores)
    num_in, num_out = len(in_scores), len(out_scores)
    rank_sum = np.sum(ranks[:num_in])
    return float((rank_sum - num_in * (num_in + 1) / 2.0) / (num_in * num_out))


def ood_aupr(in_probs, out_probs, score="max_prob"):
    """Returns the area under the precision-recall curve, in-distribution as the positive class.

    The area is the average precision: the sum over score thresholds, from
    the highest, of the gain in recall times the precision at that threshold.
    Examples with equal scores enter at the same threshold. This is the
    definition of scikit-learn's `average_precision_score`.

    Args:
        in_probs: float array of shape `(N_in, C)`.
        out_probs: float array of shape `(N_out, C)`.
        score: str, `"max_prob"` or `"entropy"`.

    Returns:
        float in [0, 1].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    in_probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    out_probs = np.array([[0.7, 0.3]])
    metrics.ood_aupr(in_probs, out_probs)  # 0.5 * 1 + 0.5 * 2/3
    ```
    """
    in_scores, out_scores = _ood_score_pair(in_probs, out_probs, score)
    scores = np.concatenate([in_scores, out_scores])
    positive = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    # The last position of each run of equal scores closes a threshold.
    closes = np.append(scores[1:] != scores[:-1], True)
    true_pos = np.cumsum(positive)[closes]
    predicted_pos = (np.arange(len(scores)) + 1)[closes]
    precision = true_pos / predicted_pos
    recall = true_pos / len(in_scores)
    recall_gain = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_gain * precision))


def disagreement(member_probs):
    """Returns the mean pairwise disagreement of the members' predicted classes.

    For every unordered pair of members, the fraction of examples on which
    their argmax classes differ; the result is the mean over the
    `M * (M - 1) / 2` pairs. It needs at least two members.

    Args:
        member_probs: float array of shape `(M, N, C)`, M >= 2.

    Returns:
        float in [0, 1].

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    members = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]]])
    metrics.disagreement(members)  # 0.5: they differ on the second example
    ```
    """
    member_probs = _check_member_probs(member_probs, "member_probs", min_members=2)
    predictions = np.argmax(member_probs, axis=2)
    num_members = len(predictions)
    fractions = [
        np.mean(predictions[i] != predictions[j])
        for i in range(num_members)
        for j in range(i + 1, num_members)
    ]
    return float(np.mean(fractions))


def kl_divergence(member_probs, eps=1e-12):
    """Returns the mean pairwise KL divergence between the members' predictions, in nats.

    KL is not symmetric, so the mean is over all ordered pairs `(i, j)` with
    `i != j` of the mean over examples of `KL(p_i || p_j)`; equivalently, the
    mean over unordered pairs of `(KL(p_i || p_j) + KL(p_j || p_i)) / 2`.
    Terms with `p_i = 0` count 0, and `p_j` is clipped below at `eps`. It needs
    at least two members.

    Args:
        member_probs: float array of shape `(M, N, C)`, M >= 2.
        eps: float in (0, 1). Smallest probability used in the logarithm.

    Returns:
        float >= 0.

    Example:

    ```python
    import numpy as np
    from keras_freetickets import metrics

    members = np.array([[[0.5, 0.5]], [[0.9, 0.1]]])
    metrics.kl_divergence(members)
    ```
    """
    member_probs = _check_member_probs(member_probs, "member_probs", min_members=2)
    _check_eps(eps)
    num_members = len(member_probs)
    safe = np.where(member_probs > 0, member_probs, 1.0)
    log_p = np.log(safe)  # 0 where p = 0; those terms are multiplied by p = 0.
    log_q = np.log(np.clip(member_probs, eps, 1.0))
    values = []
    for i in range(num_members):
        for j in range(num_members):
            if i != j:
                kl = np.sum(member_probs[i] * (log_p[i] - log_q[j]), axis=1)
                values.append(np.mean(kl))
    return float(np.mean(values))


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
    member_probs = _as_members(member_probs, "member_probs")
    num_members, num_examples, num_classes = member_probs.shape
    labels = _check_labels(labels, num_examples, num_classes, member_probs.shape[1:])
    ood = {}
    for name, value in (ood_member_probs or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                "Argument `ood_member_probs` must map non-empty string names to "
                f"predictions. Received a key: {name!r}"
            )
        value = _as_members(value, f"ood_member_probs[{name!r}]")
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
            "entropy": float(np.mean(_entropy(probs))),
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
    if (
        isinstance(precision, (bool, np.bool_))
        or not isinstance(precision, (int, np.integer))
        or precision < 0
    ):
        raise ValueError(
            "Argument `precision` must be an int >= 0. "
            f"Received: precision={precision!r}"
        )
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


# --------------------------------------------------------------------------
# Private helpers.


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


def _entropy(probs):
    """Entropy along the last axis, in nats, with 0 log 0 = 0."""
    safe = np.where(probs > 0, probs, 1.0)
    return -np.sum(probs * np.log(safe), axis=-1)


def _check_eps(eps):
    if not isinstance(eps, (float, int, np.floating, np.integer)) or not 0 < eps < 1:
        raise ValueError(f"Argument `eps` must be in (0, 1). Received: eps={eps!r}")


def _check_positive_int(value, name):
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"Argument `{name}` must be a positive int. Received: {name}={value!r}"
        )


def _check_probs(probs, name):
    """Returns probs as a float64 (N, C) array after checking it holds probabilities."""
    array = np.asarray(probs)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"Argument `{name}` must have shape (num_examples, num_classes) with "
            f"both at least 1. Received: {name}.shape={array.shape}"
        )
    return _check_values(array, name)


def _check_values(array, name):
    """Checks the last axis of a float array holds probability distributions."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"Argument `{name}` must hold probabilities (floats). "
            f"Received: {name}.dtype={array.dtype}"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        index = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"Argument `{name}` must hold probabilities: all values must be "
            f"finite. Received {array[tuple(index)]} at index {tuple(int(i) for i in index)}"
        )
    if np.any(array < 0):
        index = np.argwhere(array < 0)[0]
        raise ValueError(
            f"Argument `{name}` must hold probabilities: values must be >= 0. "
            f"Received {array[tuple(index)]!r} at index {tuple(int(i) for i in index)}"
        )
    sums = np.sum(array, axis=-1)
    bad = np.abs(sums - 1.0) > _SUM_ATOL
    if np.any(bad):
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"row {index[0]}" if len(index) == 1 else f"member {index[0]}, row {index[1]}"
        raise ValueError(
            f"Argument `{name}` must hold probabilities: rows must sum to 1 "
            f"(within {_SUM_ATOL}). Received: {where} sums to {float(sums[index]):.6g}"
        )
    return array


def _check_member_probs(member_probs, name, min_members=1):
    """Returns member predictions as a float64 (M, N, C) array after checking them."""
    array = np.asarray(member_probs)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(
            f"Argument `{name}` must have shape (num_members, num_examples, "
            f"num_classes) with all at least 1. Received: {name}.shape={array.shape}"
        )
    if array.shape[0] < min_members:
        raise ValueError(
            f"Argument `{name}` must hold the predictions of at least "
            f"{min_members} members: a pairwise measure needs two. "
            f"Received: {name}.shape={array.shape}"
        )
    return _check_values(array, name)


def _as_members(value, name):
    """Accepts (M, N, C) member predictions or (N, C) predictions of one model."""
    if np.ndim(value) == 2:
        return _check_probs(value, name)[None]
    return _check_member_probs(value, name)


def _check_labels(labels, num_examples, num_classes, probs_shape, probs_name="probs"):
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != num_examples:
        raise ValueError(
            f"Arguments `labels` and `{probs_name}` must describe the same "
            f"examples: `labels` must have shape ({num_examples},). "
            f"Received: labels.shape={array.shape}, {probs_name}.shape={probs_shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "Argument `labels` must hold integer class ids. "
            f"Received: labels.dtype={array.dtype}"
        )
    if np.any(array < 0) or np.any(array >= num_classes):
        index = int(np.argmax((array < 0) | (array >= num_classes)))
        raise ValueError(
            f"Argument `labels` must hold class ids in [0, {num_classes}) "
            f"({probs_name} has {num_classes} classes). Received: "
            f"labels[{index}]={int(array[index])}"
        )
    return array.astype(np.int64)


def _check_labels_and_probs(labels, probs):
    probs = _check_probs(probs, "probs")
    labels = _check_labels(labels, probs.shape[0], probs.shape[1], probs.shape)
    return labels, probs


def _ood_score_pair(in_probs, out_probs, score):
    if score not in OOD_SCORES:
        raise ValueError(
            f"Argument `score` must be one of {OOD_SCORES}. Received: score={score!r}"
        )
    in_probs = _check_probs(in_probs, "in_probs")
    out_probs = _check_probs(out_probs, "out_probs")
    if in_probs.shape[1] != out_probs.shape[1]:
        raise ValueError(
            "Arguments `in_probs` and `out_probs` must have the same number of "
            f"classes. Received: in_probs.shape={in_probs.shape}, "
            f"out_probs.shape={out_probs.shape}"
        )
    return ood_scores(in_probs, score), ood_scores(out_probs, score)


def _average_ranks(values):
    """1-based ranks of `values`, equal values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    mean_rank = last_rank - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]
