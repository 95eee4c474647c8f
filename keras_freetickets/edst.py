"""`EDSTCallback`: an EDST ensemble (Liu et al., 2022) in one `model.fit`."""

import math
import os
import warnings

import keras

from keras_freetickets import members as members_lib
from keras_freetickets._validation import check_fraction
from keras_freetickets._validation import check_int
from keras_freetickets.sparsity_monitor import find_sparse_optimizer


def default_learning_rate_plan(phase, epoch_in_phase, phase_epochs):
    """The paper code's plan, as a factor of the base learning rate.

    Phase 0 (exploration) runs at the base rate; each refinement phase runs at
    1/10 of it for its first half and 1/100 for its second half.
    """
    if phase == 0:
        return 1.0
    return 0.1 if epoch_in_phase < phase_epochs / 2.0 else 0.01


@keras.saving.register_keras_serializable(package="keras_freetickets")
class EDSTCallback(keras.callbacks.Callback):
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
            weights each global exploration replaces (0.8 in the paper).
        member_dir: str. Directory that receives the member files.
        global_grow: "random" (the paper's global exploration), "gradient",
            or None for the optimizer's own `grow` rule. Gradient regrowth
            tends to pick back the weights it just dropped (their gradients
            are large), which leaves members close to each other.
        base_learning_rate: float or None. Rate of the exploration phase;
            default: the optimizer's learning rate when training starts.
        learning_rate_plan: callable `(phase, epoch_in_phase, phase_epochs)
            -> factor` of the base rate, phase 0 being exploration. Default:
            `default_learning_rate_plan`.
        quiet_steps: int or None. Steps without local mask updates before
            each member is saved. Default: the optimizer's `update_interval`.
        save_best: str or None. A metric in the epoch logs (for example
            `"val_loss"`); when given, each member is the phase's best epoch on
            it rather than the phase's last epoch.
        save_best_mode: "min" or "max".

    Example:

    ```python
    edst = kft.EDSTCallback(num_members=3, exploration_epochs=15,
                            refinement_epochs=5, member_dir="members/")
    model.fit(train_ds, epochs=edst.total_epochs, callbacks=[edst])
    ensemble = kft.FreeTicketsEnsemble.from_directory("members/")
    ```
    """

    def __init__(
        self,
        num_members=3,
        exploration_epochs=15,
        refinement_epochs=5,
        global_drop_fraction=0.8,
        member_dir="members",
        global_grow="random",
        base_learning_rate=None,
        learning_rate_plan=None,
        quiet_steps=None,
        save_best=None,
        save_best_mode="min",
    ):
        super().__init__()
        check_int("num_members", num_members, 1)
        check_int("exploration_epochs", exploration_epochs, 0)
        check_int("refinement_epochs", refinement_epochs, 1)
        check_fraction("global_drop_fraction", global_drop_fraction)
        if not member_dir or not isinstance(member_dir, (str, os.PathLike)):
            raise ValueError(
                "Argument `member_dir` must be a directory path. "
                f"Received: member_dir={member_dir!r}"
            )
        if quiet_steps is not None:
            check_int("quiet_steps", quiet_steps, 0)
        if save_best_mode not in ("min", "max"):
            raise ValueError(
                "Argument `save_best_mode` must be 'min' or 'max'. "
                f"Received: save_best_mode={save_best_mode!r}"
            )
        if base_learning_rate is not None and not base_learning_rate > 0:
            raise ValueError(
                "Argument `base_learning_rate` must be > 0. "
                f"Received: base_learning_rate={base_learning_rate!r}"
            )
        self.num_members = int(num_members)
        self.exploration_epochs = int(exploration_epochs)
        self.refinement_epochs = int(refinement_epochs)
        self.global_drop_fraction = float(global_drop_fraction)
        if global_grow not in ("random", "gradient", None):
            raise ValueError(
                "Argument `global_grow` must be 'random', 'gradient' or None. "
                f"Received: global_grow={global_grow!r}"
            )
        self.member_dir = os.fspath(member_dir)
        self.global_grow = global_grow
        self.base_learning_rate = base_learning_rate
        self.learning_rate_plan = learning_rate_plan or (
            default_learning_rate_plan
        )
        self.quiet_steps = quiet_steps
        self.save_best = save_best
        self.save_best_mode = save_best_mode
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
        if isinstance(opt.inner_optimizer._learning_rate, (
            keras.optimizers.schedules.LearningRateSchedule,
        )) or callable(opt.inner_optimizer._learning_rate):
            raise ValueError(
                "EDSTCallback sets the learning rate of each phase, so the "
                "inner optimizer needs a float learning rate. Received: "
                f"learning_rate={opt.inner_optimizer._learning_rate!r}"
            )
        if (
            opt.enable_global_exploration(grow=self.global_grow)
            and getattr(model, "train_function", None) is not None
        ):
            model.train_function = None  # retrace with the global branch
        self._optimizer = opt
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
        factor = self.learning_rate_plan(phase, in_phase, phase_epochs)
        opt.learning_rate = float(self.base_learning_rate * factor)
        step = int(keras.ops.convert_to_numpy(opt.iterations))
        if phase >= 2 and in_phase == 0:
            opt.schedule_global_exploration(step, self.global_drop_fraction)
        if phase == 0 or epoch >= self.total_epochs:
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
        last = in_phase == self.refinement_epochs - 1
        metadata = self._metadata(index, epoch, logs)
        if self.save_best:
            candidate = self._candidate_path(index)
            if self._improves(candidate, logs, in_phase == 0):
                members_lib.save_member(
                    self.model, candidate, metadata, overwrite=True
                )
            if last:
                os.replace(candidate, members_lib.member_path(
                    self.member_dir, index
                ))
        elif last:
            members_lib.save_member(
                self.model, members_lib.member_path(self.member_dir, index),
                metadata, overwrite=True,
            )

    # -------------------------------------------------------------- helpers
    def _candidate_path(self, index):
        # Under multi-worker training every worker writes candidates; each
        # gets its own file so that they never replace one another's.
        worker = _worker_suffix()
        return os.path.join(
            self.member_dir,
            f".candidate_{index}{worker}{members_lib.MEMBER_EXTENSION}",
        )

    def _improves(self, candidate, logs, first_epoch):
        if not logs or self.save_best not in logs:
            raise ValueError(
                f"Argument `save_best` names {self.save_best!r}, which the "
                f"epoch logs do not hold. Available: {sorted(logs or {})}"
            )
        if first_epoch or not os.path.exists(candidate):
            return True
        best = members_lib.read_member_metadata(candidate).get("monitor")
        value = float(logs[self.save_best])
        return value < best if self.save_best_mode == "min" else value > best

    def _metadata(self, index, epoch, logs):
        opt = self._optimizer
        stats = opt.layer_stats()
        active = sum(s["active"] for s in stats)
        total = sum(s["total"] for s in stats)
        metadata = {
            "method": "edst",
            "member_index": index,
            "phase": index + 1,
            "epoch": epoch + 1,
            "step": int(keras.ops.convert_to_numpy(opt.iterations)),
            "density": active / total,
            "global_drop_fraction": self.global_drop_fraction,
            "seed": opt.seed,
        }
        if self.save_best and logs and self.save_best in logs:
            metadata["monitor"] = float(logs[self.save_best])
            metadata["monitor_name"] = self.save_best
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

    def get_config(self):
        return {
            "num_members": self.num_members,
            "exploration_epochs": self.exploration_epochs,
            "refinement_epochs": self.refinement_epochs,
            "global_drop_fraction": self.global_drop_fraction,
            "member_dir": self.member_dir,
            "global_grow": self.global_grow,
            "base_learning_rate": self.base_learning_rate,
            "quiet_steps": self.quiet_steps,
            "save_best": self.save_best,
            "save_best_mode": self.save_best_mode,
        }

    @classmethod
    def from_config(cls, config):
        """Rebuilds the callback; a custom `learning_rate_plan` is not
        serialized and falls back to the default plan."""
        return cls(**config)


def _worker_suffix():
    from keras_freetickets.distributed import read_tf_config

    config = read_tf_config()  # a TF_CONFIG that does not parse is an error
    task = config.get("task") or {}
    if not task or len(config.get("cluster", {}).get("worker", [])) < 2:
        return ""
    return f".{task.get('type', 'worker')}{task.get('index', 0)}"
