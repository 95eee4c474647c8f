"""`kft.BackupAndRestore`: crash consistency of the backup write and restore.

A crash is injected (an exception that no code catches, raised from inside
the write) at every step of a backup write; a fresh model restored from the
folder must then hold exactly the state of the previous backup or of the
new one, with the epoch that belongs to it. The SIGKILL version across a
whole EDST run is the kill campaign of `benchmarks/faults.py` (its short
version is in `tests/test_faults.py`).
"""

import json
import os

import keras
import numpy as np
import pytest

import keras_freetickets as kft
from keras_freetickets import backup as backup_lib


class Crash(BaseException):
    """Stands for a SIGKILL: nothing in the library catches it."""


def build():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="relu"),
        keras.layers.Dense(3),
    ])
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                              sparsity=0.7, update_interval=2, seed=3)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    return x, rng.integers(0, 3, 32)


def state(model):
    """Every model weight and optimizer variable (masks, slots, counters)."""
    values = [np.array(v.numpy()) for v in model.weights]
    values += [np.array(v.numpy()) for v in model.optimizer.variables]
    return values


def same(a, b):
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b)
    )


def restore(folder):
    """A fresh model restored from `folder`: (state, initial epoch)."""
    model = build()
    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    callback.on_train_begin()
    return state(model), model._initial_epoch


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


@pytest.fixture
def two_states(tmp_path):
    """A backup of epoch 1 on disk, and the states after epochs 1 and 2."""
    x, y = data()
    model = build()
    folder = str(tmp_path / "backup")
    callback = kft.BackupAndRestore(folder, delete_checkpoint=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback])
    first = state(model)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    second = state(model)
    assert not same(first, second)
    # Masks moved between the two states (update every 2 steps).
    assert int(model.optimizer.mask_updates.numpy()) >= 2
    return model, folder, first, second


# Each step of a backup write, and how to crash there.
POINTS = [
    "makedirs", "save_weights_midway", "metadata", "fsync", "commit",
    "pointer", "delete_old",
]


@pytest.mark.parametrize("point", POINTS)
def test_crash_anywhere_in_a_backup_restores_old_or_new(two_states, point,
                                                        monkeypatch):
    model, folder, first, second = two_states
    real_replace, real_makedirs = os.replace, os.makedirs

    def crash(*args, **kwargs):
        raise Crash(point)

    if point == "makedirs":
        monkeypatch.setattr(backup_lib.os, "makedirs", lambda p, exist_ok=False: (
            real_makedirs(p, exist_ok=exist_ok) if exist_ok else crash()))
    elif point == "save_weights_midway":
        def torn(self, path, overwrite=True):
            with open(path, "wb") as f:
                f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
            raise Crash(point)
        monkeypatch.setattr(keras.Model, "save_weights", torn)
    elif point == "metadata":
        monkeypatch.setattr(backup_lib, "_write_file", crash)
    elif point == "fsync":
        monkeypatch.setattr(backup_lib, "_fsync_path", crash)
    elif point == "commit":
        monkeypatch.setattr(backup_lib.os, "replace", crash)
    elif point == "pointer":
        def after_commit(src, dst):
            if os.path.basename(dst) == backup_lib._POINTER:
                raise Crash(point)
            return real_replace(src, dst)
        monkeypatch.setattr(backup_lib.os, "replace", after_commit)
    elif point == "delete_old":
        monkeypatch.setattr(backup_lib, "_delete_checkpoint", crash)

    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    with pytest.raises(Crash):
        callback.on_epoch_end(1, {"loss": 1.0})
    monkeypatch.undo()

    restored, epoch = restore(folder)
    committed = point in ("pointer", "delete_old")
    if committed:
        assert epoch == 2 and same(restored, second)
    else:
        assert epoch == 1 and same(restored, first)
    assert leftovers(folder) == []
    # The next backup after the crash commits normally.
    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    callback.on_epoch_end(2, {"loss": 1.0})
    restored, epoch = restore(folder)
    assert epoch == 3 and same(restored, second)
    assert backup_lib.list_checkpoints(folder)[-1] >= 1


def test_leftovers_of_a_kill_are_removed_and_ignored(two_states):
    _, folder, first, _ = two_states
    # What a SIGKILL inside a write leaves: a temporary checkpoint folder
    # with a torn weights file, and a temporary pointer file.
    torn = os.path.join(folder, "ckpt-7.tmp-deadbeef")
    os.makedirs(torn)
    with open(os.path.join(torn, "model.weights.h5"), "wb") as f:
        f.write(b"\x89HDF")
    with open(os.path.join(folder, "checkpoint.tmp-0"), "w") as f:
        f.write("{")
    restored, epoch = restore(folder)
    assert epoch == 1 and same(restored, first)
    assert leftovers(folder) == []


