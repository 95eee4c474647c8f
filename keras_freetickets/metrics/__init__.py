"""Metrics of classifier ensembles: accuracy, calibration, diversity, OOD detection.

Pure numpy, so that benchmarks and tests can score saved predictions without
TensorFlow. Predictions are class probabilities: `probs` of shape `(N, C)` for
one model, `member_probs` of shape `(M, N, C)` for the M members of an
ensemble, whose prediction is the mean of its members' probabilities.
`labels` are integer class ids of shape `(N,)`. Every function checks its
inputs and names the argument at fault.

The functions live in submodules by topic: `scores` (one model against the
labels), `ood` (out-of-distribution detection), `diversity` (the members
against each other) and `summary` (`report` and `format_table`); use them
from here.
"""

from keras_freetickets.metrics.diversity import (
    disagreement,
    kl_divergence,
    mutual_information,
)
from keras_freetickets.metrics.ood import (
    OOD_SCORES,
    ood_aupr,
    ood_auroc,
    ood_scores,
)
from keras_freetickets.metrics.scores import (
    accuracy,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
    reliability_curve,
)
from keras_freetickets.metrics.summary import format_table, report

__all__ = [
    "OOD_SCORES",
    "accuracy",
    "brier_score",
    "disagreement",
    "expected_calibration_error",
    "format_table",
    "kl_divergence",
    "mutual_information",
    "negative_log_likelihood",
    "ood_aupr",
    "ood_auroc",
    "ood_scores",
    "predictive_entropy",
    "reliability_curve",
    "report",
]
