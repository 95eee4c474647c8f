"""Tests of UpdateSchedule: the update steps, p_t, the k bound, config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import schedules


def update_steps(schedule, last, stop=None):
    steps = tf.range(last, dtype=tf.int64)
    stop = None if stop is None else tf.constant(stop, tf.int64)
    return [int(s) for s, on in zip(steps.numpy(),
            schedule.is_update_step(steps, stop).numpy()) if on]


def test_update_steps_follow_interval_start_and_end():
    s = schedules.UpdateSchedule(update_interval=10, start_step=5,
                                 end_step=40)
    assert update_steps(s, 60) == [5, 15, 25, 35]
    assert update_steps(s, 60, stop=20) == [5, 15]
    s = schedules.UpdateSchedule(update_interval=10, total_steps=100)
    assert (s.start_step, s.end_step) == (10, 75)
    assert update_steps(s, 100) == [10, 20, 30, 40, 50, 60, 70]


def test_drop_fraction_and_k_bound():
    s = schedules.UpdateSchedule(drop_fraction=0.3)
    assert float(s.drop_fraction_at(tf.constant(7, tf.int64))) == \
        pytest.approx(0.3)
    assert s.k_bound(101) == (30, True)
    c = schedules.UpdateSchedule(drop_fraction=0.3, decay="cosine",
                                 start_step=0, end_step=100)
    assert float(c.drop_fraction_at(tf.constant(50, tf.int64))) == \
        pytest.approx(0.15)
    assert float(c.drop_fraction_at(tf.constant(100, tf.int64))) == \
        pytest.approx(0.0, abs=1e-7)
    assert c.k_bound(101) == (31, False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(update_interval=0), "update_interval=0"),
    (dict(drop_fraction=np.float32(1.5)), "drop_fraction"),
    (dict(decay="linear"), "drop_fraction_schedule='linear'"),
    (dict(decay="cosine"), "update_end_step=None"),
    (dict(start_step=10, end_step=5), "update_end_step=5"),
])
def test_bad_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        schedules.UpdateSchedule(**kwargs)


def test_config_round_trip_and_optimizer_use():
    s = schedules.UpdateSchedule(update_interval=7, drop_fraction=0.2,
                                 decay="cosine", total_steps=300)
    clone = schedules.UpdateSchedule.from_config(s.get_config())
    assert clone.get_config() == s.get_config()
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), schedule=s)
    assert (opt.update_interval, opt.drop_fraction, opt.update_end_step) == \
        (7, 0.2, 225)
    rebuilt = kft.SparseOptimizer.from_config(opt.get_config())
    assert rebuilt.schedule.get_config() == s.get_config()
    with pytest.raises(ValueError, match="schedule=3"):
        kft.SparseOptimizer(keras.optimizers.SGD(0.1), schedule=3)
