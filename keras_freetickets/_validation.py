"""Argument checks shared by the whole library.

Every scalar argument (an integer, a fraction, a positive number, a bool or
one of a few choices) is checked here, so that every public function accepts
the same values and words its error the same way, in the Keras style:
"Argument `name` must be .... Received: name=value". Python and numpy scalars
(np.int64(3), np.float32(0.5)) are accepted; bools are not numbers, and NaN,
infinities and strings are refused. Each check returns the value as a Python
scalar.
"""

import math

import numpy as np


def _fail(name, requirement, value):
    raise ValueError(
        f"Argument `{name}` must be {requirement}. Received: {name}={value!r}"
    )


def is_bool(value):
    """True for a Python or numpy bool."""
    return isinstance(value, (bool, np.bool_))


def is_int(value):
    """True for a Python or numpy integer that is not a bool."""
    return not is_bool(value) and isinstance(value, (int, np.integer))


def is_number(value):
    """True for a finite Python or numpy real number that is not a bool."""
    return (
        not is_bool(value)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )


def check_int(name, value, minimum=None, maximum=None):
    """Raises ValueError unless `value` is an integer in [`minimum`,
    `maximum`] (either bound may be None). Returns it as an int."""
    if minimum is not None and maximum is not None:
        requirement = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        requirement = f"an integer >= {minimum}"
    elif maximum is not None:
        requirement = f"an integer <= {maximum}"
    else:
        requirement = "an integer"
    if not is_int(value) or (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        _fail(name, requirement, value)
    return int(value)


def check_fraction(name, value, interval="(0, 1]", allow_zero=False):
    """Raises ValueError unless `value` is a number in `interval`, one of
    "(0, 1]", "[0, 1)", "(0, 1)" and "[0, 1]" (`allow_zero=True` is
    "[0, 1)"). Returns it as a float."""
    if allow_zero:
        interval = "[0, 1)"
    if interval not in ("(0, 1]", "[0, 1)", "(0, 1)", "[0, 1]"):
        raise ValueError(f"Unknown interval {interval!r}")
    ok = is_number(value)
    if ok:
        low_ok = value >= 0.0 if interval[0] == "[" else value > 0.0
        high_ok = value <= 1.0 if interval[-1] == "]" else value < 1.0
        ok = low_ok and high_ok
    if not ok:
        _fail(name, f"in {interval}", value)
    return float(value)


def check_number(name, value, minimum=0, strict=False):
    """Raises ValueError unless `value` is a finite number >= `minimum`
    (> with `strict`). Returns it as a float."""
    bound = f"> {minimum}" if strict else f">= {minimum}"
    if not is_number(value) or (
        value <= minimum if strict else value < minimum
    ):
        _fail(name, f"a finite number {bound}", value)
    return float(value)


def check_bool(name, value, allow_none=False):
    """Raises ValueError unless `value` is a bool (or None with
    `allow_none`). Returns it as a bool (or None)."""
    if allow_none and value is None:
        return None
    if not is_bool(value):
        _fail(name, "a bool or None" if allow_none else "a bool", value)
    return bool(value)


def check_one_of(name, value, choices):
    """Raises ValueError unless `value` is one of `choices`. Returns it."""
    choices = list(choices)
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        _fail(name, f"one of {choices}", value)
    return value
