"""`BackupAndRestore`: a crash-consistent drop-in for Keras' callback.

`keras.callbacks.BackupAndRestore` writes the weights (`latest.weights.h5`)
and the epoch (`training_metadata.json`) as two separate files, each
overwritten in place. A process killed while the weights file is written
leaves a torn HDF5 file (the restart fails with "bad object header version
number"), and one killed between the two writes resumes from the wrong epoch
with the newer weights.

This callback writes each backup as a new, complete checkpoint folder
`ckpt-<n>` holding both files. The folder is first written as
`ckpt-<n>.tmp-<id>`, its files and the folder itself are flushed to disk, and
only then is it renamed to `ckpt-<n>`: the rename is the commit, so a
`ckpt-<n>` folder is always complete, and the weights and the epoch in it
always belong together. A small `checkpoint` file (JSON, also replaced
atomically) then names the newest checkpoint for people and tools, and older
checkpoints are deleted (one is kept with `double_checkpoint=True`). On
restart the newest `ckpt-<n>` that loads is restored and leftover
`*.tmp-*` folders are removed, so a SIGKILL at any moment resumes either from
the previous backup or from the new one, never from a mix.
"""

import json
import os
import re
import shutil
import uuid

import keras
import numpy as np

from keras_freetickets import _keras_compat as compat
from keras_freetickets._config import ArgumentsConfig
from keras_freetickets._validation import check_bool
from keras_freetickets._validation import is_int

_CKPT = re.compile(r"^ckpt-(\d+)$")
_WEIGHTS = "model.weights.h5"
_METADATA = "training_metadata.json"
_POINTER = "checkpoint"
_FORMAT = "keras_freetickets.backup"


