"""The compiled selection op (`keras_freetickets.native`): the same flags,
bit for bit, as the TensorFlow ops it replaces, the same masks and weights
through whole fits, and a build or load that fails leaves the library on
TensorFlow's ops with nothing half-written behind. The tests that need the op
build it (once per machine, into the cache `scripts/setup.sh` fills) and are
skipped where there is no C++ compiler."""

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

import keras_freetickets as kft
from keras_freetickets import masking, native, selection

SETTINGS = dict(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="no C++ compiler (g++) here")


@pytest.fixture(scope="module")
def built():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) here")
    native.build()
    native.set_enabled(None)
    assert native.available()


def with_op(enabled, fn):
    native.set_enabled(enabled)
    try:
        return fn()
    finally:
        native.set_enabled(None)


# Floats that stress the keys: signed zeros, subnormals (zero to TensorFlow's
# kernels), infinities, NaN and many ties.
SPECIAL = np.array([0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, np.nan,
                    1.0, -1.0, 0.5, 3.4e38], np.float32)


@st.composite
def keyed_cases(draw):
    n = draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.choice(np.concatenate(
        [SPECIAL, rng.normal(size=6).astype(np.float32)]), n)
    eligible = rng.random(n) < draw(st.floats(0.0, 1.0))
    k = draw(st.integers(-1, n + 2))
    return values.astype(np.float32), eligible, k


@given(keyed_cases(), st.sampled_from(["magnitude", "descending"]))
@settings(**SETTINGS)
def test_keyed_op_equals_the_key_ops_and_the_selection(built, case, kind):
    values, eligible, k = case
    args = (tf.constant(values), tf.constant(eligible), tf.constant(k, tf.int32))
    keys = (masking._magnitude_keys if kind == "magnitude"
            else masking._descending_keys)
    expected = with_op(False, lambda: selection.select_smallest(
        tf.where(args[1], keys(args[0]), masking._INT32_MIN), args[2],
        after_minimum=True))
    got = native.select_by_keys(*args, kind)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95), st.floats(0.0, 0.6))
@settings(max_examples=15, deadline=None)
def test_rewire_masks_is_the_same_with_and_without_the_op(built, seed,
                                                          density, fraction):
    """The update's masks on a kernel past RADIX_MIN_SIZE, with ties: the
    drop and the grow through the keyed op, against the TensorFlow ops."""
    rng = np.random.default_rng(seed)
    n = selection.RADIX_MIN_SIZE + int(rng.integers(0, 500))
    weights = tf.constant(np.round(rng.normal(size=n), 2).astype(np.float32))
    mask = tf.constant(rng.random(n) < density)
    score = tf.constant(np.round(np.abs(rng.normal(size=n)), 2)
                        .astype(np.float32))
    k = int(fraction * int(tf.reduce_sum(tf.cast(mask, tf.int32))))
    rewire = tf.function(lambda: masking.rewire_masks(
        weights, mask, score, k, n, nonnegative_score=True))
    fast = with_op(True, rewire)
    slow = with_op(False, tf.function(rewire.python_function))
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(tf.reduce_sum(tf.cast(fast[0], tf.int32))) == int(
        tf.reduce_sum(tf.cast(mask, tf.int32)))


def op_types(fn, *args):
    graph_def = fn.get_concrete_function(*args).graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


def test_the_op_is_traced_only_where_it_is_on_and_outside_xla(built):
    n = selection.RADIX_MIN_SIZE
    w = tf.constant(np.linspace(-1, 1, n, dtype=np.float32))
    m = tf.constant(np.arange(n) % 3 == 0)

    def update(w, m):
        return masking.rewire_masks(w, m, tf.abs(w), 100, n,
                                    nonnegative_score=True)

    assert "FtSelectByKeys" in op_types(tf.function(update), w, m)
    assert "FtSelectByKeys" not in with_op(
        False, lambda: op_types(tf.function(update), w, m))
    assert "FtSelectByKeys" not in op_types(
        tf.function(update, jit_compile=True), w, m)


