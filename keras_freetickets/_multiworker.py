"""The fix that lets Keras 3.15's `model.fit` run on several workers.

`MultiWorkerModelMixin` (subclassed models) and `prepare_model` (one model
object) share one implementation; see `keras_freetickets.distributed` for
what it fixes and why.
"""

import types

import keras

from keras_freetickets import _keras_compat as compat

_PATCHED_FLAG = "_kft_multi_worker_ready"


def is_multi_worker(strategy):
    """True for a MultiWorkerMirroredStrategy spanning more than one worker."""
    import tensorflow as tf

    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and compat.in_multi_worker_mode(strategy)


def _local_batch(strategy, batch):
    """The first local copy of a distributed batch: only shapes are needed."""
    import tensorflow as tf

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return keras.tree.map_structure(first, batch)


def _symbolic_build(model, base, iterator=None, data_batch=None):
    strategy = compat.strategy_of(model)
    if strategy is None or not is_multi_worker(strategy):
        return base(iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = _local_batch(strategy, next(batches))
            break
    with strategy.scope():
        compat.symbolic_build(model, data_batch)


def _logs_with_worker_axis(model, logs):
    """Gives every log a leading axis of 1 under multi-worker training, so
    that Keras' `strategy.reduce("MEAN", v, axis=0)` averages over workers."""
    import tensorflow as tf

    if not is_multi_worker(model.distribute_strategy):
        return logs

    def expand(value):
        if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(
            value, "shape"
        ):
            return tf.expand_dims(tf.convert_to_tensor(value), 0)
        return value

    return keras.tree.map_structure(expand, logs)


def _check_step_settings(model):
    """Refuses what Keras or TensorFlow cannot run on several workers."""
    strategy = model.distribute_strategy
    if not is_multi_worker(strategy):
        return
    steps = getattr(model, "steps_per_execution", 1) or 1
    if steps > 1:
        raise ValueError(
            "`steps_per_execution` > 1 is not supported under "
            "MultiWorkerMirroredStrategy with more than one worker (Keras "
            "3.15's multi-step loop fails on the cross-worker collectives): "
            "compile with steps_per_execution=1. Received: "
            f"steps_per_execution={steps}"
        )
    devices = list(strategy.extended.worker_devices)
    if model.jit_compile and all("CPU" in d.upper() for d in devices):
        raise ValueError(
            "`jit_compile=True` is not supported under "
            "MultiWorkerMirroredStrategy on CPU workers (TensorFlow's XLA "
            "has no CPU collectives): compile with jit_compile=False. "
            f"Received: jit_compile={model.jit_compile!r} on {devices}"
        )


# One implementation of the five overrides, shared by `MultiWorkerModelMixin`
# (through `super()`) and `prepare_model` (bound to one model object, since
# that must keep the model's class): each takes the model and the method it
# overrides.
def _build(model, base, iterator=None, data_batch=None):
    _symbolic_build(model, base, iterator, data_batch)


def _step(model, base, data):
    return _logs_with_worker_axis(model, base(data))


def _make_function(model, base, force=False):
    _check_step_settings(model)
    return base(force=force)


_WRAPPERS = {
    compat.MAYBE_SYMBOLIC_BUILD: _build,
    "train_step": _step,
    "test_step": _step,
    "make_train_function": _make_function,
    "make_test_function": _make_function,
}


class MultiWorkerModelMixin:
    """Makes `fit` / `evaluate` / `predict` work on several workers (Keras 3).

    Mix it in before `keras.Model` in a subclassed model (for a model built
    with `keras.Sequential` or the functional API, use `prepare_model`). It
    changes nothing without a multi-worker MultiWorkerMirroredStrategy.
    Under one, the model is built from the local copy of the first batch,
    the train and test steps' logs get a leading axis of 1 so that Keras'
    cross-replica reduction is a mean over workers (epoch-end and `evaluate`
    metrics are global values; per-batch logs average the workers' running
    values), and `steps_per_execution > 1` (and `jit_compile=True` on CPU
    workers, where XLA has no collectives) is refused with a ValueError.

    Example:

    ```python
    class MyModel(kft.distributed.MultiWorkerModelMixin, keras.Model):
        ...
    with strategy.scope():
        model = MyModel()
        model.compile(optimizer=kft.SparseOptimizer(...), loss=...)
    model.fit(dataset, epochs=3)
    ```
    """

    # Keras' first-batch build is overridden below, through _keras_compat.

    def train_step(self, data):
        return _step(self, super().train_step, data)

    def test_step(self, data):
        return _step(self, super().test_step, data)

    def make_train_function(self, force=False):
        return _make_function(self, super().make_train_function, force=force)

    def make_test_function(self, force=False):
        return _make_function(self, super().make_test_function, force=force)


compat.override_maybe_symbolic_build(MultiWorkerModelMixin, _build)


def prepare_model(model, strategy=None):
    """Readies a model for `fit` / `evaluate` / `predict` under `strategy`.

    Under a multi-worker MultiWorkerMirroredStrategy it gives this one model
    object the behavior of `MultiWorkerModelMixin` (its class, config and
    saving are unchanged); under any other strategy it only checks that the
    model was built in the strategy's scope. Calling it twice is harmless.

    Args:
        model: a `keras.Model`, created inside `strategy.scope()`.
        strategy: the `tf.distribute.Strategy` it trains under (default:
            the one the model was created under, else the current one).

    Returns:
        `model` itself.

    Example:

    ```python
    strategy = kft.distributed.make_strategy("multi_worker")
    with strategy.scope():
        model = kft.distributed.prepare_model(build_model(), strategy)
        model.compile(optimizer=kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8),
            loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128 * strategy.num_replicas_in_sync)
    ```
    """
    import tensorflow as tf

    if not isinstance(model, keras.Model):
        raise ValueError(
            "Argument `model` must be a `keras.Model`. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if strategy is None:
        strategy = compat.strategy_of(model) or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(
            "Argument `strategy` must be a `tf.distribute.Strategy`. "
            f"Received: strategy={strategy!r}"
        )
    own = compat.strategy_of(model)
    if not compat.is_default_strategy(strategy) and own is not strategy:
        raise ValueError(
            "The model must be created inside `strategy.scope()` of the "
            "strategy it trains under. Received: a model created under "
            f"{type(own).__name__ if own else 'no strategy'}, strategy="
            f"{type(strategy).__name__}"
        )
    if isinstance(model, MultiWorkerModelMixin) or getattr(
        model, _PATCHED_FLAG, False
    ):
        return model
    if not is_multi_worker(strategy):
        return model
    cls = type(model)
    for name, wrapper in _WRAPPERS.items():
        base = types.MethodType(getattr(cls, name), model)
        object.__setattr__(model, name, _bound(wrapper, model, base))
    object.__setattr__(model, _PATCHED_FLAG, True)
    return model


def _bound(wrapper, model, base):
    def method(*args, **kwargs):
        return wrapper(model, base, *args, **kwargs)

    return method
