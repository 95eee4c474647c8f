"""The compiled masked SGD update (`native.masked_sgd_update`): select and
update in one op, with the bits of TensorFlow's `Select` followed by
`ResourceApplyKerasMomentum` or `ResourceApplyGradientDescent`, and the same
fits as without it. Skipped where there is no C++ compiler."""

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

import keras_freetickets as kft
from keras_freetickets import native

SETTINGS = dict(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
RULES = ["descent", "momentum", "nesterov"]


@pytest.fixture(scope="module")
def built():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) here")
    native.build()
    native.set_enabled(None)
    assert native.available()


def reference_update(rule, var, accum, lr, grad, mask, momentum):
    """What the library did before the op: a Select, then TensorFlow's."""
    selected = tf.raw_ops.Select(condition=mask, x=grad,
                                 y=tf.zeros(grad.shape, grad.dtype))
    if rule == "descent":
        tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr,
                                                delta=selected)
    else:
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle, accum=accum.handle, lr=lr, grad=selected,
            momentum=tf.constant(momentum, var.dtype),
            use_nesterov=rule == "nesterov")


@st.composite
def cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    mask = rng.random(shape) < draw(st.floats(0.0, 1.0))
    grad = rng.normal(size=shape).astype(dtype)
    # NaN and infinities in the gradient, masked out and not.
    grad.flat[rng.integers(0, grad.size, 3)] = [np.nan, np.inf, -np.inf]
    # Weights and slots nonzero off the mask too: the op must not assume
    # they are zero there.
    var = rng.normal(size=shape).astype(dtype)
    accum = rng.normal(size=shape).astype(dtype)
    lr = draw(st.sampled_from([0.0, 1e-3, 0.1, 0.37]))
    momentum = draw(st.sampled_from([0.5, 0.9, 0.99]))
    return var, accum, grad, mask, lr, momentum


def run_both(rule, var, accum, grad, mask, lr, momentum):
    ours = [tf.Variable(var), tf.Variable(accum)]
    theirs = [tf.Variable(var), tf.Variable(accum)]
    lr_t = tf.constant(lr, var.dtype)
    assert native.masked_sgd_update(
        ours[0], None if rule == "descent" else ours[1], lr_t,
        tf.constant(grad), tf.constant(mask), momentum, rule == "nesterov")
    reference_update(rule, theirs[0], theirs[1], lr_t, tf.constant(grad),
                     tf.constant(mask), momentum)
    return ours, theirs


def assert_same_bits(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.numpy().tobytes() == b.numpy().tobytes()


@given(cases(), st.sampled_from(RULES))
@settings(**SETTINGS)
def test_the_op_has_the_bits_of_select_and_tensorflows_update(built, case,
                                                              rule):
    ours, theirs = run_both(rule, *case)
    assert_same_bits(ours, theirs)
    var, accum, grad, mask, lr, _ = case
    if rule == "descent":  # the slot is not touched
        assert ours[1].numpy().tobytes() == accum.tobytes()
    if lr > 0 and rule == "descent":  # the update did something
        moved = ours[0].numpy() != var
        assert not moved[~mask].any()


@pytest.mark.parametrize("rule", RULES)
def test_a_kernel_split_across_threads(built, rule):
    # 784 x 300, the FMNIST-MLP v1 first kernel: large enough for Shard to
    # split it across the intra-op threads.
    rng = np.random.default_rng(7)
    shape = (784, 300)
    ours, theirs = run_both(
        rule, rng.normal(size=shape).astype(np.float32),
        np.where(rng.random(shape) < 0.2, rng.normal(size=shape), 0)
        .astype(np.float32),
        rng.normal(size=shape).astype(np.float32), rng.random(shape) < 0.2,
        0.05, 0.9)
    assert_same_bits(ours, theirs)


def test_a_read_before_the_update_keeps_the_old_value(built):
    # Inside one function the read is ordered before the update; the op
    # must copy the buffer the read still holds, not write into it.
    var = tf.Variable(tf.ones((64, 32)))
    accum = tf.Variable(tf.zeros((64, 32)))
    mask = tf.constant(np.arange(64 * 32).reshape(64, 32) % 2 == 0)

    @tf.function
    def step():
        before = var.read_value()
        native.masked_sgd_update(var, accum, 0.5, tf.ones((64, 32)), mask,
                                 0.9)
        return before, var.read_value()

    before, after = step()
    np.testing.assert_array_equal(before.numpy(), np.ones((64, 32)))
    np.testing.assert_array_equal(after.numpy(),
                                  np.where(mask.numpy(), 0.5, 1.0))


def test_bad_inputs_are_refused_with_the_argument_named(built):
    var, accum = tf.Variable(tf.zeros((4, 3))), tf.Variable(tf.zeros((4, 3)))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="mask|Shapes"):
        native.masked_sgd_update(var, accum, 0.1, tf.zeros((4, 3)),
                                 tf.zeros((3, 4), tf.bool), 0.9)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="grad must have the shape of var"):
        native.masked_sgd_update(var, accum, 0.1, tf.zeros((2, 6)),
                                 tf.zeros((2, 6), tf.bool), 0.9)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="accum must have the shape of var"):
        native.masked_sgd_update(var, tf.Variable(tf.zeros((12,))), 0.1,
                                 tf.zeros((4, 3)), tf.zeros((4, 3), tf.bool),
                                 0.9)


def test_off_it_does_nothing_and_says_so(built):
    var = tf.Variable(tf.ones((2, 2)))
    native.set_enabled(False)
    try:
        assert native.masked_sgd_update(var, None, 0.1, tf.ones((2, 2)),
                                        tf.ones((2, 2), tf.bool)) is False
    finally:
        native.set_enabled(None)
    np.testing.assert_array_equal(var.numpy(), np.ones((2, 2)))


def fit(nesterov):
    """A sparse MLP across three RigL updates, SGD with momentum."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((40,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10)])
    model.compile(
        optimizer=kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9, nesterov=nesterov),
            sparsity=0.8, update_interval=4, drop_fraction=0.5,
            total_steps=20, seed=1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 40)).astype(np.float32)
    model.fit(x, rng.integers(0, 10, 320), batch_size=16, epochs=1,
              shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_fit_with_the_op_equals_one_without_it(built, monkeypatch,
                                                nesterov):
    used = []
    original = native.masked_sgd_update

    def spy(*args, **kwargs):
        used.append(original(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(native, "masked_sgd_update", spy)
    fast = fit(nesterov)
    assert used and all(used), "the op did not run"
    native.set_enabled(False)
    try:
        used.clear()
        slow = fit(nesterov)
    finally:
        native.set_enabled(None)
    assert used and not any(used)
    assert int(fast.optimizer.mask_updates.numpy()) >= 3
    for a, b in zip(fast.weights + fast.optimizer.variables,
                    slow.weights + slow.optimizer.variables):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), a.path
