"""The fused SGD update of masked kernels: the same weights as Keras's SGD.

`SparseOptimizer(fused_sgd=True)`, the default, applies `keras.optimizers.SGD`
to the kernels it masks with one TensorFlow op instead of Keras's five
(`_inner.fused_sgd_update`). These
tests train the same sparse model both ways, across mask updates, and compare
every weight and optimizer variable bit for bit; they check that the fused
op ran (so the comparison is not Keras against itself) and where it must not.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import _inner
from keras_freetickets import _keras_compat as compat


def fit_sparse(fuse, inner_fn, jit_compile=False, steps=14, seed=3):
    """A small L2-regularized sparse MLP after `steps` SGD steps of a
    14-step schedule that rewires the masks at steps 5 and 10."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(48, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(5e-4)),
        keras.layers.Dense(24, activation="relu"),
        keras.layers.Dense(4),
    ])
    opt = kft.SparseOptimizer(inner_fn(), sparsity=0.7, update_interval=5,
                              drop_fraction=0.3, total_steps=14, seed=1,
                              fused_sgd=fuse)
    model.compile(
        optimizer=opt, jit_compile=jit_compile,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16 * steps, 12)).astype("float32")
    y = (x[:, :4].argmax(1)).astype("int64")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


class FusedCalls:
    """Counts the calls of `fused_sgd_update` that did the update."""

    def __init__(self, monkeypatch):
        self.fused = 0
        original = _inner.fused_sgd_update

        def spy(*args, **kwargs):
            done = original(*args, **kwargs)
            self.fused += int(done)
            return done

        monkeypatch.setattr(_inner, "fused_sgd_update", spy)


def assert_same_state(a, b):
    names = [v.path for v in a.weights + a.optimizer.variables]
    values_a = [np.asarray(v) for v in a.weights + a.optimizer.variables]
    values_b = [np.asarray(v) for v in b.weights + b.optimizer.variables]
    assert len(values_a) == len(values_b)
    for name, x, y in zip(names, values_a, values_b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


INNERS = {
    "momentum": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.9),
        momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.8,
                                             nesterov=True),
    # Weight decay and clipping run in Keras's `apply`, before the update.
    "plain": lambda: keras.optimizers.SGD(0.1, weight_decay=1e-3,
                                          clipnorm=1.0),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_fused_update_equals_keras_sgd_bit_for_bit(inner, monkeypatch):
    keras_sgd = fit_sparse(False, INNERS[inner])
    calls = FusedCalls(monkeypatch)
    fused = fit_sparse(True, INNERS[inner])
    # The fused path ran (once per masked kernel each time the step was
    # traced), and the masks moved (so the comparison crosses mask updates).
    assert calls.fused > 0
    assert int(fused.optimizer.iterations) == 14
    assert_same_state(keras_sgd, fused)
    first = fit_sparse(True, INNERS[inner], steps=4)  # before any update
    changed = [not np.array_equal(m, n) for m, n in zip(
        first.optimizer.get_masks().values(),
        fused.optimizer.get_masks().values())]
    assert any(changed)


def test_xla_keeps_keras_update(monkeypatch):
    calls = FusedCalls(monkeypatch)
    fit_sparse(True, INNERS["momentum"], jit_compile=True, steps=6)
    assert calls.fused == 0


def test_fused_path_declines_what_it_cannot_do():
    variable = tf.Variable(tf.ones((3, 2)))
    gradient = tf.fill((3, 2), 0.5)

    class MySGD(keras.optimizers.SGD):
        pass

    sgd, subclass = keras.optimizers.SGD(0.1, momentum=0.9), MySGD(0.1)
    for optimizer in (sgd, subclass):
        optimizer.build([variable])
    assert not _inner.fused_sgd_update(subclass, gradient, variable, 0.1)
    assert not _inner.fused_sgd_update(keras.optimizers.Adam(), gradient,
                                       variable, 0.1)
    sliced = tf.IndexedSlices(gradient[:1], tf.constant([0]),
                              tf.constant([3, 2]))
    assert not _inner.fused_sgd_update(sgd, sliced, variable, 0.1)
    assert not _inner.fused_sgd_update(
        sgd, tf.cast(gradient, tf.float64), variable, 0.1)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert not _inner.fused_sgd_update(sgd, gradient, variable, 0.1)
    np.testing.assert_array_equal(variable.numpy(), np.ones((3, 2)))
    # And what it does do: momentum 0.9, lr 0.1, from a zero slot.
    assert _inner.fused_sgd_update(sgd, gradient, variable, 0.1)
    np.testing.assert_allclose(variable.numpy(), np.full((3, 2), 0.95))
    np.testing.assert_allclose(
        np.asarray(compat.sgd_momentum(sgd, variable)),
        np.full((3, 2), -0.05))


def test_fused_update_under_mixed_precision(monkeypatch):
    # Keras wraps the optimizer in a LossScaleOptimizer, whose `apply` runs
    # the update inside a `cond` on finite gradients; the float32 kernels
    # still take the fused op, with the same result.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras_sgd = fit_sparse(False, INNERS["momentum"])
        calls = FusedCalls(monkeypatch)
        fused = fit_sparse(True, INNERS["momentum"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert type(fused.optimizer).__name__ == "LossScaleOptimizer"
    assert calls.fused > 0
    assert_same_state(keras_sgd, fused)


def test_fused_sgd_argument_is_checked_and_kept_in_the_config():
    with pytest.raises(ValueError, match="fused_sgd.*Received.*'yes'"):
        kft.SparseOptimizer(keras.optimizers.SGD(0.1), fused_sgd="yes")
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.1), fused_sgd=False)
    assert opt.get_config()["fused_sgd"] is False
    restored = kft.SparseOptimizer.from_config(opt.get_config())
    assert restored.fused_sgd is False
    assert kft.SparseOptimizer(keras.optimizers.SGD(0.1)).fused_sgd is True
