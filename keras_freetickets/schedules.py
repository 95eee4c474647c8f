"""Drop-fraction schedules for dynamic sparse training.

A schedule maps the optimizer step (an int64 tensor) to the fraction p_t of
each layer's active weights that a mask update drops and regrows. They run
inside the compiled train step, so they are written with TensorFlow ops.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int

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


_NO_END = 2**62


@keras.saving.register_keras_serializable(package="keras_freetickets")
class UpdateSchedule:
    """When masks are updated and what fraction of each layer they replace.

    One object for what used to be six optimizer arguments. A local update
    runs at every step `t` with `start_step <= t < end_step` and
    `(t - start_step) % update_interval == 0`; it replaces
    `p_t = decay(t)` of each layer's active weights.

    Args:
        update_interval: int >= 1. Steps between mask updates.
        drop_fraction: float in (0, 1]. p, the fraction replaced.
        decay: "constant", "cosine" (RigL's decay to 0 over the update
            window; needs an end) or a callable `step -> p_t` traced into
            the train step (serializable when registered with Keras).
        start_step: int >= 0 or None. First update step (default:
            `update_interval`).
        end_step: int or None. No local update at or after it. Default:
            75% of `total_steps` when that is given, else no end.
        total_steps: int or None. Length of training, for the default end.

    Example:

    ```python
    schedule = kft.schedules.UpdateSchedule(update_interval=100,
                                            drop_fraction=0.3,
                                            decay="cosine", total_steps=9000)
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), schedule=schedule)
    ```
    """

    def __init__(self, update_interval=100, drop_fraction=0.5,
                 decay="constant", start_step=None, end_step=None,
                 total_steps=None):
        check_fraction("drop_fraction", drop_fraction)
        check_int("update_interval", update_interval, minimum=1)
        if start_step is None:
            start_step = update_interval
        check_int("update_start_step", start_step, minimum=0)
        if total_steps is not None:
            check_int("total_steps", total_steps, minimum=1)
        if end_step is None and total_steps is not None:
            end_step = int(math.floor(0.75 * total_steps + 0.5))
        if end_step is not None:
            check_int("update_end_step", end_step, minimum=0)
            if end_step <= start_step:
                raise ValueError(
                    "Argument `update_end_step` must be greater than "
                    f"`update_start_step` ({start_step}). Received: "
                    f"update_end_step={end_step}"
                )
        self.update_interval = int(update_interval)
        self.drop_fraction = float(drop_fraction)
        self.decay = decay
        self.start_step = int(start_step)
        self.end_step = None if end_step is None else int(end_step)
        self.total_steps = total_steps
        # Raises for unknown names and for "cosine" without an end.
        self._fraction_fn = get(decay, self.drop_fraction, self.start_step,
                                self.end_step)

    @property
    def stop_step(self):
        """`end_step`, or a step never reached when there is none."""
        return _NO_END if self.end_step is None else self.end_step

    def is_update_step(self, step, stop_step=None):
        """Bool tensor: does train step `step` (int64) update the masks?

        `stop_step` (a tensor) may end the window earlier than `end_step`.
        """
        stop = self.stop_step if stop_step is None else stop_step
        in_window = tf.logical_and(step >= self.start_step, step < stop)
        on_interval = tf.equal(
            tf.math.floormod(step - self.start_step, self.update_interval), 0
        )
        return tf.logical_and(in_window, on_interval)

    def drop_fraction_at(self, step):
        """Float32 tensor p_t at train step `step`."""
        return self._fraction_fn(step)

    def k_bound(self, num_active):
        """(k_max, exact): a static bound on k for a layer of `num_active`
        weights, and whether k always equals it (then the picks need no
        sorting)."""
        if self.decay == "constant":
            # The graph's own float32 arithmetic, so that k == k_max.
            k = int(np.floor(np.float32(self.drop_fraction)
                             * np.float32(num_active) + np.float32(0.5)))
            return min(num_active, k), True
        if callable(self.decay):
            return num_active, False
        return min(num_active, int(math.ceil(self.drop_fraction * num_active))), False

    def get_config(self):
        decay = self.decay
        if callable(decay):
            decay = keras.saving.serialize_keras_object(decay)
        return {
            "update_interval": self.update_interval,
            "drop_fraction": self.drop_fraction,
            "decay": decay,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "total_steps": self.total_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("decay"), dict):
            config["decay"] = keras.saving.deserialize_keras_object(
                config["decay"]
            )
        return cls(**config)

    def __repr__(self):
        return f"UpdateSchedule({self.get_config()})"


# ------------------------------------------------ EDST learning-rate plans
LEARNING_RATE_PLANS = ("official", "step", "cosine")
# Factor of the base rate at the start of each refinement phase, per plan.
_DEFAULT_HEIGHT = {"official": 0.1, "step": 1.0, "cosine": 1.0}


def learning_rate_factor(plan, phase, epoch_in_phase, phase_epochs,
                         height=None):
    """Factor of the base learning rate for one epoch of an EDST run.

    Phase 0 (exploration) runs at the base rate under every plan. In a
    refinement phase of E epochs, with h = `height` (the factor the phase
    restarts at):

    - "official" (the paper's code; h = 0.1): h for the first half, h / 10
      for the second;
    - "step" (h = 1): h for the first half, h / 10 to three quarters, h / 100
      after;
    - "cosine" (h = 1; snapshot ensembles' cyclic rate, per epoch):
      h * (1 + cos(pi * e / E)) / 2 at epoch e of the phase.
    """
    if phase == 0:
        return 1.0
    h = _DEFAULT_HEIGHT[plan] if height is None else float(height)
    e, span = epoch_in_phase, float(phase_epochs)
    if plan == "official":
        return h if e < span / 2.0 else h / 10.0
    if plan == "step":
        if e < span / 2.0:
            return h
        return h / 10.0 if e < 0.75 * span else h / 100.0
    return h * 0.5 * (1.0 + math.cos(math.pi * e / span))


def default_learning_rate_plan(phase, epoch_in_phase, phase_epochs):
    """The paper code's plan ("official"), as a factor of the base rate."""
    return learning_rate_factor("official", phase, epoch_in_phase,
                                phase_epochs)
