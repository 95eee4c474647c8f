"""The compiled sparse convolution (`native.sparse_conv2d`) and the ensemble
inference that uses it (`FreeTicketsEnsemble(conv_kernels=...)`): the op
equals TensorFlow's convolution, bias, ReLU and 2x2 max pooling within float
rounding on any shape and sparsity, each sample's result does not depend on
the rest of the batch, bad inputs get errors that name them, and ensembles
predict the same probabilities with and without it, falling back to
TensorFlow's convolution wherever the op does not apply. Skipped where there
is no C++ compiler."""

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

from keras_freetickets import FreeTicketsEnsemble, native

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="no C++ compiler (g++) here")
SETTINGS = dict(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
RTOL = 1e-5  # relative to the largest magnitude of the reference


@pytest.fixture(scope="module", autouse=True)
def built():
    native.build(native.CONV_SOURCE)
    native.set_enabled(None)
    assert native.conv_available()


def reference(inputs, kernel, bias, padding, relu, pool):
    y = (tf.nn.conv2d(inputs, kernel, 1, padding) + bias).numpy()
    if relu:
        y = np.maximum(y, 0.0)
    if pool == 2:  # in numpy: oneDNN's pooling refuses some tiny shapes
        n, h, w, o = y.shape
        y = y[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, o)
        y = y.max(axis=(2, 4), initial=-np.inf)
    return y


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


@st.composite
def conv_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    n, h, w = draw(st.integers(1, 40)), draw(st.integers(1, 11)), draw(st.integers(1, 11))
    c, o = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    padding = draw(st.sampled_from(["SAME", "VALID"]))
    # VALID windows fit the input (TensorFlow refuses larger ones).
    kh = draw(st.integers(1, 4 if padding == "SAME" else min(4, h)))
    kw = draw(st.integers(1, 4 if padding == "SAME" else min(4, w)))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    kernel = rng.standard_normal((kh, kw, c, o)).astype(np.float32)
    kernel[rng.random(kernel.shape) >= density] = 0.0
    return dict(
        inputs=rng.standard_normal((n, h, w, c)).astype(np.float32),
        kernel=kernel,
        bias=rng.standard_normal(o).astype(np.float32),
        padding=padding,
        relu=draw(st.booleans()),
        pool=draw(st.sampled_from([1, 2])),
    )


@settings(**SETTINGS)
@given(case=conv_cases())
def test_equals_tensorflow_convolution(case):
    got = native.sparse_conv2d(**case).numpy()
    assert_close(got, reference(**case))


def test_the_protocol_layers_at_their_densities():
    # FMNIST-CNN v1's convolutions at S = 0.8 ERK (1.0 and 0.136), batch
    # sizes that fill, split and underfill the op's 16-sample blocks.
    rng = np.random.default_rng(0)
    for (h, c, o, density) in ((28, 1, 32, 1.0), (14, 32, 64, 0.136)):
        kernel = rng.standard_normal((3, 3, c, o)).astype(np.float32)
        kernel[rng.random(kernel.shape) >= density] = 0.0
        bias = rng.standard_normal(o).astype(np.float32)
        for n in (1, 16, 37):
            x = rng.random((n, h, h, c)).astype(np.float32)
            case = dict(inputs=x, kernel=kernel, bias=bias, padding="SAME", relu=True, pool=2)
            assert_close(native.sparse_conv2d(**case).numpy(), reference(**case))


def test_each_sample_does_not_depend_on_the_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((35, 9, 9, 16)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 16, 32)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.7] = 0.0
    bias = rng.standard_normal(32).astype(np.float32)
    whole = native.sparse_conv2d(x, kernel, bias, relu=True, pool=2).numpy()
    for i in (0, 15, 16, 34):
        alone = native.sparse_conv2d(x[i:i + 1], kernel, bias, relu=True, pool=2)
        np.testing.assert_array_equal(alone.numpy()[0], whole[i])


def test_bad_inputs_are_named():
    x = tf.zeros([2, 5, 5, 3])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input's 3 channels.*kernel \[3,3,4,8\]"):
        native.sparse_conv2d(x, tf.zeros([3, 3, 4, 8]), tf.zeros([8]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bias"):
        native.sparse_conv2d(x, tf.zeros([3, 3, 3, 8]), tf.zeros([7]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="pool=3"):
        native.sparse_conv2d(x, tf.zeros([3, 3, 3, 8]), tf.zeros([8]), pool=3)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=r"takes input \[N, H, W, C\]|rank 4"):
        native.sparse_conv2d(tf.zeros([5, 5, 3]), tf.zeros([3, 3, 3, 8]), tf.zeros([8]))


def test_machine_flags_target_this_cpu():
    flags = native.machine_flags()
    assert flags[0] == "-march=native"
    assert set(flags) <= {"-march=native", "-mno-avx512fp16"}


# ---------------------------------------------------------------- ensembles
def cnn_member(seed, strides=1, activation="relu"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation=activation,
                            strides=strides),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="valid", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            kernel[rng.random(kernel.shape) < 0.8] = 0.0
            layer.kernel.assign(kernel)
            layer.bias.assign(rng.normal(scale=0.1, size=layer.bias.shape))
    return model


def inputs(n=40):
    return np.random.default_rng(7).random((n, 12, 12, 1)).astype(np.float32)


def test_ensemble_predicts_the_same_through_the_op():
    members = [cnn_member(s) for s in range(3)]
    compiled = FreeTicketsEnsemble(members)
    dense = FreeTicketsEnsemble(members, conv_kernels="dense")
    assert compiled.compiled_conv_layers() == [
        [m.layers[0].name, m.layers[1].name, m.layers[2].name] for m in members]
    assert dense.compiled_conv_layers() == [[], [], []]
    x = inputs()
    expected = dense.predict(x, verbose=0)
    np.testing.assert_allclose(compiled.predict(x, verbose=0), expected, atol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(compiled(x)), expected, atol=1e-6)
    np.testing.assert_allclose(compiled.member_predictions(x),
                               dense.member_predictions(x), atol=1e-6)
    # The reference itself: each member's own call, TensorFlow's convolution.
    own = np.mean([keras.ops.convert_to_numpy(keras.ops.softmax(m(x)))
                   for m in members], axis=0)
    np.testing.assert_allclose(expected, own, atol=1e-6)


def test_layers_the_op_does_not_cover_run_as_keras_runs_them():
    # Strides 2 (first layer) and a tanh activation are not the op's; the
    # valid-padding ReLU convolution after them is.
    members = [cnn_member(0, strides=2), cnn_member(1, activation="tanh")]
    ensemble = FreeTicketsEnsemble(members)
    names = ensemble.compiled_conv_layers()
    assert names == [[members[0].layers[2].name], [members[1].layers[2].name]]
    x = inputs()
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0),
        FreeTicketsEnsemble(members, conv_kernels="dense").predict(x, verbose=0),
        atol=1e-6)
    # A functional member is not a plain chain: it keeps its own call.
    inp = keras.Input((12, 12, 1))
    functional = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Flatten()(
        keras.layers.Conv2D(4, 3, activation="relu")(inp))))
    assert FreeTicketsEnsemble([functional]).compiled_conv_layers() == [[]]


def test_training_and_xla_use_tensorflow_convolution():
    members = [cnn_member(s) for s in range(2)]
    ensemble = FreeTicketsEnsemble(members)
    x = tf.constant(inputs(8))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(ensemble(x, training=True))
    grads = tape.gradient(loss, ensemble.trainable_variables)
    assert all(g is not None for g in grads)
    ensemble.compile(jit_compile=True)
    np.testing.assert_allclose(
        ensemble.predict(inputs(), verbose=0),
        FreeTicketsEnsemble(members, conv_kernels="dense").predict(inputs(), verbose=0),
        atol=1e-6)


def test_conv_kernels_argument_config_and_save(tmp_path):
    members = [cnn_member(s) for s in range(2)]
    with pytest.raises(ValueError, match="conv_kernels.*Received: conv_kernels='sparse'"):
        FreeTicketsEnsemble(members, conv_kernels="sparse")
    ensemble = FreeTicketsEnsemble(members, conv_kernels="dense")
    assert ensemble.get_config()["conv_kernels"] == "dense"
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.conv_kernels == "dense"
    assert loaded.compiled_conv_layers() == [[], []]
    np.testing.assert_allclose(loaded.predict(inputs(), verbose=0),
                               ensemble.predict(inputs(), verbose=0), atol=1e-6)


def test_compiled_is_refused_where_the_op_is_off():
    members = [cnn_member(0)]
    native.set_enabled(False)
    try:
        auto = FreeTicketsEnsemble(members)
        assert auto.compiled_conv_layers() == [[]]
        auto.predict(inputs(), verbose=0)  # falls back
        required = FreeTicketsEnsemble(members, conv_kernels="compiled")
        with pytest.raises(RuntimeError, match="conv_kernels='compiled'.*native build"):
            required.predict(inputs(), verbose=0)
    finally:
        native.set_enabled(None)
    assert FreeTicketsEnsemble(members, conv_kernels="compiled").compiled_conv_layers() \
        == [[members[0].layers[0].name, members[0].layers[1].name, members[0].layers[2].name]]


@pytest.mark.slow  # ~15-20 s: the build command in a child process
def test_a_failed_convolution_build_does_not_fail_the_command(tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("KFT_NATIVE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "ft_sparse_conv.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "CONV_SOURCE", broken)
    assert native.main(["build"]) == 0
    captured = capsys.readouterr()
    assert "built" in captured.out and "ft_select" in captured.out
    assert "ft_sparse_conv.cc" in captured.err
    assert not any(p.name.startswith("ft_sparse_conv") for p in (tmp_path / "cache").iterdir())


def test_mixed_precision_members_keep_their_own_call():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        member = cnn_member(0)
    finally:
        keras.config.set_dtype_policy("float32")
    ensemble = FreeTicketsEnsemble([member])
    assert ensemble.compiled_conv_layers() == [[]]
    expected = keras.ops.convert_to_numpy(
        keras.ops.softmax(keras.ops.cast(member(inputs()), "float32")))
    np.testing.assert_allclose(ensemble.predict(inputs(), verbose=0), expected,
                               atol=1e-3)
