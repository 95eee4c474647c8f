"""TPU readiness of the SparseOptimizer train step, checked on CPU.

No TPU was available: these tests check what can be checked without one.
The train step with in-graph prune-and-grow trains under `jit_compile=True`
(XLA, as TPUStrategy compiles it), and
`keras_freetickets.distributed.tpu_compatibility_problems` finds none of
the things a TPU program cannot hold (data-dependent shapes, Python calls,
strings, host transfers) in its traced graph and HLO. Negative controls
show that the check does flag them.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_freetickets as kft
from keras_freetickets import distributed

BATCH = 32


def make_data(n=512, features=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ rng.normal(size=(features, classes))).argmax(1).astype("int64")
    return x, y


def sparse_mlp(grow="gradient", inner=None, jit_compile=True, extra=None):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((20,))]
    if extra is not None:
        layers.append(extra)
    layers += [
        keras.layers.Dense(64, activation="relu", name="hidden_0"),
        keras.layers.Dense(32, activation="relu", name="hidden_1"),
        keras.layers.Dense(3, name="logits"),
    ]
    model = keras.Sequential(layers)
    opt = kft.SparseOptimizer(
        inner or keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
        grow=grow, drop_fraction=0.3, update_interval=8, seed=1,
    )
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=jit_compile,
    )
    return model, opt


def batch(x, y):
    return x[:BATCH], y[:BATCH]


def compiled_hlo(model, data):
    step = tf.function(model.train_step, jit_compile=True)
    return step.experimental_get_compiler_ir(
        *[tuple(tf.convert_to_tensor(t) for t in data)]
    )(stage="hlo")


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_fit_with_jit_compile_trains_and_rewires(grow):
    x, y = make_data()
    model, opt = sparse_mlp(grow)
    history = model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False,
                        verbose=0)
    assert model.jit_compile is True  # not silently turned off by Keras
    steps = 4 * len(x) // BATCH
    assert int(opt.iterations.numpy()) == steps
    # Updates at steps 8, 16, ... (the step count before it increments).
    assert int(opt.mask_updates.numpy()) == (steps - 1 - 8) // 8 + 1
    assert opt.check_invariants() == []
    for stats in opt.layer_stats():
        if stats["density"] < 1.0:
            assert stats["ever_active"] > stats["density"]  # masks moved
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize(
    "grow, inner",
    [("gradient", None), ("random", None),
     ("gradient", keras.optimizers.Adam(1e-3))],
    ids=["rigl-sgd", "set-sgd", "rigl-adam"],
)
def test_train_step_has_nothing_a_tpu_rejects(grow, inner):
    x, y = make_data()
    model, _ = sparse_mlp(grow, inner=inner)
    assert distributed.tpu_compatibility_problems(model, batch(x, y)) == []
    # The prune-and-grow is inside the compiled program: top_k lowers to a
    # static-shaped sort, the update step to a conditional.
    hlo = compiled_hlo(model, batch(x, y))
    assert " sort(" in hlo
    assert " conditional(" in hlo


def test_global_exploration_step_has_nothing_a_tpu_rejects():
    x, y = make_data()
    model, opt = sparse_mlp("gradient")
    opt.enable_global_exploration(grow="random")
    opt.schedule_global_exploration(step=16, drop_fraction=0.8)
    assert distributed.tpu_compatibility_problems(model, batch(x, y)) == []


def test_sparse_cnn_train_step_has_nothing_a_tpu_rejects():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    model.compile(
        optimizer=kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
            update_interval=4,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    assert distributed.tpu_compatibility_problems(model, (x, y)) == []


# ---------------------------------------------------------- negative controls
class _NonzeroRows(keras.layers.Layer):
    """Keeps rows with a positive first feature: a data-dependent shape."""

    def call(self, x):
        index = tf.where(x[:, 0] > 0)[:, 0]  # one-argument tf.where
        kept = tf.gather(x, index)
        return tf.pad(kept, [[0, tf.shape(x)[0] - tf.shape(kept)[0]], [0, 0]])

    def compute_output_shape(self, input_shape):
        return input_shape


class _UniqueShift(keras.layers.Layer):
    def call(self, x):
        values = tf.unique(tf.reshape(x[:, :1], [-1])).y
        return x + tf.reduce_sum(values) * 0.0

    def compute_output_shape(self, input_shape):
        return input_shape


class _PythonCall(keras.layers.Layer):
    def call(self, x):
        y = tf.py_function(lambda t: t * 1.0, [x], tf.float32)
        return tf.ensure_shape(y, x.shape)

    def compute_output_shape(self, input_shape):
        return input_shape


@pytest.mark.parametrize(
    "layer, expected",
    [
        (_NonzeroRows(), ["op Where", "HLO dynamic shape"]),
        (_UniqueShift(), ["op Unique", "HLO dynamic shape"]),
        (_PythonCall(), ["op EagerPyFunc", "XLA cannot compile"]),
    ],
    ids=["where", "unique", "py_function"],
)
def test_check_flags_what_a_tpu_rejects(layer, expected):
    x, y = make_data()
    model, _ = sparse_mlp(extra=layer)
    problems = distributed.tpu_compatibility_problems(model, batch(x, y))
    for text in expected:
        assert any(p.startswith(text) for p in problems), problems


def test_check_validates_arguments():
    x, y = make_data()
    model, _ = sparse_mlp()
    uncompiled = keras.Sequential([keras.Input((20,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="compiled"):
        distributed.tpu_compatibility_problems(uncompiled, batch(x, y))
    with pytest.raises(ValueError, match="batch"):
        distributed.tpu_compatibility_problems(model, x[:BATCH])
