"""Tests of the growth-rule registry and a custom rule end to end."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import updaters


@updaters.register_updater("test_squared_gradient")
class SquaredGradient(updaters.Updater):
    """A custom rule in a few lines: grow where the gradient squared is
    largest (the same ranking as RigL, through another score)."""

    def grow_score(self, weights, gradient, context):
        return tf.square(tf.cast(gradient, tf.float32))


def test_aliases_and_names_resolve():
    assert isinstance(updaters.get("gradient"), updaters.RigL)
    assert isinstance(updaters.get("random"), updaters.SET)
    assert isinstance(updaters.get("rigl"), updaters.RigL)
    assert isinstance(updaters.get("test_squared_gradient"), SquaredGradient)
    rule = updaters.SET()
    assert updaters.get(rule) is rule
    assert "test_squared_gradient" in updaters.available()


@pytest.mark.parametrize("bad", ["magnitude", 3, None])
def test_unknown_rules_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="Argument `grow`"):
        updaters.get(bad)
    with pytest.raises(ValueError, match=f"grow={bad!r}"):
        kft.SparseOptimizer(keras.optimizers.SGD(0.1), grow=bad)


def test_register_refuses_what_is_not_an_updater():
    with pytest.raises(ValueError, match="Updater subclasses"):
        updaters.register_updater("x")(object)
    with pytest.raises(ValueError, match="name=''"):
        updaters.register_updater("")


def _train(grow, tmp_path=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(3)])
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.8,
                              grow=grow, update_interval=2, seed=1)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype("float32")
    y = x[:, :3].argmax(1)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model, opt


def test_custom_rule_trains_and_round_trips_through_keras_file(tmp_path):
    model, opt = _train("test_squared_gradient")
    assert opt.check_invariants() == []
    assert int(opt.mask_updates.numpy()) == 3  # steps 2, 4, 6 of 0..7
    # Same ranking as RigL's |g|, so the same masks.
    _, rigl = _train("gradient")
    for a, b in zip(opt.get_masks().values(), rigl.get_masks().values()):
        np.testing.assert_array_equal(a, b)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer.updater, SquaredGradient)
    assert loaded.optimizer.get_config()["grow"] == "test_squared_gradient"
    for a, b in zip(opt.get_masks().values(),
                    loaded.optimizer.get_masks().values()):
        np.testing.assert_array_equal(a, b)


def test_an_updater_instance_is_serialized_as_an_object():
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), grow=updaters.SET())
    config = opt.get_config()
    assert config["grow"] == "set"
    clone = kft.SparseOptimizer.from_config(config)
    assert isinstance(clone.updater, updaters.SET)
