"""`keras_freetickets._validation`: numpy scalars pass, bools and NaN do not."""

import numpy as np
import pytest

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.float64(1.0),
                                   np.float16(0.25), np.int64(1)])
def test_check_fraction_accepts_python_and_numpy_numbers(value):
    check_fraction("sparsity", value)


@pytest.mark.parametrize("value", [0.0, 1.5, np.float32(-0.1), float("nan"),
                                   np.float32("nan"), True, np.bool_(True), "0.5",
                                   None])
def test_check_fraction_rejects_with_name_and_value(value):
    with pytest.raises(ValueError, match=r"Argument `sparsity` must be in \(0, 1\]"
                       r"\. Received: sparsity=") as info:
        check_fraction("sparsity", value)
    assert repr(value) in str(info.value)


def test_check_fraction_allow_zero_is_half_open():
    check_fraction("s", np.float32(0.0), allow_zero=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_fraction("s", np.float32(1.0), allow_zero=True)


@pytest.mark.parametrize("value", [3, np.int32(3), np.int64(7), np.uint8(5)])
def test_check_int_accepts_numpy_integers(value):
    check_int("update_interval", value, 1)


@pytest.mark.parametrize("value", [0, np.int64(0), 2.0, np.float32(2), True,
                                   np.bool_(True), "3"])
def test_check_int_rejects_with_name_and_value(value):
    with pytest.raises(ValueError, match="Argument `update_interval` must be an "
                       "integer >= 1. Received: update_interval="):
        check_int("update_interval", value, 1)
