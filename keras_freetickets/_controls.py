"""Control variables of a SparseOptimizer that callbacks set (a mixin):
global explorations, the pause before a member is saved, the EDST levers."""

from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_one_of

# How a global exploration grows: the optimizer's own rule, SET or RigL.
GLOBAL_GROW_MODES = {None: 0, "random": 1, "gradient": 2}


class ExplorationControls:
    """`enable_global_exploration`, `set_controls`,
    `schedule_global_exploration` and `set_update_stop_step`."""

    def enable_global_exploration(self, grow=None):
        """Turns on global explorations, or sets how they grow.

        Global explorations need their state built in, so this works on an
        optimizer that is not built yet, or that was made with
        `global_exploration=True`; then it only sets `grow` and the traced
        step stays as it is.

        Args:
            grow: "gradient", "random" or None (the optimizer's own rule):
                how global explorations regrow weights.
        """
        check_one_of("grow", grow, GLOBAL_GROW_MODES)
        if not self.global_exploration:
            if self.built:
                raise ValueError(
                    "This SparseOptimizer was built without global "
                    "exploration. Construct it with "
                    "`global_exploration=True` (EDSTCallback needs it when "
                    "the optimizer is built before fit starts, for example "
                    "under a tf.distribute strategy)."
                )
            self.global_exploration = True
        self.set_controls(global_grow_mode=GLOBAL_GROW_MODES[grow])

    def set_controls(self, **values):
        """Sets control variables now, or their initial values before build.

        Names: update_stop_step, global_explore_step, global_drop_fraction,
        and with global exploration global_grow_mode, novelty,
        local_drop_scale, exclude_dropped, global_grow_init.
        """
        for control, value in values.items():
            if control not in self._initial_controls:
                raise ValueError(
                    f"Unknown control {control!r}. Known: "
                    f"{sorted(self._initial_controls)}"
                )
            if not self.built:
                self._initial_controls[control] = value
            elif not hasattr(self, control):
                raise ValueError(
                    f"Control {control!r} needs a SparseOptimizer built with "
                    "global_exploration=True."
                )
            else:
                getattr(self, control).assign(value)

    def schedule_global_exploration(self, step, drop_fraction):
        """Makes the train step numbered `step` a global exploration.

        At that step every sparse layer drops `drop_fraction` of its active
        weights by magnitude and grows as many (by `grow`), whatever the
        local update schedule says.
        """
        check_fraction("drop_fraction", drop_fraction)
        if drop_fraction > self.drop_fraction and not self.global_exploration:
            raise ValueError(
                "Construct the SparseOptimizer with global_exploration=True "
                "(or call enable_global_exploration() before it is built) to "
                f"drop more than `drop_fraction` ({self.drop_fraction}). "
                f"Received: drop_fraction={drop_fraction}"
            )
        self.set_controls(global_explore_step=int(step),
                          global_drop_fraction=float(drop_fraction))

    def set_update_stop_step(self, step):
        """Pauses local mask updates from train step `step` on.

        `None` restores the configured `update_end_step`.
        """
        end = self.schedule.stop_step
        step = end if step is None else min(int(step), end)
        self.set_controls(update_stop_step=int(step))
