"""Drop-fraction schedules for dynamic sparse training.

A schedule maps the optimizer step (an int64 tensor) to the fraction p_t of
each layer's active weights that a mask update drops and regrows. They run
inside the compiled train step, so they are written with TensorFlow ops.
"""

import math

import tensorflow as tf

SCHEDULES = ("constant", "cosine")


def constant(drop_fraction):
    """p_t = drop_fraction at every update."""

    def schedule(step):
        del step
        return tf.constant(drop_fraction, tf.float32)

    return schedule


def cosine(drop_fraction, start_step, end_step):
    """RigL's cosine decay: p_t = p / 2 * (1 + cos(pi * t / T)) over the window.

    t counts from `start_step`; T = end_step - start_step. At the end of the
    window p_t reaches 0.
    """
    if end_step is None:
        raise ValueError(
            "The 'cosine' drop-fraction schedule decays over the update "
            "window, so it needs an end. Pass `update_end_step` or "
            "`total_steps`. Received: update_end_step=None"
        )
    span = float(max(end_step - start_step, 1))

    def schedule(step):
        t = tf.cast(step - start_step, tf.float32) / span
        t = tf.clip_by_value(t, 0.0, 1.0)
        return drop_fraction * 0.5 * (1.0 + tf.cos(math.pi * t))

    return schedule


def get(name_or_callable, drop_fraction, start_step, end_step):
    """Returns the schedule function for a name or a user callable.

    A callable receives the step as an int64 tensor and returns a float
    tensor (or Python float) in [0, 1]; it is traced into the train step.
    """
    if callable(name_or_callable):
        user_fn = name_or_callable

        def schedule(step):
            value = tf.cast(user_fn(step), tf.float32)
            return tf.clip_by_value(value, 0.0, 1.0)

        return schedule
    if name_or_callable == "constant":
        return constant(drop_fraction)
    if name_or_callable == "cosine":
        return cosine(drop_fraction, start_step, end_step)
    raise ValueError(
        f"Argument `drop_fraction_schedule` must be one of {list(SCHEDULES)} "
        f"or a callable. Received: drop_fraction_schedule={name_or_callable!r}"
    )
