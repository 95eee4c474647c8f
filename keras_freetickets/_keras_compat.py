"""Every use of Keras internals in keras_freetickets, in one place.

Keras 3 has no public API for a few things this library must do: hook an
optimizer's per-variable update, find an optimizer's key for a variable, read
an optimizer's raw learning rate (float or schedule), find the strategy a
model or optimizer was built under, build a model from one batch as `fit`
does, build optimizer state outside Keras' attribute tracking, find SGD's
momentum slot of a variable, walk a functional model's graph (its layers,
their kernels, the call context), set the epoch `fit` starts from, replace
the first-batch build of `fit` under a multi-worker strategy (with
TensorFlow's private test for one), and tell whether a graph is being
traced for XLA. Each is one function or name here;
`tests/test_keras_compat.py` pins them against the installed Keras and
TensorFlow, and `check_version` warns outside the tested range. No other
module of the package touches a private attribute of a Keras or TensorFlow
object.
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


def needs_symbolic_build(model):
    """True while some layer of `model`, or its compiled metrics, is not
    built yet (what `symbolic_build` would build)."""
    metrics = model._compile_metrics
    return not all(layer.built for layer in flatten_layers(model)) or (
        metrics is not None and not metrics.built
    )


def flatten_layers(model, include_self=True, recursive=True):
    """`model`'s layers, nested ones included, each once (Keras'
    `Layer._flatten_layers`)."""
    return list(model._flatten_layers(
        include_self=include_self, recursive=recursive))


def set_initial_epoch(model, epoch):
    """Makes `model.fit` start at `epoch`, as Keras' own BackupAndRestore
    does on restore."""
    model._initial_epoch = int(epoch)


def inputs_struct(model):
    """The nested structure of a Functional model's inputs (None for other
    models)."""
    return getattr(model, "_inputs_struct", None)


def optimizer_own_variables(optimizer):
    """The variables `optimizer` itself created (`iterations`, learning
    rate, slots), without those of an optimizer it wraps."""
    return optimizer._variables


def sgd_momentum(sgd, variable):
    """The momentum slot of `variable` in a built `keras.optimizers.SGD`
    (Keras's `Optimizer._get_variable_index`)."""
    return sgd.momentums[sgd._get_variable_index(variable)]


def optimizer_trainable_variables(optimizer):
    """The model variables `optimizer` was built for, in build order."""
    return optimizer._trainable_variables


def in_multi_worker_mode(strategy):
    """True when `strategy` (a tf.distribute strategy) spans more than one
    worker (TensorFlow's `StrategyExtended._in_multi_worker_mode`)."""
    return bool(strategy.extended._in_multi_worker_mode())


def in_xla_context():
    """True while tracing code that XLA will compile: a `jit_compile`
    function, a TPU step, or a function or branch called from one
    (TensorFlow's `control_flow_util.GraphOrParentsInXlaContext`)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(
        ops.get_default_graph()))


def is_default_strategy(strategy):
    """True for TensorFlow's default (no-op) strategy, the one in place
    outside any `strategy.scope()`."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


# The Trainer method that builds a model from its first batch in `fit` and
# `evaluate` (`_maybe_symbolic_build(iterator=None, data_batch=None)`).
MAYBE_SYMBOLIC_BUILD = "_maybe_symbolic_build"


def override_maybe_symbolic_build(cls, wrapper):
    """Makes class `cls` (a mixin placed before `keras.Model`) run
    `wrapper(model, base, iterator, data_batch)` where Keras builds the model
    from its first batch; `base` is the implementation `cls` overrides."""

    def method(self, iterator=None, data_batch=None):
        base = getattr(super(cls, self), MAYBE_SYMBOLIC_BUILD)
        return wrapper(self, base, iterator, data_batch)

    method.__name__ = MAYBE_SYMBOLIC_BUILD
    method.__qualname__ = f"{cls.__qualname__}.{MAYBE_SYMBOLIC_BUILD}"
    setattr(cls, MAYBE_SYMBOLIC_BUILD, method)


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


def kernel_variable(layer, attribute="kernel"):
    """The variable Keras stores behind the property `layer.<attribute>`
    (`_kernel` behind `kernel` in Dense, EinsumDense and the convolutions),
    or None where there is none."""
    import keras

    value = getattr(layer, "_" + attribute, None)
    return value if isinstance(value, keras.Variable) else None


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