def fit(seed=0):
    """A sparse MLP whose first kernel (784 x 16) takes the radix path,
    across four RigL updates."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((784,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(10)])
    model.compile(
        optimizer=kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
            update_interval=4, drop_fraction=0.5, total_steps=20, seed=1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(320, 784)).astype(np.float32)
    y = rng.integers(0, 10, 320)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


def test_a_fit_ends_with_the_same_weights_and_masks_bit_for_bit(built,
                                                               monkeypatch):
    traced = []
    original = native.select_by_keys

    def spy(*args):
        flags = original(*args)
        traced.append(flags is not None)
        return flags

    monkeypatch.setattr(native, "select_by_keys", spy)
    fast = with_op(True, fit)
    assert traced and all(traced), "the compiled op was not traced"
    traced.clear()
    slow = with_op(False, fit)
    assert traced and not any(traced)
    assert int(fast.optimizer.mask_updates.numpy()) >= 3
    for a, b in zip(fast.weights + fast.optimizer.variables,
                    slow.weights + slow.optimizer.variables):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), a.path


def test_bad_inputs_are_refused_with_the_argument_named(built):
    with pytest.raises(tf.errors.InvalidArgumentError, match="eligible"):
        native.select_by_keys(tf.zeros([4]), tf.zeros([3], tf.bool), 1,
                              "magnitude")
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be"):
        native.select_by_keys(tf.zeros([4]), tf.zeros([4], tf.bool), [1],
                              "magnitude")
    with pytest.raises(ValueError, match="enabled.*Received: enabled='yes'"):
        native.set_enabled("yes")


def test_auto_leaves_the_op_out_where_a_gpu_is_visible(built, monkeypatch):
    """The op has a CPU kernel only: with a GPU in sight `auto` keeps
    TensorFlow's ops, and `on` or `set_enabled(True)` still choose it."""
    real = tf.config.list_logical_devices
    monkeypatch.setattr(
        tf.config, "list_logical_devices",
        lambda kind=None: ["/GPU:0"] if kind == "GPU" else real(kind))
    monkeypatch.setenv("KFT_NATIVE", "auto")
    assert not native.available()
    monkeypatch.setenv("KFT_NATIVE", "on")
    assert native.available()
    monkeypatch.setenv("KFT_NATIVE", "auto")
    assert with_op(True, native.available)


def test_kft_native_off_and_a_bad_value(monkeypatch):
    monkeypatch.setenv("KFT_NATIVE", "off")
    assert not native.available()
    assert native.select_by_keys(tf.zeros([4]), tf.zeros([4], tf.bool), 1,
                                 "magnitude") is None
    monkeypatch.setenv("KFT_NATIVE", "maybe")
    with pytest.raises(ValueError, match="KFT_NATIVE.*Received: KFT_NATIVE='maybe'"):
        native.available()


@needs_compiler
def test_a_failed_build_names_the_cause_and_leaves_nothing(tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("KFT_NATIVE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(native.BuildError, match="broken.cc"):
        native.build(source=broken)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(native.BuildError, match="no-such-compiler-here"):
        native.build()
    assert list((tmp_path / "cache").iterdir()) == []
    assert native.main(["build"]) == 1


def test_a_library_that_does_not_load_falls_back_with_a_message(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KFT_NATIVE_DIR", str(tmp_path))
    native.library_path().write_bytes(b"not a shared library")
    assert not native.available()
    assert "did not load" in capsys.readouterr().err
    # The selection still works, through TensorFlow's ops.
    flags = selection.select_smallest(tf.constant([3, 1, 2]), 2)
    np.testing.assert_array_equal(flags.numpy(), [False, True, True])


def test_the_command_line(built, capsys):
    assert native.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "present" in out and "in use: True" in out
    assert native.main(["build"]) == 0  # already built: returns at once
    assert native.main(["frobnicate"]) == 2
    assert "usage" in capsys.readouterr().err