def test_damaged_newest_checkpoint_falls_back_to_previous(two_states):
    model, folder, first, second = two_states
    callback = kft.BackupAndRestore(folder, double_checkpoint=True)
    callback.set_model(model)
    callback.on_epoch_end(1, {"loss": 0.5})
    numbers = backup_lib.list_checkpoints(folder)
    assert len(numbers) == 2  # double_checkpoint keeps the previous one
    newest = os.path.join(folder, f"ckpt-{numbers[-1]}", "model.weights.h5")
    with open(newest, "r+b") as f:  # bit rot after the write
        f.seek(0)
        f.write(b"garbage!")
    restored, epoch = restore(folder)
    assert epoch == 1 and same(restored, first)


def test_every_checkpoint_damaged_is_a_clear_error(two_states):
    _, folder, _, _ = two_states
    (number,) = backup_lib.list_checkpoints(folder)
    meta = os.path.join(folder, f"ckpt-{number}", "training_metadata.json")
    with open(meta, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="No checkpoint in backup_dir=.*could be"):
        restore(folder)


def test_fit_resumes_at_the_backed_up_epoch_and_deletes_the_folder(tmp_path):
    x, y = data()
    folder = str(tmp_path / "b")

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise Crash("stop")

    model = build()
    with pytest.raises(Crash):
        model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                  callbacks=[kft.BackupAndRestore(folder), Stop()])
    with open(os.path.join(folder, "checkpoint")) as f:
        assert json.load(f)["epoch"] == 2
    saved = state(model)
    model = build()
    callback = kft.BackupAndRestore(folder)
    history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False,
                        verbose=0, callbacks=[callback])
    assert history.epoch == [2, 3]
    assert callback.restored_from.endswith("ckpt-1")
    assert not os.path.exists(folder)
    assert not same(state(model), saved)


def test_restore_into_an_optimizer_configured_otherwise_is_refused(
        two_states):
    """Keras would skip the whole optimizer state with a warning (masks
    lost); the callback names both counts instead and loads nothing."""
    _, folder, _, _ = two_states
    model = build()
    model.compile(
        kft.SparseOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                            sparsity=0.7, update_interval=2, seed=3,
                            global_exploration=True),
        keras.losses.SparseCategoricalCrossentropy(True),
    )
    model.optimizer.build(model.trainable_variables)  # masks the kernels
    before = [w.numpy() for w in model.weights]
    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    with pytest.raises(ValueError, match=r"holds \d+ optimizer variables .* "
                       r"this model's optimizer has \d+"):
        callback.on_train_begin()
    assert callback.restored_from is None
    assert same([w.numpy() for w in model.weights], before)


def test_non_finite_loss_keeps_the_last_finite_backup(two_states):
    model, folder, first, _ = two_states
    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(1, {"loss": float("nan")})
    callback.on_train_end()  # TerminateOnNaN ends fit "normally"
    assert os.path.isdir(folder)  # kept, to resume after fixing the data
    restored, epoch = restore(folder)
    assert epoch == 1 and same(restored, first)
    # A run that ends on finite losses deletes it as usual.
    callback.on_train_begin()
    callback.on_epoch_end(1, {"loss": 0.5})
    callback.on_train_end()
    assert not os.path.exists(folder)


def test_storage_fault_in_a_backup_names_it_and_keeps_the_old(two_states,
                                                             monkeypatch):
    model, folder, first, _ = two_states

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_lib, "_write_file", full_disk)
    callback = kft.BackupAndRestore(folder)
    callback.set_model(model)
    with pytest.raises(OSError, match="Could not write the training backup") as info:
        callback.on_epoch_end(1, {"loss": 1.0})
    assert info.value.errno == 28
    monkeypatch.undo()
    assert leftovers(folder) == []
    restored, epoch = restore(folder)
    assert epoch == 1 and same(restored, first)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backup_dir=""), "backup_dir"),
    (dict(backup_dir=3), "backup_dir=3"),
    (dict(backup_dir="b", save_freq=0), "save_freq=0"),
    (dict(backup_dir="b", save_freq="batch"), "save_freq='batch'"),
    (dict(backup_dir="b", double_checkpoint="yes"), "double_checkpoint='yes'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kft.BackupAndRestore(**kwargs)


def test_config_round_trip():
    callback = kft.BackupAndRestore("b", save_freq=5, double_checkpoint=True)
    config = keras.saving.serialize_keras_object(callback)
    again = keras.saving.deserialize_keras_object(config)
    assert isinstance(again, kft.BackupAndRestore)
    assert again.get_config() == callback.get_config()
    assert again.save_freq == 5 and again.double_checkpoint
