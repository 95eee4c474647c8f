"""Helpers shared by the subprocess entry points in `tests/scripts/`.

The scripts are run by the tests with `sys.executable`; Python puts this
folder first on `sys.path`, so they import this module by its bare name.
Nothing here imports TensorFlow at import time: a script configures its
process (logical devices, determinism) before the first TensorFlow op.
"""

import json

import numpy as np


def make_data(n, features=20, classes=3, seed=0):
    """Synthetic classification data: float32 features, int64 labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes)).astype("float32")
    y = (x @ w).argmax(1).astype("int64")
    return x, y


def make_mlp(sizes=(20, 64, 32, 3), seed=0):
    """A ReLU MLP with logits out, initialized from `seed`.

    Layers have fixed names, so that variable paths are the same in every
    model that a process builds.
    """
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((sizes[0],))]
    for i, width in enumerate(sizes[1:-1]):
        layers.append(
            keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")
        )
    layers.append(keras.layers.Dense(sizes[-1], name="logits"))
    return keras.Sequential(layers, name="mlp")


def loss_fn():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def local_values(strategy, variable):
    """Per-replica numpy copies of a Keras variable (one under no strategy)."""
    value = getattr(variable, "value", variable)
    return [np.array(v) for v in strategy.experimental_local_results(value)]


def record_optimizer(out, prefix, strategy, model, opt):
    """Stores masks, kernels, ever-active records of every replica in `out`.

    Keys: `<prefix>/mask/<i>/<replica>`, `<prefix>/kernel/<i>/<replica>`,
    `<prefix>/ever/<i>/<replica>` for sparse layer `i`, and
    `<prefix>/weights/<j>` for the primary copy of every model weight.
    Returns a dict of scalar facts for the JSON side record.
    """
    for layer in opt.sparse_layers:
        for name, variable in (
            ("mask", layer.mask), ("kernel", layer.variable),
            ("ever", layer.ever_active),
        ):
            for r, value in enumerate(local_values(strategy, variable)):
                out[f"{prefix}/{name}/{layer.index}/{r}"] = value
    for j, weight in enumerate(model.weights):
        out[f"{prefix}/weights/{j}"] = np.array(weight.numpy())
    return {
        "paths": [layer.path for layer in opt.sparse_layers],
        "num_active": [layer.num_active for layer in opt.sparse_layers],
        "iterations": int(opt.iterations.numpy()),
        "mask_updates": int(opt.mask_updates.numpy()),
        "problems": opt.check_invariants(),
        "replicas": strategy.num_replicas_in_sync,
    }


def save(path, arrays, meta):
    """Writes arrays and a JSON side record `meta` into one .npz."""
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)


def load(path):
    """Reads a file written by `save`: (arrays dict, meta dict)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(str(data["__meta__"]))
    return arrays, meta
