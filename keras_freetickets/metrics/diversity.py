"""Diversity of an ensemble's members: mutual information, disagreement, KL divergence."""

import numpy as np

from keras_freetickets._validation import check_fraction
from keras_freetickets.metrics._arrays import (
    check_member_probs,
    entropy,
)


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
    member_probs = check_member_probs(member_probs, "member_probs")
    mean_entropy = np.mean(entropy(member_probs), axis=0)
    return np.maximum(entropy(np.mean(member_probs, axis=0)) - mean_entropy, 0.0)


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
    member_probs = check_member_probs(member_probs, "member_probs", min_members=2)
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
    member_probs = check_member_probs(member_probs, "member_probs", min_members=2)
    check_fraction("eps", eps, "(0, 1)")
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
