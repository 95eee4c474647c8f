"""Every use of Keras internals in keras_freetickets, in one place.

Keras 3 has no public API for a few things this library must do: hook an
optimizer's per-variable update, find an optimizer's key for a variable, read
an optimizer's raw learning rate (float or schedule), find the strategy a
model or optimizer was built under, build a model from one batch as `fit`
does, build optimizer state outside Keras' attribute tracking, and walk a
functional model's graph (its layers, their kernels, the call context). Each is one function here; `tests/test_keras_compat.py` pins them against the installed
Keras, and `check_version` warns outside the tested range.
"""

import warnings

import keras
from keras.src.models.functional import Functional
from keras.src.utils import tracking

TESTED = ((3, 0), (3, 15))  # oldest and newest minor version tested

no_automatic_dependency_tracking = tracking.no_automatic_dependency_tracking
FunctionalModel = Functional


def keras_version():
    """(major, minor) of the installed Keras."""
    major, minor = keras.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version():
    """Warns when the installed Keras is outside the tested range."""
    version = keras_version()
    if version[0] != 3 or not TESTED[0] <= version <= TESTED[1]:
        warnings.warn(
            f"keras_freetickets was tested with Keras {TESTED[0][0]}."
            f"{TESTED[0][1]} to {TESTED[1][0]}.{TESTED[1][1]}; found "
            f"{keras.__version__}. It reaches into Keras internals "
            "(keras_freetickets/_keras_compat.py), which may have moved.",
            stacklevel=2,
        )


def variable_key(optimizer, variable):
    """The key under which `optimizer` indexes `variable`'s slots."""
    return optimizer._var_key(variable)


def raw_learning_rate(optimizer):
    """The optimizer's learning rate as given: a float variable, a
    `LearningRateSchedule` or a callable."""
    return optimizer._learning_rate


def strategy_of(obj):
    """The tf.distribute strategy a model or optimizer was built under
    (None for a model built outside any strategy scope)."""
    if isinstance(obj, keras.Model):
        return obj._distribute_strategy
    return obj._distribution_strategy


def symbolic_build(model, data_batch):
    """Builds `model` (and its metrics) from one batch, as `fit` does on its
    first step (`Trainer._symbolic_build`)."""
    model._symbolic_build(data_batch=data_batch)


def sequential_graph(model):
    """The Functional graph a built Sequential model runs, or None."""
    return getattr(model, "_functional", None)


def run_through_graph(graph, inputs, operation_fn):
    """Runs a Functional graph on `inputs`, each operation through
    `operation_fn(operation)` (a callable that replaces its call)."""
    return graph._run_through_graph(inputs, operation_fn=operation_fn)


def call_context_args(layer):
    """The call arguments (e.g. "training") Keras passes to `layer` from
    the call context."""
    return getattr(layer, "_call_context_args", ())


def kernel_variable(layer):
    """The variable behind `layer.kernel` (None where the layer has none, as
    for a quantized or LoRA layer that computes its kernel)."""
    return getattr(layer, "_kernel", None)


def producing_operation(tensor):
    """The operation that produced a symbolic tensor, or None."""
    return getattr(getattr(tensor, "_keras_history", None), "operation", None)


def hook_update_step(inner, update_step):
    """Routes `inner`'s per-variable update through `update_step`.

    Returns the original bound `update_step`. The instance attribute shadows
    the class method, so `inner.update_step` shows the hook. It must sit on
    the inner optimizer itself: its `apply` all-reduces the gradients under
    tf.distribute and then calls `update_step` per variable and device, and
    only there are the gradients the same on every replica. A subclass swap
    (`inner.__class__ = ...`) would be just as visible, and a copy of the
    inner optimizer would not be the object the user configured.
    """
    original = type(inner).update_step.__get__(inner)
    object.__setattr__(inner, "update_step", update_step)
    return original


check_version()