@keras.saving.register_keras_serializable(package="keras_freetickets")
class BackupAndRestore(ArgumentsConfig, keras.callbacks.Callback):
    """Backs up the training state crash-consistently and resumes from it.

    Same arguments and behaviour as `keras.callbacks.BackupAndRestore`: the
    model's weights and its optimizer's state (for a `SparseOptimizer`: the
    masks, the record of weights ever active and the update counters) are
    saved at the end of every epoch (or every `save_freq` batches), restored
    when `fit` starts again, and the epoch count resumes where the backup
    was taken. Unlike Keras' callback, the weights and the epoch are
    committed together by one atomic rename of a complete checkpoint folder
    (see the module docstring), so a kill at any moment, even inside a
    backup, resumes from the previous or the new backup, never from a torn
    file or a mix. A backup is not taken when the logged loss is NaN or
    infinite, and then the folder is not deleted when `fit` ends either, so
    a run stopped by `keras.callbacks.TerminateOnNaN` can be resumed from its
    last finite state. List `EDSTCallback` before this callback so
    that a member is saved before the backup of the epoch that ends its
    phase. Under multi-worker training give every worker its own folder
    (`kft.distributed.worker_backup_dir`). With an integer `save_freq` a
    resumed run starts the interrupted epoch from its first batch with the
    weights of the last backup, as Keras' callback does; only
    `save_freq="epoch"` resumes bit for bit (under the conditions in the
    README's "State, saving and resuming").

    Args:
        backup_dir: str or path-like. Folder for the checkpoints, used by
            this run only.
        save_freq: `"epoch"` or an int >= 1: back up at the end of every
            epoch, or every `save_freq` batches.
        double_checkpoint: bool. Keep the previous checkpoint as well, and
            fall back to it if the newest one cannot be read (for example
            after disk corruption).
        delete_checkpoint: bool. Delete `backup_dir` when `fit` completes.

    Example:

    ```python
    edst = kft.EDSTCallback(num_members=3, exploration_epochs=4,
                            refinement_epochs=4, member_dir="members")
    backup = kft.BackupAndRestore("backup")
    model.fit(x, y, epochs=edst.total_epochs, shuffle=False,
              callbacks=[edst, backup])  # rerun the same line after a crash
    ```
    """

    CONFIG_ARGUMENTS = (
        "backup_dir", "save_freq", "double_checkpoint", "delete_checkpoint")

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False,
                 delete_checkpoint=True):
        super().__init__()
        if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(
            backup_dir
        ):
            raise ValueError(
                "Argument `backup_dir` must be a non-empty folder path. "
                f"Received: backup_dir={backup_dir!r}"
            )
        if save_freq != "epoch" and (not is_int(save_freq) or save_freq < 1):
            raise ValueError(
                "Argument `save_freq` must be 'epoch' or an integer >= 1. "
                f"Received: save_freq={save_freq!r}"
            )
        check_bool("double_checkpoint", double_checkpoint)
        check_bool("delete_checkpoint", delete_checkpoint)
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._current_epoch = 0
        self._last_batch_seen = 0
        self._batches_since_save = 0
        self._non_finite = False
        self.restored_from = None

    # ------------------------------------------------------------- restore
    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, your model must be built "
                f"before you call `fit()`. Model '{self.model.name}' is not "
                "built: call it on data or call `model.build(input_shape)`."
            )
        self._batches_since_save = 0
        self._non_finite = False
        self.restored_from = None
        if not os.path.isdir(self.backup_dir):
            if os.path.lexists(self.backup_dir):
                raise ValueError(
                    "Argument `backup_dir` must be a folder, but a file is "
                    f"there. Received: backup_dir={self.backup_dir!r}"
                )
            return
        self._remove_temporaries()
        checkpoints = self._checkpoints()
        if not checkpoints:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            # Optimizer variables (masks, slots) must exist to be loaded.
            optimizer.build(self.model.trainable_variables)
        errors = []
        for number in reversed(checkpoints):
            folder = self._folder(number)
            try:
                metadata = _read_metadata(folder)
            except Exception as e:  # a damaged checkpoint: try an older one
                errors.append(f"{folder}: {type(e).__name__}: {e}")
                continue
            self._check_optimizer(metadata)
            try:
                self.model.load_weights(os.path.join(folder, _WEIGHTS))
            except Exception as e:
                errors.append(f"{folder}: {type(e).__name__}: {e}")
                continue
            compat.set_initial_epoch(self.model, metadata["epoch"])
            self._current_epoch = int(metadata["epoch"])
            self.restored_from = folder
            return
        raise ValueError(
            f"No checkpoint in backup_dir={self.backup_dir!r} could be "
            "restored (the files were damaged after they were written; pass "
            "`double_checkpoint=True` to keep a second one). Tried: "
            + "; ".join(errors)
        )

    # ---------------------------------------------------------------- save
    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        if self.save_freq == "epoch":
            self._save(logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        if batch <= self._last_batch_seen:  # a new epoch began
            self._batches_since_save += batch + 1
        else:
            self._batches_since_save += batch - self._last_batch_seen
        self._last_batch_seen = batch
        if self._batches_since_save >= self.save_freq:
            self._batches_since_save = 0
            self._save(logs)

    def _save(self, logs):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.all(np.isfinite(np.asarray(loss, float))):
            self._non_finite = True
            return  # keep the last finite state
        optimizer = self.model.optimizer
        write_checkpoint(self.model, self.backup_dir, {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "optimizer_variables": (
                len(optimizer.variables) if optimizer is not None else 0
            ),
        }, keep=2 if self.double_checkpoint else 1)

    def _check_optimizer(self, metadata):
        """Keras loads no optimizer state at all, with only a warning, when
        the counts differ: the masks would be lost. Refuse instead."""
        saved = metadata.get("optimizer_variables")
        optimizer = self.model.optimizer
        have = len(optimizer.variables) if optimizer is not None else 0
        if saved is not None and saved != have:
            raise ValueError(
                f"The backup in backup_dir={self.backup_dir!r} holds {saved} "
                f"optimizer variables (masks, slots, counters) but this "
                f"model's optimizer has {have}: it is not configured like the "
                "run that wrote the backup (for example an EDSTCallback adds "
                "global-exploration state, and another optimizer has other "
                "slots). Compile the same optimizer with the same callbacks, "
                "or delete the folder to start over."
            )

    def on_train_end(self, logs=None):
        if self._non_finite:
            return  # stopped on NaN (TerminateOnNaN): keep the last finite state
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            delete_backup(self.backup_dir)

    # ------------------------------------------------------------- helpers
    def _folder(self, number):
        return os.path.join(self.backup_dir, f"ckpt-{number}")

    def _checkpoints(self):
        return list_checkpoints(self.backup_dir)

    def _remove_temporaries(self):
        for name in os.listdir(self.backup_dir):
            if ".tmp-" in name:
                _remove(os.path.join(self.backup_dir, name))



def list_checkpoints(backup_dir):
    """The numbers of the committed checkpoints `ckpt-<n>` of a backup folder,
    oldest first (an empty list if the folder does not exist)."""
    backup_dir = os.fspath(backup_dir)
    if not os.path.isdir(backup_dir):
        return []
    numbers = []
    for name in os.listdir(backup_dir):
        match = _CKPT.match(name)
        if match and os.path.isdir(os.path.join(backup_dir, name)):
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def write_checkpoint(model, backup_dir, metadata, keep=1):
    """Writes one checkpoint folder atomically and drops the older ones.

    The folder `ckpt-<n>` (n one more than the newest) appears complete or
    not at all; the `checkpoint` pointer file is replaced atomically after
    it; then all but the `keep` newest checkpoints are deleted.

    Returns:
        The path of the new checkpoint folder.
    """
    backup_dir = os.fspath(backup_dir)
    os.makedirs(backup_dir, exist_ok=True)
    existing = list_checkpoints(backup_dir)
    number = existing[-1] + 1 if existing else 0
    name = f"ckpt-{number}"
    final = os.path.join(backup_dir, name)
    tmp = os.path.join(backup_dir, f"{name}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(tmp)
        weights = os.path.join(tmp, _WEIGHTS)
        model.save_weights(weights, overwrite=True)
        record = dict(metadata, format=_FORMAT,
                      weights_bytes=os.path.getsize(weights))
        _write_file(os.path.join(tmp, _METADATA), json.dumps(record).encode())
        _fsync_path(weights)
        _fsync_path(tmp)
        os.replace(tmp, final)  # the commit
        _fsync_path(backup_dir)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise OSError(
                e.errno,
                f"Could not write the training backup {final} "
                f"({e.strerror or e}); the previous backup in {backup_dir} "
                "is unchanged",
            ) from e
        raise
    pointer = json.dumps({"latest": name, "epoch": metadata.get("epoch")})
    pointer_tmp = os.path.join(backup_dir, f"{_POINTER}.tmp-{uuid.uuid4().hex}")
    try:
        _write_file(pointer_tmp, pointer.encode())
        os.replace(pointer_tmp, os.path.join(backup_dir, _POINTER))
        _fsync_path(backup_dir)
    except OSError:
        # The pointer is informative only; restore scans the folders.
        _remove(pointer_tmp)
    for old in existing[: max(0, len(existing) + 1 - keep)]:
        _delete_checkpoint(backup_dir, old)
    return final


def delete_backup(backup_dir):
    """Deletes a backup folder so that a kill midway leaves it restorable:
    checkpoints go oldest first, each renamed away before it is removed."""
    backup_dir = os.fspath(backup_dir)
    for number in list_checkpoints(backup_dir):
        _delete_checkpoint(backup_dir, number)
    shutil.rmtree(backup_dir, ignore_errors=True)


def _delete_checkpoint(backup_dir, number):
    folder = os.path.join(backup_dir, f"ckpt-{number}")
    doomed = f"{folder}.tmp-deleted-{uuid.uuid4().hex}"
    try:
        os.replace(folder, doomed)
    except OSError:
        return
    _remove(doomed)


def _read_metadata(folder):
    with open(os.path.join(folder, _METADATA), "rb") as f:
        metadata = json.loads(f.read().decode("utf-8"))
    if metadata.get("format") != _FORMAT or not isinstance(
        metadata.get("epoch"), int
    ):
        raise ValueError(f"not a {_FORMAT} metadata file: {metadata!r}")
    size = os.path.getsize(os.path.join(folder, _WEIGHTS))
    if size != metadata.get("weights_bytes"):
        raise ValueError(
            f"weights file has {size} bytes, expected {metadata.get('weights_bytes')}"
        )
    return metadata


def _write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # some file systems refuse folder fsync
            raise
    finally:
        os.close(fd)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass
