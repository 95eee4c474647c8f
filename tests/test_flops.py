"""Tests for keras_freetickets.flops."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from keras_freetickets import flops

layers = keras.layers


@pytest.fixture(autouse=True)
def clear_session():
    keras.backend.clear_session()
    yield
    keras.backend.clear_session()


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            layers.Dense(300, activation="relu"),
            layers.Dense(100, activation="relu"),
            layers.Dense(10),
        ]
    )


def fmnist_cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10),
        ]
    )


def kernel_paths(model):
    return [v.path for v in model.variables if v.path.endswith("kernel")]


def test_mlp_dense():
    model = mlp()
    expected = 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert flops.dense_forward_flops(model) == expected
    assert flops.forward_flops(model) == pytest.approx(expected)
    rows = flops.layer_flops(model)
    assert [r["class"] for r in rows] == ["Dense"] * 3
    assert [r["variable"] for r in rows] == kernel_paths(model)
    assert [r["dense_flops"] for r in rows] == [
        2 * 784 * 300,
        2 * 300 * 100,
        2 * 100 * 10,
    ]
    assert all(r["density"] == 1.0 for r in rows)


def test_fmnist_cnn():
    model = fmnist_cnn()
    conv1 = 2 * 3 * 3 * 1 * 32 * 28 * 28  # same padding keeps 28 x 28
    conv2 = 2 * 3 * 3 * 32 * 64 * 14 * 14  # after one 2x2 pool
    dense1 = 2 * (7 * 7 * 64) * 128  # after two pools, flattened
    dense2 = 2 * 128 * 10
    rows = flops.layer_flops(model)
    assert [r["dense_flops"] for r in rows] == [conv1, conv2, dense1, dense2]
    assert [r["class"] for r in rows] == ["Conv2D", "Conv2D", "Dense", "Dense"]
    assert flops.dense_forward_flops(model) == conv1 + conv2 + dense1 + dense2


@settings(deadline=None, max_examples=10, derandomize=True)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_densities_applied(values):
    keras.backend.clear_session()
    model = mlp()
    paths = kernel_paths(model)
    densities = dict(zip(paths, values))
    sizes = [784 * 300, 300 * 100, 100 * 10]
    expected = sum(2 * n * d for n, d in zip(sizes, values))
    assert flops.forward_flops(model, densities) == pytest.approx(expected)
    rows = flops.layer_flops(model, densities)
    assert [r["density"] for r in rows] == pytest.approx(values)


def test_density_keys_by_suffix_and_missing_is_dense():
    model = mlp()
    # Sequential paths carry the model name; a suffix of whole parts works.
    short = kernel_paths(model)[1].split("/", 1)[1]
    rows = flops.layer_flops(model, {short: 0.25})
    assert [r["density"] for r in rows] == [1.0, 0.25, 1.0]
    assert rows[1]["flops"] == pytest.approx(0.25 * 2 * 300 * 100)


def test_masks_dict():
    model = mlp()
    paths = kernel_paths(model)
    rng = np.random.default_rng(0)
    mask0 = (rng.random((784, 300)) < 0.3).astype("float32")
    mask2 = keras.Variable(np.ones((100, 10), "float32"))
    rows = flops.layer_flops(model, masks={paths[0]: mask0, paths[2]: mask2})
    assert rows[0]["density"] == pytest.approx(mask0.mean())
    assert rows[0]["flops"] == pytest.approx(2 * 784 * 300 * mask0.mean())
    assert rows[1]["density"] == 1.0
    assert rows[2]["density"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        flops.layer_flops(model, masks={paths[0]: np.ones((3, 3))})
    with pytest.raises(ValueError, match="either `densities` or `masks`"):
        flops.layer_flops(model, {paths[0]: 0.5}, masks={paths[0]: mask0})


def test_separable_depthwise_transpose_grouped():
    inputs = keras.Input((10, 10, 4))
    x = layers.SeparableConv2D(8, 3, depth_multiplier=2)(inputs)  # -> 8x8x8
    x = layers.DepthwiseConv2D(3, depth_multiplier=3, strides=2, padding="same")(
        x
    )  # -> 4x4x24
    x = layers.Conv2DTranspose(5, 3, strides=2)(x)  # 4x4 in -> 9x9x5
    x = layers.Conv2D(6, 3, groups=1)(x)  # -> 7x7x6
    x = layers.Conv2D(4, 3, groups=2)(x)  # -> 5x5x4, kernel (3, 3, 3, 4)
    model = keras.Model(inputs, x)
    rows = flops.layer_flops(model)
    expected = [
        2 * 3 * 3 * 4 * 2 * 8 * 8,  # depthwise part of the separable conv
        2 * 1 * 1 * 8 * 8 * 8 * 8,  # its pointwise part (8 -> 8 channels)
        2 * 3 * 3 * 8 * 3 * 4 * 4,  # depthwise: k * c_in * multiplier * out
        2 * 3 * 3 * 24 * 5 * 4 * 4,  # transpose: over the input positions
        2 * 3 * 3 * 5 * 6 * 7 * 7,
        2 * 3 * 3 * (6 // 2) * 4 * 5 * 5,  # grouped: c_in / groups
    ]
    assert [r["dense_flops"] for r in rows] == expected
    assert [r["class"] for r in rows] == [
        "SeparableConv2D",
        "SeparableConv2D",
        "DepthwiseConv2D",
        "Conv2DTranspose",
        "Conv2D",
        "Conv2D",
    ]
    sep = rows[0]["variable"].rsplit("/", 1)[0]
    densities = {sep + "/depthwise_kernel": 0.5, sep + "/pointwise_kernel": 0.25}
    rows = flops.layer_flops(model, densities)
    assert rows[0]["flops"] == pytest.approx(0.5 * expected[0])
    assert rows[1]["flops"] == pytest.approx(0.25 * expected[1])


def test_conv1d_conv3d_dense_on_sequences_einsum():
    inputs = keras.Input((10, 2))
    x = layers.Conv1D(4, 3)(inputs)  # -> 8 x 4
    x = layers.Dense(5)(x)  # applied at each of the 8 positions
    x = layers.EinsumDense("abc,cd->abd", output_shape=(None, 6))(x)
    y = layers.EinsumDense("...c,cde->...de", output_shape=(2, 3))(x)
    seq_model = keras.Model(inputs, y)
    rows = flops.layer_flops(seq_model)
    assert [r["dense_flops"] for r in rows] == [
        2 * 3 * 2 * 4 * 8,
        2 * 4 * 5 * 8,
        2 * 5 * 6 * 8,
        2 * 6 * 2 * 3 * 8,
    ]
    vol = keras.Sequential([keras.Input((5, 5, 5, 2)), layers.Conv3D(3, 3)])
    assert flops.dense_forward_flops(vol) == 2 * 27 * 2 * 3 * 3 * 3 * 3


def test_nested_sequential_in_functional():
    inner = keras.Sequential(
        [layers.Dense(20), layers.Dense(8)], name="inner"
    )
    inputs = keras.Input((12,))
    x = layers.Dense(16)(inputs)
    x = inner(x)
    outputs = layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    rows = flops.layer_flops(model)
    assert [r["dense_flops"] for r in rows] == [
        2 * 12 * 16,
        2 * 16 * 20,
        2 * 20 * 8,
        2 * 8 * 3,
    ]
    inner_path = inner.layers[0].kernel.path
    assert rows[1]["variable"] == inner_path
    rows = flops.layer_flops(model, {inner_path: 0.5})
    assert rows[1]["flops"] == pytest.approx(0.5 * 2 * 16 * 20)


def test_shared_layer_counts_each_call():
    shared = layers.Dense(4)
    a, b = keras.Input((6,)), keras.Input((6,))
    model = keras.Model([a, b], layers.Add()([shared(a), shared(b)]))
    rows = flops.layer_flops(model)
    assert len(rows) == 1
    assert rows[0]["dense_flops"] == 2 * (2 * 6 * 4)


def test_subclassed_model_needs_input_shape():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(3, 3)
            self.flat = layers.Flatten()
            self.out = layers.Dense(2)

        def call(self, x):
            return self.out(self.flat(self.conv(x)))

    model = Net()
    with pytest.raises(ValueError, match="input_shape"):
        flops.layer_flops(model)
    expected = 2 * 3 * 3 * 1 * 3 * 6 * 6 + 2 * (6 * 6 * 3) * 2
    assert flops.dense_forward_flops(model, input_shape=(8, 8, 1)) == expected
    # A second count (model now built) gives the same.
    assert flops.dense_forward_flops(model, input_shape=(8, 8, 1)) == expected


def test_density_errors():
    model = mlp()
    path = kernel_paths(model)[0]
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"Argument `densities\[.*\]` must be "
                           r"in \[0, 1\]\. Received: densities\[.*\]=" + str(bad)):
            flops.forward_flops(model, {path: bad})
    with pytest.raises(ValueError, match="no variable of the model"):
        flops.forward_flops(model, {"nope/kernel": 0.5})


def test_training_flops_formula():
    f_s, f_d = 30.0, 100.0
    steps, updates, batch = 50, 5, 4
    expected = batch * ((steps - updates) * 3 * f_s + updates * (2 * f_s + f_d))
    assert flops.training_flops(f_s, f_d, steps, updates, batch) == expected
    # A dense run costs 3 f_D per example and step.
    assert flops.training_flops(f_d, f_d, steps, 0, batch) == 3 * f_d * steps * batch


def test_relative_training_flops_tracks_density():
    model = mlp()
    paths = kernel_paths(model)
    f_d = flops.dense_forward_flops(model)
    f_s = flops.forward_flops(model, {p: 0.2 for p in paths})
    rel = flops.relative_training_flops("dst", f_d, f_s, steps=12900, update_steps=0)
    assert rel == pytest.approx(0.2)
    # About 100 mask updates add under 1 %.
    rel_updates = flops.relative_training_flops(
        "dst", f_d, f_s, steps=12900, update_steps=100
    )
    assert 0.2 < rel_updates < 0.2 * 1.01 + 0.01
    ens = flops.relative_training_flops(
        "dst_ensemble", f_d, f_s, steps=12900, update_steps=100, num_members=3
    )
    assert ens == pytest.approx(3 * rel_updates)
    assert flops.relative_training_flops(
        "dense_ensemble", f_d, steps=10, num_members=3
    ) == pytest.approx(3.0)
    assert flops.relative_training_flops("dense", f_d, steps=10) == 1.0


def test_edst_is_one_run():
    f_d, f_s = 100.0, 20.0
    # EDST: 30 epochs of steps in one run, global explorations count as
    # update steps; the dense reference is one 30-epoch run too.
    edst = flops.ensemble_training_flops(
        "edst", f_d, f_s, steps=300, update_steps=12, batch_size=2, num_members=3
    )
    assert edst == flops.training_flops(f_s, f_d, 300, 12, 2)
    dst_ens = flops.ensemble_training_flops(
        "dst_ensemble", f_d, f_s, steps=300, update_steps=12, batch_size=2,
        num_members=3,
    )
    assert dst_ens == pytest.approx(3 * edst)
    # A longer EDST run compared with a shorter dense reference.
    rel = flops.relative_training_flops(
        "edst", f_d, f_s, steps=450, update_steps=0, dense_steps=250
    )
    assert rel == pytest.approx(450 * 3 * f_s / (250 * 3 * f_d))


def test_training_flops_errors():
    with pytest.raises(ValueError, match="Argument `method` must be one of"):
        flops.ensemble_training_flops("lottery", 1.0, 1.0, 10, 0, 1, 1)
    with pytest.raises(ValueError, match="num_update_steps"):
        flops.training_flops(1.0, 2.0, 10, 11, 1)
    with pytest.raises(ValueError, match="f_sparse"):
        flops.training_flops(3.0, 2.0, 10, 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        flops.training_flops(1.0, 2.0, 10, 0, 0)
    with pytest.raises(ValueError, match="f_sparse"):
        flops.ensemble_training_flops("dst", 1.0, None, 10, 0, 1, 1)
    with pytest.raises(ValueError, match="num_members"):
        flops.ensemble_training_flops("dense_ensemble", 1.0, None, 10, 0, 1, 0)


def test_inference_flops():
    model = mlp()
    paths = kernel_paths(model)
    f_d = flops.dense_forward_flops(model)
    members = [{p: 0.2 for p in paths}, {p: 0.5 for p in paths}, None]
    total = flops.inference_flops(model, members)
    assert total == pytest.approx(0.2 * f_d + 0.5 * f_d + f_d)
    other = mlp()
    assert flops.inference_flops([model, other]) == pytest.approx(2 * f_d)
    assert flops.inference_flops(model) == pytest.approx(f_d)
    with pytest.raises(ValueError, match="one entry per member"):
        flops.inference_flops([model, other], [None])
