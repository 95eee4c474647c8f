"""`EDSTCallback`: an EDST ensemble (Liu et al., 2022) in one `model.fit`."""

import math
import os
import warnings

import keras

from keras_freetickets import _edst_levers
from keras_freetickets import _keras_compat as compat
from keras_freetickets import members as members_lib
from keras_freetickets._config import ArgumentsConfig
from keras_freetickets.member_checkpoint import MemberCheckpoint
from keras_freetickets.schedules import LEARNING_RATE_PLANS
from keras_freetickets.schedules import learning_rate_factor
from keras_freetickets._validation import check_int
from keras_freetickets._validation import check_number
from keras_freetickets._validation import check_one_of
from keras_freetickets.sparsity_monitor import find_sparse_optimizer


# The paper code's EDST, one argument away: `EDSTCallback(preset="official")`.
OFFICIAL_LEVERS = _edst_levers.OFFICIAL_LEVERS


@keras.saving.register_keras_serializable(package="keras_freetickets")
class EDSTCallback(ArgumentsConfig, keras.callbacks.Callback):
    """Trains an EDST ensemble: M sparse members from ONE training run.

    The run starts with `exploration_epochs` of ordinary dynamic sparse
    training, then `num_members` refinement phases of `refinement_epochs`
    each. Every refinement phase ends by saving a member to `member_dir`
    (`member_<i>.kftm`). After each member except the last, the next train
    step is a global exploration: every sparse layer drops
    `global_drop_fraction` of its active weights by magnitude and grows as
    many (by the optimizer's `grow` rule), and the learning rate goes back up
    to the start of the plan for a refinement phase. Local mask updates go on
    in every phase but pause `quiet_steps` before each member is saved, so
    that no member holds freshly regrown weights still at zero.

    The defaults make the members differ as much as independent DST runs
    (measured on FMNIST-MLP v2, `benchmarks/edst_v2.py`): each refinement
    phase restarts at the base learning rate and decays it on a cosine; each
    global exploration replaces 98% of every layer's active weights, starts
    the grown ones at random rather than at zero, and keeps the removed ones
    out of local regrowth for the phase. With the paper code's settings
    (restart at 1/10 of the rate, q = 0.8, grown weights at zero) local RigL
    updates grow about half of the removed connections back and the members
    end as near-copies; `preset="official"` gives those settings back.

    The model must be compiled with a `SparseOptimizer` whose inner optimizer
    has a float learning rate (the plan sets it). All state is derived from
    the epoch number and the optimizer's variables, so a run resumed with
    `keras.callbacks.BackupAndRestore` (list this callback BEFORE it) resumes
    in the right phase and ends with the same members.

    Args:
        num_members: int >= 1. Number of members M.
        exploration_epochs: int >= 0. Epochs before the first refinement.
        refinement_epochs: int >= 1. Epochs of each refinement phase.
        global_drop_fraction: float in (0, 1]. q, the fraction of active
            weights each global exploration replaces (0.8 in the paper;
            0.98 by default).
        member_dir: str. Directory that receives the member files.
        global_grow: "random" (the paper's global exploration), "gradient",
            or None for the optimizer's own `grow` rule. Gradient regrowth
            tends to pick back the weights it just dropped (their gradients
            are large), which leaves members close to each other.
        base_learning_rate: float or None. Rate of the exploration phase;
            default: the optimizer's learning rate when training starts.
        learning_rate_plan: the shape of each refinement phase's rate:
            "official" (the paper's code: 1/10 of the base rate, then
            1/100), "step" (restart at the base rate, /10 at half, /100 at
            three quarters), "cosine" (restart at the base rate, cosine decay
            per epoch, as in snapshot ensembles), or a callable
            `(phase, epoch_in_phase, phase_epochs) -> factor` of the base
            rate, phase 0 being exploration (a callable is not serialized:
            `get_config` refuses it). Default "cosine". See
            `keras_freetickets.schedules.learning_rate_factor`.
        restart_height: float > 0 or None. Factor of the base rate that each
            refinement phase restarts at (the height of the restart);
            default: the plan's own (0.1 "official", 1.0 otherwise).
        exclude_dropped: bool. Keep the weights that a global exploration
            removed out of local regrowth for the rest of that phase, so the
            run cannot grow its way back to the previous member (default
            True; the paper's code does not).
        novelty: float >= 0. During refinement phases, multiply the grow
            score of weights that were never active by `1 + novelty`, biasing
            growth toward connections no earlier member used (0: off).
        refinement_drop_fraction: float in (0, 1] or None. Local drop
            fraction p inside refinement phases (default: the optimizer's).
        refinement_drop_decay: "constant" or "cosine": decay of that local
            drop fraction over each refinement phase, per epoch.
        global_grow_init: "random" (default) or "zeros" (the paper's): the
            value of the weights a global exploration grows. "random" draws
            them from N(0, r^2), r the RMS of the layer's active weights, so
            the next member starts from a partly fresh network rather than
            from the last one minus its weakest weights.
        quiet_steps: int or None. Steps without local mask updates before
            each member is saved. Default: the optimizer's `update_interval`.
        monitor: str or None. A metric in the epoch logs (for example
            `"val_loss"`); when given, each member is the phase's best epoch on
            it rather than the phase's last epoch.
        mode: "auto", "min" or "max", as in `keras.callbacks.EarlyStopping`
            ("auto": "max" for accuracy-like names, else "min").
        save_best, save_best_mode: the earlier names of `monitor` and
            `mode`, still accepted.
        preset: None or "official": "official" sets every lever above to the
            paper code's value (`OFFICIAL_LEVERS`); a lever also passed
            explicitly must agree with it.

    Example:

    ```python
    edst = kft.EDSTCallback(num_members=3, exploration_epochs=15,
                            refinement_epochs=5, member_dir="members/")
    model.fit(train_ds, epochs=edst.total_epochs, callbacks=[edst])
    ensemble = kft.FreeTicketsEnsemble.from_directory("members/")
    ```
    """

    # With the levers of `_lever_config`.
    CONFIG_ARGUMENTS = (
        "num_members", "exploration_epochs", "refinement_epochs",
        "global_drop_fraction", "member_dir", "global_grow",
        "base_learning_rate", "quiet_steps", "monitor", "mode")

    def __init__(
        self,
        num_members=3,
        exploration_epochs=15,
        refinement_epochs=5,
        global_drop_fraction=0.98,
        member_dir="members",
        global_grow="random",
        base_learning_rate=None,
        learning_rate_plan=None,
        quiet_steps=None,
        monitor=None,
        mode="auto",
        restart_height=None,
        exclude_dropped=True,
        novelty=0.0,
        refinement_drop_fraction=None,
        refinement_drop_decay="constant",
        global_grow_init="random",
        save_best=None,
        save_best_mode=None,
        preset=None,
    ):
        super().__init__()
        levers = _edst_levers.validate(preset, dict(
            learning_rate_plan=learning_rate_plan,
            restart_height=restart_height, global_grow=global_grow,
            global_drop_fraction=global_drop_fraction,
            exclude_dropped=exclude_dropped, novelty=novelty,
            refinement_drop_fraction=refinement_drop_fraction,
            refinement_drop_decay=refinement_drop_decay,
            global_grow_init=global_grow_init))
        check_int("num_members", num_members, 1)
        check_int("exploration_epochs", exploration_epochs, 0)
        check_int("refinement_epochs", refinement_epochs, 1)
        if quiet_steps is not None:
            check_int("quiet_steps", quiet_steps, 0)
        if save_best is not None:
            monitor = save_best
        if save_best_mode is not None:
            check_one_of("save_best_mode", save_best_mode, ("min", "max"))
            mode = save_best_mode

        if base_learning_rate is not None:
            check_number("base_learning_rate", base_learning_rate, 0, strict=True)
        self.num_members = int(num_members)
        self.exploration_epochs = int(exploration_epochs)
        self.refinement_epochs = int(refinement_epochs)
        for name, value in levers.items():
            setattr(self, name, value)
        self.base_learning_rate = base_learning_rate
        self.quiet_steps = quiet_steps
        self.monitor = monitor
        self.mode = mode
        # Validates member_dir, monitor and mode.
        self._checkpoint = MemberCheckpoint(
            member_dir, windows=[
                (end - self.refinement_epochs + 1, end)
                for end in self.member_epochs()],
            monitor=monitor, mode=mode, metadata=self._metadata,
        )
        self.member_dir = self._checkpoint.member_dir
        self._optimizer = None
        self._steps_per_epoch = None

    # ------------------------------------------------------------- schedule
    @property
    def total_epochs(self):
        """Epochs `model.fit` must run: exploration + M refinement phases."""
        return self.exploration_epochs + self.num_members * (
            self.refinement_epochs
        )

    def phase_of(self, epoch):
        """(phase, epoch within the phase); phase 0 is exploration, phase
        i >= 1 is the refinement that saves member i - 1."""
        if epoch < self.exploration_epochs:
            return 0, epoch
        offset = epoch - self.exploration_epochs
        phase = min(offset // self.refinement_epochs, self.num_members - 1)
        return phase + 1, offset - phase * self.refinement_epochs

    def member_epochs(self):
        """The (0-based) epochs at whose end each member is saved."""
        return [
            self.exploration_epochs + (i + 1) * self.refinement_epochs - 1
            for i in range(self.num_members)
        ]

    # ------------------------------------------------------------ callbacks
    def set_model(self, model):
        super().set_model(model)
        opt = find_sparse_optimizer(model)
        rate = compat.raw_learning_rate(opt.inner_optimizer)
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule
                      ) or callable(rate):
            raise ValueError(
                "EDSTCallback sets the learning rate of each phase, so the "
                "inner optimizer needs a float learning rate. Received: "
                f"learning_rate={rate!r}"
            )
        # Raises when the optimizer was built without the state for it.
        opt.enable_global_exploration(grow=self.global_grow)
        self._optimizer = opt
        self._checkpoint.set_model(model)
        if self.base_learning_rate is None:
            self.base_learning_rate = float(
                keras.ops.convert_to_numpy(opt.learning_rate)
            )

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and epochs < self.total_epochs:
            raise ValueError(
                f"EDST needs {self.total_epochs} epochs (exploration_epochs="
                f"{self.exploration_epochs} + num_members={self.num_members} "
                f"x refinement_epochs={self.refinement_epochs}), but fit "
                f"runs epochs={epochs}. Pass epochs=edst.total_epochs."
            )
        if epochs is not None and epochs > self.total_epochs:
            warnings.warn(
                f"fit runs {epochs} epochs, but the last EDST member is saved "
                f"after epoch {self.total_epochs}; later epochs change no "
                "member."
            )
        self._steps_per_epoch = (self.params or {}).get("steps")
        os.makedirs(self.member_dir, exist_ok=True)
        if not self._optimizer.built and self.model.built:
            # Build now rather than while tracing the first step, so that
            # the optimizer's state can be read from the first epoch on.
            self._optimizer.build(self.model.trainable_variables)

    def on_epoch_begin(self, epoch, logs=None):
        opt = self._optimizer
        phase, in_phase = self.phase_of(epoch)
        self._check_earlier_members(epoch)
        phase_epochs = (
            self.exploration_epochs if phase == 0 else self.refinement_epochs
        )
        factor = self._plan_factor(phase, in_phase, phase_epochs)
        opt.learning_rate = float(self.base_learning_rate * factor)
        step = int(keras.ops.convert_to_numpy(opt.iterations))
        if phase >= 2 and in_phase == 0:
            opt.schedule_global_exploration(step, self.global_drop_fraction)
        refining = phase > 0 and epoch < self.total_epochs
        opt.set_controls(**self._lever_controls(refining, in_phase))
        if not refining:
            opt.set_update_stop_step(None)
            return
        epochs_left = phase_epochs - in_phase
        quiet = opt.update_interval if self.quiet_steps is None else (
            self.quiet_steps
        )
        if self._steps_per_epoch:
            opt.set_update_stop_step(
                step + epochs_left * self._steps_per_epoch - quiet
            )
        elif epochs_left == 1:
            # Unknown epoch length: keep the member's last epoch quiet.
            opt.set_update_stop_step(step)
        else:
            opt.set_update_stop_step(None)

    def on_epoch_end(self, epoch, logs=None):
        phase, in_phase = self.phase_of(epoch)
        if phase == 0 or epoch >= self.total_epochs:
            return
        if not math.isfinite(float((logs or {}).get("loss", 0.0))):
            return  # NaN weights (TerminateOnNaN stops the run): no member
        index = phase - 1
        if index > 0 and logs is not None:
            # How far the run has grown back to the previous member (History
            # and a TensorBoard callback listed after this one record it).
            rates = self._optimizer.return_rates()
            if rates:
                logs["edst/return_rate"] = rates["overall"]
        self._checkpoint.on_epoch_end(epoch, logs)

    # -------------------------------------------------------------- helpers
    def _plan_factor(self, phase, in_phase, phase_epochs):
        if callable(self.learning_rate_plan):
            return self.learning_rate_plan(phase, in_phase, phase_epochs)
        return learning_rate_factor(self.learning_rate_plan, phase, in_phase,
                                    phase_epochs, self.restart_height)

    def _lever_controls(self, refining, in_phase):
        """The optimizer's lever controls for an epoch (off outside the
        refinement phases)."""
        scale = 1.0
        if refining and self.refinement_drop_fraction is not None:
            fraction = self.refinement_drop_fraction
            if self.refinement_drop_decay == "cosine":
                fraction *= 0.5 * (1.0 + math.cos(
                    math.pi * in_phase / self.refinement_epochs))
            scale = fraction / self._optimizer.drop_fraction
        return dict(
            novelty=self.novelty if refining else 0.0,
            exclude_dropped=self.exclude_dropped and refining,
            local_drop_scale=float(scale),
            global_grow_init=_edst_levers.GROW_INITS[self.global_grow_init],
        )

    def _metadata(self, index, epoch, logs):
        opt = self._optimizer
        metadata = {
            "method": "edst",
            "member_index": index,
            "phase": index + 1,
            "epoch": epoch + 1,
            "step": int(keras.ops.convert_to_numpy(opt.iterations)),
            "density": opt.overall_stats()["density"],
            "global_drop_fraction": self.global_drop_fraction,
            "seed": opt.seed,
            "levers": self._lever_config(),
        }
        rates = opt.return_rates() if index > 0 else None
        if rates:
            metadata["return_rate"] = rates["overall"]
            metadata["return_rate_per_layer"] = rates["layers"]
        return metadata

    def _check_earlier_members(self, epoch):
        for index, end in enumerate(self.member_epochs()):
            path = members_lib.member_path(self.member_dir, index)
            if end < epoch and not os.path.exists(path):
                raise RuntimeError(
                    f"EDST member {index} should have been saved after epoch "
                    f"{end + 1}, but {path} is missing. When resuming with "
                    "BackupAndRestore, list EDSTCallback before it so that "
                    "members are saved before the backup."
                )

    def _lever_config(self):
        return {
            "learning_rate_plan": (
                "custom" if callable(self.learning_rate_plan)
                else self.learning_rate_plan
            ),
            "restart_height": self.restart_height,
            "global_grow": self.global_grow,
            "global_drop_fraction": self.global_drop_fraction,
            "exclude_dropped": self.exclude_dropped,
            "novelty": self.novelty,
            "refinement_drop_fraction": self.refinement_drop_fraction,
            "refinement_drop_decay": self.refinement_drop_decay,
            "global_grow_init": self.global_grow_init,
        }

    def get_config(self):
        if callable(self.learning_rate_plan):
            raise ValueError(
                "EDSTCallback cannot serialize a callable "
                "`learning_rate_plan`; use one of "
                f"{list(LEARNING_RATE_PLANS)} with `restart_height`. "
                f"Received: learning_rate_plan={self.learning_rate_plan!r}"
            )
        return {**self._lever_config(), **super().get_config()}
