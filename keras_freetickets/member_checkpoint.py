"""`MemberCheckpoint`: the callback that saves ensemble members, for EDST and DST."""

import os

import keras

from keras_freetickets import members as members_lib
from keras_freetickets._tf_config import read_tf_config
from keras_freetickets._validation import check_one_of

MODES = ("auto", "min", "max")
_MAXIMIZED = ("acc", "auc", "precision", "recall", "f1")


@keras.saving.register_keras_serializable(package="keras_freetickets")
class MemberCheckpoint(keras.callbacks.Callback):
    """Saves ensemble members as `.kftm` files while a model trains.

    Member `indices[i]` is written to `member_dir/member_<indices[i]>.kftm`
    when epoch `windows[i][1]` (0-based) ends. With `monitor`, it is the
    model of the best epoch of the window `windows[i]` on that metric instead
    of its last: every improving epoch is saved to a hidden candidate file,
    which replaces the member file at the window's end. With
    `windows=None`, the member is the model at the end of training
    (`on_train_end`, after the callbacks listed before this one, such as an
    `EarlyStopping` that restores its best weights). Files are written
    atomically, so an interrupted run never leaves a partial member.

    `EDSTCallback` saves its members through one of these (one window per
    refinement phase) and `train_dst_ensemble` through another (one member at
    the end of each run).

    Args:
        member_dir: str. Directory of the member files.
        indices: list of ints. Member index of each window (default
            0, 1, ...).
        windows: list of `(first_epoch, last_epoch)` pairs, or None.
        monitor: str or None. A metric of the epoch logs, e.g. "val_loss".
        mode: "auto", "min" or "max", as in `keras.callbacks.EarlyStopping`
            ("auto": "max" for accuracy-like names, else "min").
        metadata: callable `(index, epoch, logs) -> dict` of JSON values
            stored with the member, or None.

    Example:

    ```python
    saver = kft.members.MemberCheckpoint("members/", indices=[0, 1],
                                         windows=[(3, 5), (6, 8)],
                                         monitor="val_loss")
    model.fit(x, y, epochs=9, validation_split=0.1, callbacks=[saver])
    ```
    """

    def __init__(self, member_dir, indices=None, windows=None, monitor=None,
                 mode="auto", metadata=None):
        super().__init__()
        if not member_dir or not isinstance(member_dir, (str, os.PathLike)):
            raise ValueError(
                "Argument `member_dir` must be a directory path. "
                f"Received: member_dir={member_dir!r}"
            )
        check_one_of("mode", mode, MODES)
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(
                "Argument `monitor` must be a metric name or None. "
                f"Received: monitor={monitor!r}"
            )
        if windows is not None:
            windows = [tuple(int(e) for e in w) for w in windows]
            if any(len(w) != 2 or w[0] > w[1] or w[0] < 0 for w in windows):
                raise ValueError(
                    "Argument `windows` must hold (first_epoch, last_epoch) "
                    f"pairs with 0 <= first <= last. Received: "
                    f"windows={windows!r}"
                )
        count = 1 if windows is None else len(windows)
        indices = list(range(count)) if indices is None else list(indices)
        if len(indices) != count:
            raise ValueError(
                f"Argument `indices` must name one member per window "
                f"({count}). Received: indices={indices!r}"
            )
        self.member_dir = os.fspath(member_dir)
        self.indices = indices
        self.windows = windows
        self.monitor = monitor
        self.mode = mode
        self.metadata = metadata

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        for index, (first, last) in zip(self.indices, self.windows or []):
            if not first <= epoch <= last:
                continue
            target = members_lib.member_path(self.member_dir, index)
            if not self.monitor:
                if epoch == last:
                    self._save(target, index, epoch, logs)
                continue
            candidate = self._candidate_path(index)
            if self._improves(candidate, logs, epoch == first):
                self._save(candidate, index, epoch, logs)
            if epoch == last:
                os.replace(candidate, target)

    def on_train_end(self, logs=None):
        if self.windows is None:
            index = self.indices[0]
            self._save(members_lib.member_path(self.member_dir, index),
                       index, getattr(self, "_last_epoch", None), logs)

    def maximize(self):
        """Whether a larger `monitor` value is better."""
        if self.mode != "auto":
            return self.mode == "max"
        return any(word in self.monitor.lower() for word in _MAXIMIZED)

    def _save(self, path, index, epoch, logs):
        metadata = dict(self.metadata(index, epoch, logs)
                        if self.metadata else {})
        if self.monitor and logs and self.monitor in logs:
            metadata["monitor"] = float(logs[self.monitor])
            metadata["monitor_name"] = self.monitor
        members_lib.save_member(self.model, path, metadata, overwrite=True)

    def _candidate_path(self, index):
        # Under multi-worker training every worker writes candidates; each
        # gets its own file so that they never replace one another's.
        return os.path.join(
            self.member_dir,
            f".candidate_{index}{_worker_suffix()}"
            f"{members_lib.MEMBER_EXTENSION}",
        )

    def _improves(self, candidate, logs, first_epoch):
        if not logs or self.monitor not in logs:
            raise ValueError(
                f"Argument `monitor` names {self.monitor!r}, which the "
                f"epoch logs do not hold. Available: {sorted(logs or {})}"
            )
        if first_epoch or not os.path.exists(candidate):
            return True
        best = members_lib.read_member_metadata(candidate).get("monitor")
        value = float(logs[self.monitor])
        return value > best if self.maximize() else value < best

    def get_config(self):
        if self.metadata is not None:
            raise ValueError(
                "MemberCheckpoint cannot serialize a `metadata` callable. "
                f"Received: metadata={self.metadata!r}"
            )
        return {"member_dir": self.member_dir, "indices": self.indices,
                "windows": self.windows, "monitor": self.monitor,
                "mode": self.mode}


def _worker_suffix():
    config = read_tf_config()  # a TF_CONFIG that does not parse is an error
    task = config.get("task") or {}
    if not task or len(config.get("cluster", {}).get("worker", [])) < 2:
        return ""
    return f".{task.get('type', 'worker')}{task.get('index', 0)}"
