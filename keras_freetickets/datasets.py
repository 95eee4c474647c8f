"""Moved to `keras_freetickets.contrib.datasets`; this alias keeps old imports
working and warns."""

import sys
import warnings

from keras_freetickets.contrib import datasets as _moved

warnings.warn(
    "keras_freetickets.datasets moved to keras_freetickets.contrib.datasets",
    DeprecationWarning, stacklevel=2,
)
sys.modules[__name__] = _moved
