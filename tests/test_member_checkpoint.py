"""Tests of MemberCheckpoint, the member saver that EDST and DST share."""

import os

import keras
import numpy as np
import pytest

from keras_freetickets import members as members_lib
from keras_freetickets.member_checkpoint import MemberCheckpoint


def model_and_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(True),
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    return model, x, x[:, :3].argmax(1)


class Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.by_epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch.append([w.numpy().copy() for w in self.model.weights])


def saved_weights(folder, index):
    return list(members_lib.read_member_weights(
        members_lib.member_path(folder, index)).values())


def test_windows_save_each_member_at_its_last_or_best_epoch(tmp_path):
    model, x, y = model_and_data()
    record = Weights()
    last = MemberCheckpoint(tmp_path / "last", windows=[(0, 1), (2, 4)])
    best = MemberCheckpoint(tmp_path / "best", indices=[5, 6],
                            windows=[(0, 1), (2, 4)], monitor="val_loss")
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0,
                        validation_data=(x[:32], y[:32]),
                        callbacks=[record, last, best])
    for index, epoch in ((0, 1), (1, 4)):
        for a, b in zip(saved_weights(tmp_path / "last", index),
                        record.by_epoch[epoch]):
            np.testing.assert_array_equal(a, b)
    val = history.history["val_loss"]
    for index, (first, end) in zip((5, 6), ((0, 1), (2, 4))):
        epoch = first + int(np.argmin(val[first:end + 1]))
        for a, b in zip(saved_weights(tmp_path / "best", index),
                        record.by_epoch[epoch]):
            np.testing.assert_array_equal(a, b)
        meta = members_lib.read_member_metadata(
            members_lib.member_path(tmp_path / "best", index))
        assert meta["monitor"] == pytest.approx(min(val[first:end + 1]))
    assert not [f for f in os.listdir(tmp_path / "best")
                if f.startswith(".")]


def test_at_train_end_after_early_stopping_restores_weights(tmp_path):
    model, x, y = model_and_data()
    stop = keras.callbacks.EarlyStopping("loss", patience=0, min_delta=10.0,
                                         restore_best_weights=True)
    saver = MemberCheckpoint(tmp_path, indices=[3],
                             metadata=lambda i, e, logs: {"index": i})
    model.fit(x, y, epochs=5, verbose=0, callbacks=[stop, saver])
    assert members_lib.read_member_metadata(
        members_lib.member_path(tmp_path, 3))["index"] == 3
    for a, b in zip(saved_weights(tmp_path, 3), model.weights):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(member_dir=""), "member_dir=''"),
    (dict(member_dir="m", mode="best"), "mode='best'"),
    (dict(member_dir="m", monitor=3), "monitor=3"),
    (dict(member_dir="m", windows=[(3, 1)]), "windows="),
    (dict(member_dir="m", windows=[(0, 1)], indices=[0, 1]), "indices="),
])
def test_bad_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MemberCheckpoint(**kwargs)
