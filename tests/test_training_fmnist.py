"""RigL on real Fashion-MNIST: a 90%-sparse MLP trained beside the dense one.

An MLP 784-300-100-10 at sparsity 0.9 (ERK) with RigL mask updates every 50
steps trains for 500 steps next to the same MLP, dense, from the same
initial weights and data order. It must end exactly sparse, with masks that
moved during training, and within 5 points of the dense model's test
accuracy.
"""

import gzip
import os
import pathlib

import keras
import numpy as np
import pytest

import keras_freetickets as kft

SPARSITY = 0.9
STEPS, BATCH, EPOCHS = 500, 128, 2
UPDATE_INTERVAL, DROP_FRACTION = 50, 0.5
SIZES = (784, 300, 100, 10)
DATA_DIR = pathlib.Path(os.environ.get(
    "KFT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
))


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(split, folder=DATA_DIR):
    """(x, y) for "train" (first 55,000) or "test", flat float32 in [0, 1].

    Uses `keras_freetickets.contrib.datasets` when it is there, else reads the IDX
    files itself (images after a 16-byte header, labels after 8 bytes).
    """
    try:
        from keras_freetickets.contrib.datasets import load_fashion_mnist
    except ImportError:  # the datasets module is optional for this test
        load_fashion_mnist = None
    if load_fashion_mnist is not None:
        return load_fashion_mnist(split, flatten=True)
    part = "train" if split == "train" else "t10k"
    folder = pathlib.Path(folder)
    x = read_idx(folder / f"{part}-images-idx3-ubyte.gz", 16)
    y = read_idx(folder / f"{part}-labels-idx1-ubyte.gz", 8)
    x = x.reshape(-1, 784).astype("float32") / 255.0
    y = y.astype("int64")
    if split == "train":
        x, y = x[:55_000], y[:55_000]
    return x, y


def mlp():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((SIZES[0],))]
    for width in SIZES[1:-1]:
        layers.append(keras.layers.Dense(width, activation="relu"))
    layers.append(keras.layers.Dense(SIZES[-1]))
    return keras.Sequential(layers)


def train(x, y, x_test, y_test, sparse):
    model = mlp()
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    callbacks = []
    opt = inner
    if sparse:
        opt = kft.SparseOptimizer(
            inner, sparsity=SPARSITY, grow="gradient",
            drop_fraction=DROP_FRACTION, update_interval=UPDATE_INTERVAL,
            total_steps=STEPS, seed=0,
        )
        callbacks.append(kft.SparsityMonitor())
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0, callbacks=callbacks)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    return dict(model=model, opt=opt, logs=history.history,
                accuracy=float(accuracy))


@pytest.fixture(scope="module")
def runs():
    try:
        x, y = load("train")
        x_test, y_test = load("test")
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    x, y = x[: STEPS // EPOCHS * BATCH], y[: STEPS // EPOCHS * BATCH]
    assert x.shape == (STEPS // EPOCHS * BATCH, 784) and x_test.shape == (
        10_000, 784)
    sparse = train(x, y, x_test, y_test, sparse=True)
    keras.backend.clear_session()
    dense = train(x, y, x_test, y_test, sparse=False)
    return dict(sparse=sparse, dense=dense)


def test_sparse_run_ends_exactly_sparse(runs):
    run = runs["sparse"]
    model, opt = run["model"], run["opt"]
    assert int(opt.iterations.numpy()) == STEPS
    assert opt.check_invariants() == []
    masks = opt.get_masks()
    kernels = {v.path: v.numpy() for v in model.trainable_variables}
    assert len(masks) == 3
    targets = {layer.path: layer.num_active for layer in opt.sparse_layers}
    total = active = 0
    for path, mask in masks.items():
        expected = targets.get(path, mask.size)  # ERK may leave a layer dense
        assert int(mask.sum()) == expected, path
        assert np.count_nonzero(kernels[path][mask == 0]) == 0, path
        total += mask.size
        active += int(mask.sum())
    assert abs(active / total - (1 - SPARSITY)) < 1e-3
    assert run["logs"]["kft/density"][-1] == pytest.approx(active / total)
    for v in model.trainable_variables:  # biases stay dense and untouched
        assert v.path not in masks or v.name == "kernel"


def test_masks_changed_during_training(runs, record_property):
    run = runs["sparse"]
    opt, logs = run["opt"], run["logs"]
    # update_end_step defaults to 75% of total_steps: updates at 50..350.
    end = int(0.75 * STEPS)
    assert opt.update_end_step == end
    assert int(opt.mask_updates.numpy()) == len(
        range(UPDATE_INTERVAL, end, UPDATE_INTERVAL)
    )
    ever = logs["kft/ever_active"][-1]
    density = logs["kft/density"][-1]
    print(f"FMNIST MLP S={SPARSITY}: ever-active fraction {ever:.4f} "
          f"(density {density:.4f})")
    record_property("ever_active_fraction", round(ever, 4))
    assert ever > density
    for layer in opt.sparse_layers:
        ever_layer = layer.ever_active.numpy()
        assert ever_layer.sum() > layer.num_active, layer.path
        assert np.all(ever_layer[layer.mask.numpy()])


def test_accuracy_within_five_points_of_dense(runs, record_property):
    sparse, dense = runs["sparse"]["accuracy"], runs["dense"]["accuracy"]
    print(f"FMNIST MLP test accuracy: sparse {sparse:.4f}, dense {dense:.4f}")
    record_property("sparse_accuracy", round(sparse, 4))
    record_property("dense_accuracy", round(dense, 4))
    assert dense > 0.75  # the dense reference itself learned
    assert sparse >= dense - 0.05
