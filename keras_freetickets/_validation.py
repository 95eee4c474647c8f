"""Argument checks shared by the library's constructors."""

import numpy as np


def check_int(name, value, minimum):
    """Raises ValueError unless `value` is an integer >= `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, np.integer)
    ) or value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )


def check_fraction(name, value, low_open=True, allow_zero=False):
    """Raises ValueError unless `value` is a number in (0, 1] ([0, 1) with
    `allow_zero`). Python and numpy scalars (np.float32(0.5)) are accepted;
    bools, NaN and strings are not."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )
    if ok:
        ok = (0.0 <= value < 1.0) if allow_zero else (0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1)" if allow_zero else "(0, 1]"
        raise ValueError(
            f"Argument `{name}` must be in {interval}. "
            f"Received: {name}={value!r}"
        )
