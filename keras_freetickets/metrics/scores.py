"""Scores of one model's predictions against the labels: accuracy, NLL, calibration, Brier, entropy."""

import numpy as np

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int
from keras_freetickets.metrics._arrays import (
    check_labels_and_probs,
    check_probs,
    entropy,
)


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
    labels, probs = check_labels_and_probs(labels, probs)
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
    labels, probs = check_labels_and_probs(labels, probs)
    check_fraction("eps", eps, "(0, 1)")
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
    labels, probs = check_labels_and_probs(labels, probs)
    num_bins = check_int("num_bins", num_bins, 1)
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
    labels, probs = check_labels_and_probs(labels, probs)
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
    probs = check_probs(probs, "probs")
    return entropy(probs)
