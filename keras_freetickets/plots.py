"""Moved to `keras_freetickets.contrib.plots`; this alias keeps old imports
working and warns."""

import sys
import warnings

from keras_freetickets.contrib import plots as _moved

warnings.warn(
    "keras_freetickets.plots moved to keras_freetickets.contrib.plots",
    DeprecationWarning, stacklevel=2,
)
sys.modules[__name__] = _moved
