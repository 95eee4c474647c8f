"""Pins the Keras internals that keras_freetickets uses (_keras_compat)."""

import ast
import pathlib
import warnings

import keras
import numpy as np
import pytest

from keras_freetickets import _keras_compat as compat

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_freetickets"


def test_installed_keras_is_in_the_tested_range():
    version = compat.keras_version()
    assert compat.TESTED[0] <= version <= compat.TESTED[1], keras.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version()


def test_version_guard_warns_outside_the_range(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "4.0.0")
    with pytest.warns(UserWarning, match="found 4.0.0"):
        compat.check_version()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_optimizer_internals_are_where_we_read_them(name):
    opt = getattr(keras.optimizers, name)(learning_rate=0.1)
    variable = keras.Variable([1.0, 2.0])
    opt.build([variable])
    assert isinstance(compat.variable_key(opt, variable), (str, int))
    assert float(compat.raw_learning_rate(opt).numpy()) == pytest.approx(0.1)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    assert compat.raw_learning_rate(
        getattr(keras.optimizers, name)(learning_rate=schedule)) is schedule
    assert compat.strategy_of(opt) is not None
    calls = []
    original = compat.hook_update_step(
        opt, lambda g, v, lr: calls.append(tuple(v.shape)))
    opt.apply([keras.ops.ones((2,))], [variable])
    assert calls == [(2,)]
    assert callable(original)


def test_model_strategy_and_functional_class():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert compat.strategy_of(model) is None
    unbuilt = keras.Sequential([keras.layers.Dense(1)])
    unbuilt.compile(loss="mse")
    compat.symbolic_build(unbuilt, (np.zeros((4, 3), "float32"), np.zeros((4, 1))))
    assert unbuilt.built and unbuilt.layers[0].kernel.shape == (3, 1)
    functional = keras.Model(*(lambda i: (i, keras.layers.Dense(1)(i)))(
        keras.Input((2,))))
    assert isinstance(functional, compat.FunctionalModel)
    dense = functional.layers[-1]
    assert compat.producing_operation(functional.outputs[0]) is dense
    assert compat.kernel_variable(dense) is not None
    assert "training" in compat.call_context_args(keras.layers.Dropout(0.5))
    assert isinstance(compat.sequential_graph(model), compat.FunctionalModel)
    seen = []
    out = compat.run_through_graph(
        functional, keras.ops.ones((1, 2)),
        lambda op: (seen.append(op), op)[1])
    assert tuple(out.shape) == (1, 1) and dense in seen


def test_no_module_but_the_compat_one_imports_keras_src():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_keras_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith("keras.src")]
    assert offenders == []


def test_model_internals_are_where_we_read_them():
    inner = keras.Sequential([keras.layers.Dense(2)])
    model = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1)])
    layers = compat.flatten_layers(model)
    assert layers[0] is model and inner in layers and inner.layers[0] in layers
    model.compile(loss="mse", metrics=["mae"])
    assert compat.needs_symbolic_build(model)  # the compiled metrics
    compat.symbolic_build(model, (np.zeros((2, 3), "float32"), np.zeros((2, 1))))
    assert not compat.needs_symbolic_build(model)
    compat.set_initial_epoch(model, 2)
    history = model.fit(np.zeros((4, 3)), np.zeros((4, 1)), epochs=3, verbose=0)
    assert history.epoch == [2]
    inputs = {"a": keras.Input((2,), name="a"), "b": keras.Input((1,), name="b")}
    functional = keras.Model(
        inputs, keras.layers.Dense(1)(keras.layers.Concatenate()(
            [inputs["a"], inputs["b"]])))
    assert set(compat.inputs_struct(functional)) == {"a", "b"}


def test_optimizer_variable_lists_are_where_we_read_them():
    opt = keras.optimizers.Adam(0.1)
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([[1.0]])]
    opt.build(variables)
    assert compat.optimizer_trainable_variables(opt) == variables
    own = compat.optimizer_own_variables(opt)
    assert any(v is opt.iterations for v in own)
    assert len(own) == len(opt.variables)


def test_sgd_momentum_slot_is_where_we_read_it():
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([[1.0]])]
    sgd.build(variables)
    for variable, slot in zip(variables, sgd.momentums):
        assert compat.sgd_momentum(sgd, variable) is slot
        # As the update step sees it: the backend variable, not Keras's.
        assert compat.sgd_momentum(sgd, variable.value) is slot
    assert "momentum" in sgd.momentums[1].name


def test_strategy_internals_are_where_we_read_them():
    import tensorflow as tf
    from tensorflow.python.distribute import collective_all_reduce_strategy

    default = tf.distribute.get_strategy()
    assert compat.is_default_strategy(default)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert not compat.is_default_strategy(mirrored)
    assert compat.in_multi_worker_mode(mirrored) is False
    # MultiWorkerMirroredStrategy's extended class answers the same question
    # (starting one here would fix this process' collective setup).
    assert callable(collective_all_reduce_strategy.CollectiveAllReduceExtended
                    ._in_multi_worker_mode)


def test_xla_context_is_seen_in_jit_functions_and_what_they_call():
    import tensorflow as tf

    seen = []

    def probe():
        seen.append(compat.in_xla_context())
        return tf.constant(1)

    nested = tf.function(probe)
    tf.function(probe)()
    tf.function(probe, jit_compile=True)()
    tf.function(lambda: nested(), jit_compile=True)()
    tf.function(lambda: tf.cond(tf.constant(True), probe, probe),
                jit_compile=True)()
    probe()  # eager
    assert seen == [False, True, True, True, True, False]


def test_maybe_symbolic_build_override_runs_in_fit_and_evaluate():
    import inspect

    base = getattr(keras.Model, compat.MAYBE_SYMBOLIC_BUILD)
    assert list(inspect.signature(base).parameters) == [
        "self", "iterator", "data_batch"]
    calls = []

    class Mixin:
        pass

    def wrapper(model, base, iterator, data_batch):
        calls.append(type(model).__name__)
        return base(iterator=iterator, data_batch=data_batch)

    compat.override_maybe_symbolic_build(Mixin, wrapper)

    class Model(Mixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Model()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0)
    model.evaluate(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0)
    assert calls and set(calls) == {"Model"} and model.built
