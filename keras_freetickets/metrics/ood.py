"""Out-of-distribution detection: per-example scores, AUROC and AUPR."""

import numpy as np

from keras_freetickets._validation import check_one_of
from keras_freetickets.metrics._arrays import check_probs, entropy

OOD_SCORES = ("max_prob", "entropy")


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
    check_one_of("score", score, OOD_SCORES)
    probs = check_probs(probs, "probs")
    if score == "max_prob":
        return np.max(probs, axis=1)
    return -entropy(probs)


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

    Args and the range of the result: as in `ood_auroc` (an AUPR of 1.0
    is a perfect separation; chance is the in-distribution share of all
    examples).

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


def _ood_score_pair(in_probs, out_probs, score):
    check_one_of("score", score, OOD_SCORES)
    in_probs = check_probs(in_probs, "in_probs")
    out_probs = check_probs(out_probs, "out_probs")
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
