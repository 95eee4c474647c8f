"""Scale-out: `model.fit` on several workers, TPU checks, members per worker.

Keras 3.15's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585) at two points of its TensorFlow trainer:
`_maybe_symbolic_build` reduces the first data batch across replicas to
learn its shapes (a reduction MultiWorkerMirroredStrategy cannot do on a
batch), and `reduce_per_replica` reduces the step's scalar logs along an
axis 0 they do not have. `prepare_model` (or `MultiWorkerModelMixin` for
subclassed models) fixes both for one model, without touching Keras: the
build reads the shapes from the local copy of the batch, and under
multi-worker training the step's logs get a leading axis of length 1, so
that Keras' reduction is a mean over workers. Everything else (callbacks,
`History`, validation, `evaluate`, `predict`) is Keras' own code. Two
settings that still fail under multi-worker training are refused with a
clear ValueError: `steps_per_execution > 1` (Keras' multi-step loop) and
`jit_compile=True` on CPU workers (XLA has no CPU collectives).

The rest of the module covers what a multi-worker run needs around `fit`:
creating a strategy by name (`make_strategy`), reading `TF_CONFIG`
(`task_info`, `is_chief`, `member_index_from_cluster`), one
`BackupAndRestore` folder per worker (`worker_backup_dir`; a shared one
races and kills a worker), callbacks that must act once (`ChiefOnly`), DST
ensembles trained as independent processes, one member per worker,
assembled when every member file is there (`wait_for_members`,
`ensemble_from_directory`), and a CPU-side check that a train step holds
nothing a TPU rejects (`tpu_compatibility_problems`).
"""

import os
import re
import time
import types

import keras

from keras_freetickets._tf_config import read_tf_config
from keras_freetickets._validation import check_int

STRATEGY_NAMES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
_PATCHED_FLAG = "_kft_multi_worker_ready"


# --------------------------------------------------------------- TF_CONFIG
def task_info(tf_config=None):
    """Reads this process' place in a cluster from `TF_CONFIG`.

    Without `TF_CONFIG` (or with an empty one) the process is a cluster of
    one: worker 0 of 1, the chief.

    Args:
        tf_config: dict, JSON string or None (read the `TF_CONFIG`
            environment variable).

    Returns:
        A dict with `"type"` (str, e.g. "worker" or "chief"), `"index"`
        (int), `"num_workers"` (int: chief and worker tasks together),
        `"worker_rank"` (int in [0, num_workers): the chief first, then the
        workers in index order), `"is_chief"` (bool) and `"cluster"` (dict).

    Example:

    ```python
    info = kft.distributed.task_info(
        {"cluster": {"worker": ["h0:2222", "h1:2222"]},
         "task": {"type": "worker", "index": 1}})
    assert info["worker_rank"] == 1 and not info["is_chief"]
    ```
    """
    config = read_tf_config(tf_config)
    cluster = dict(config.get("cluster") or {})
    task = dict(config.get("task") or {})
    if not cluster:
        return {
            "type": task.get("type", "worker"), "index": 0, "num_workers": 1,
            "worker_rank": 0, "is_chief": True, "cluster": {},
        }
    task_type = task.get("type")
    index = task.get("index", 0)
    if not isinstance(task_type, str) or task_type not in cluster:
        raise ValueError(
            "TF_CONFIG's `task.type` must name a job of its `cluster` "
            f"({sorted(cluster)}). Received: task={task!r}"
        )
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < len(cluster[task_type])
    ):
        raise ValueError(
            f"TF_CONFIG's `task.index` must be in [0, "
            f"{len(cluster[task_type])}) for job {task_type!r}. "
            f"Received: task={task!r}"
        )
    chiefs = len(cluster.get("chief", []))
    num_workers = chiefs + len(cluster.get("worker", []))
    if task_type == "chief":
        rank = index
    elif task_type == "worker":
        rank = chiefs + index
    else:  # "evaluator", "ps": not a training worker
        rank = None
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and chiefs == 0
    )
    return {
        "type": task_type, "index": index, "num_workers": num_workers,
        "worker_rank": rank, "is_chief": is_chief, "cluster": cluster,
    }


def is_chief(tf_config=None):
    """True on the process that should write shared outputs (checkpoints,
    logs): the "chief" task, or worker 0 when the cluster has no chief, or a
    process without `TF_CONFIG`.

    Args:
        tf_config: dict, JSON string or None (read `TF_CONFIG`).
    """
    return task_info(tf_config)["is_chief"]


def member_index_from_cluster(tf_config=None):
    """The ensemble member this worker trains: its rank among the cluster's
    chief and worker tasks (0 without `TF_CONFIG`).

    Pass it as `train_dst_ensemble(..., member_index=...)` so that worker i
    trains member i. The processes train independently (no strategy is
    needed), so `TF_CONFIG` here only numbers them.

    Args:
        tf_config: dict, JSON string or None (read `TF_CONFIG`).

    Raises:
        ValueError: the task is not a chief or worker task.
    """
    info = task_info(tf_config)
    if info["worker_rank"] is None:
        raise ValueError(
            "Only chief and worker tasks train ensemble members. Received "
            f"task type {info['type']!r}"
        )
    return info["worker_rank"]


def worker_backup_dir(base, tf_config=None):
    """A `BackupAndRestore` folder of this worker's own: `base/<type>_<index>`.

    Every worker of a MultiWorkerMirroredStrategy run must back up to its
    own folder: with one shared folder the workers race on creating and
    replacing its files, which kills a worker. Restarting the whole cluster
    with the same `base` resumes every worker from its own backup.

    Args:
        base: str or path-like. Folder shared by the run.
        tf_config: dict, JSON string or None (read `TF_CONFIG`).

    Example:

    ```python
    backup = kft.BackupAndRestore(
        kft.distributed.worker_backup_dir("/tmp/run1/backup"))
    ```
    """
    if not os.fspath(base):
        raise ValueError(
            f"Argument `base` must be a folder. Received: base={base!r}"
        )
    info = task_info(tf_config)
    return os.path.join(os.fspath(base), f"{info['type']}_{info['index']}")


# --------------------------------------------------------------- strategies
def make_strategy(name="default", tpu=None):
    """Creates a `tf.distribute` strategy by name.

    Create it at the start of the program, before any other TensorFlow
    work (MultiWorkerMirroredStrategy and TPUStrategy configure the runtime),
    then build and compile the model inside `strategy.scope()` and pass it
    through `prepare_model`.

    Args:
        name: str. "default" (no distribution), "one_device" (the first
            GPU, else the CPU), "mirrored" (all local GPUs, else the CPU),
            "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes
            from `TF_CONFIG`) or "tpu" (TPUStrategy).
        tpu: str or None. For "tpu": the TPU address or name given to
            `TPUClusterResolver` (None: found from the environment, as on a
            Cloud TPU VM).

    Returns:
        A `tf.distribute.Strategy`.

    Example:

    ```python
    strategy = kft.distributed.make_strategy("multi_worker")
    with strategy.scope():
        model = kft.distributed.prepare_model(build_model(), strategy)
        model.compile(optimizer=kft.SparseOptimizer(...), loss=...)
    model.fit(dataset, epochs=3)
    ```
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Argument `name` must be one of {list(STRATEGY_NAMES)}. "
            f"Received: name={name!r}"
        )
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(
            gpus[0].name if gpus else "/cpu:0"
        )
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        read_tf_config()  # a clear error here rather than deep inside TF
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_multi_worker(strategy):
    """True for a MultiWorkerMirroredStrategy spanning more than one worker."""
    import tensorflow as tf

    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and bool(strategy.extended._in_multi_worker_mode())


# ------------------------------------------------------- the fit fix itself
def _local_batch(strategy, batch):
    """The first local copy of a distributed batch: only shapes are needed."""
    import tensorflow as tf

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return keras.tree.map_structure(first, batch)


def _symbolic_build(model, base, iterator=None, data_batch=None):
    strategy = model._distribute_strategy
    if strategy is None or not is_multi_worker(strategy):
        return base(iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = _local_batch(strategy, next(batches))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        _symbolic_build(
            self, super()._maybe_symbolic_build, iterator, data_batch
        )

    def train_step(self, data):
        return _logs_with_worker_axis(self, super().train_step(data))

    def test_step(self, data):
        return _logs_with_worker_axis(self, super().test_step(data))

    def make_train_function(self, force=False):
        _check_step_settings(self)
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        _check_step_settings(self)
        return super().make_test_function(force=force)


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
        strategy = model._distribute_strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(
            "Argument `strategy` must be a `tf.distribute.Strategy`. "
            f"Received: strategy={strategy!r}"
        )
    own = model._distribute_strategy
    if not _is_default(strategy) and own is not strategy:
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

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        _symbolic_build(
            self, types.MethodType(cls._maybe_symbolic_build, self),
            iterator, data_batch,
        )

    def train_step(self, data):
        return _logs_with_worker_axis(self, cls.train_step(self, data))

    def test_step(self, data):
        return _logs_with_worker_axis(self, cls.test_step(self, data))

    def make_train_function(self, force=False):
        _check_step_settings(self)
        return cls.make_train_function(self, force=force)

    def make_test_function(self, force=False):
        _check_step_settings(self)
        return cls.make_test_function(self, force=force)

    for function in (maybe_symbolic_build, train_step, test_step,
                     make_train_function, make_test_function):
        name = (
            "_maybe_symbolic_build" if function is maybe_symbolic_build
            else function.__name__
        )
        object.__setattr__(model, name, types.MethodType(function, model))
    object.__setattr__(model, _PATCHED_FLAG, True)
    return model


def _is_default(strategy):
    """True for TensorFlow's default (no-op) strategy."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


# --------------------------------------------------------------------- TPUs
# TensorFlow ops that a TPU program cannot hold: outputs whose shape depends
# on the data, calls back into Python, host printing.
TPU_REJECTED_OPS = frozenset({
    "Where", "Unique", "UniqueV2", "UniqueWithCounts", "UniqueWithCountsV2",
    "ListDiff", "SetSize", "DenseToDenseSetOperation",
    "DenseToSparseSetOperation", "SparseToSparseSetOperation",
    "NonMaxSuppression", "NonMaxSuppressionV2", "NonMaxSuppressionV3",
    "NonMaxSuppressionV4", "NonMaxSuppressionV5", "DynamicPartition",
    "PyFunc", "PyFuncStateless", "EagerPyFunc", "Print", "PrintV2",
})
# HLO instructions that leave the device or call outside XLA.
_HLO_HOST_OPS = re.compile(
    r"\s(custom-call|infeed|outfeed|send|send-done|recv|recv-done)\("
)
_HLO_DYNAMIC_DIM = re.compile(r"\[[^\]]*(<=|\?)[^\]]*\]")


def tpu_compatibility_problems(model, data):
    """Lists what in a compiled model's train step a TPU would reject.

    The train step (`model.train_step`, with the model's optimizer, e.g. a
    `SparseOptimizer` and its in-graph prune-and-grow) is traced for the
    static-shaped batch `data` and compiled with XLA (`jit_compile=True`), as
    TPUStrategy does. Reported: ops of `TPU_REJECTED_OPS` and string-typed
    ops anywhere in the traced program (control-flow branches included), a
    failure to compile with XLA, HLO shapes with a dynamic dimension (`<=n`
    or `?`), and HLO instructions that leave the device (custom calls,
    infeed / outfeed, send / recv). Nothing runs: no weight changes. This is
    a check on CPU; it has not been confirmed on a TPU.

    Args:
        model: a compiled `keras.Model`.
        data: a batch `(x, y)` or `(x, y, sample_weight)` of arrays or
            tensors, with the per-replica batch size the TPU run uses.

    Returns:
        A list of strings, empty when nothing was found.

    Example:

    ```python
    model.compile(optimizer=kft.SparseOptimizer(...), loss=...)
    assert kft.distributed.tpu_compatibility_problems(
        model, (x[:128], y[:128])) == []
    ```
    """
    import tensorflow as tf

    if not isinstance(model, keras.Model) or not model.compiled:
        raise ValueError(
            "Argument `model` must be a compiled `keras.Model`. Received: "
            f"model={model!r}"
        )
    if not isinstance(data, (tuple, list)) or not 1 <= len(data) <= 3:
        raise ValueError(
            "Argument `data` must be a batch (x, y) or (x, y, sample_weight)."
            f" Received: {type(data).__name__}"
        )
    data = keras.tree.map_structure(tf.convert_to_tensor, tuple(data))
    if not all(layer.built for layer in model._flatten_layers()) or (
        model._compile_metrics is not None
        and not model._compile_metrics.built
    ):
        model._symbolic_build(data_batch=data)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)

    step = tf.function(model.train_step, jit_compile=True)
    problems = []
    graph_def = step.get_concrete_function(data).graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    seen = set()
    for node in nodes:
        rejected = node.op in TPU_REJECTED_OPS
        if not rejected and node.op != "Const":
            rejected = any(
                value.type == tf.string.as_datatype_enum
                or tf.string.as_datatype_enum in value.list.type
                for value in node.attr.values()
            )
        if rejected and node.op not in seen:
            seen.add(node.op)
            problems.append(f"op {node.op} (e.g. node {node.name!r})")
    try:
        hlo = step.experimental_get_compiler_ir(data)(stage="hlo")
    except Exception as e:  # XLA names the op it cannot compile
        problems.append(f"XLA cannot compile the train step: {e}")
        return problems
    for line in hlo.splitlines():
        if line.lstrip().startswith(("HloModule", "ENTRY")):
            continue
        host = _HLO_HOST_OPS.search(line)
        if host:
            problems.append(f"HLO {host.group(1)}: {line.strip()[:160]}")
        elif _HLO_DYNAMIC_DIM.search(line.split(", metadata=")[0]):
            problems.append(f"HLO dynamic shape: {line.strip()[:160]}")
    return problems


# ----------------------------------------------------------------- callbacks
class ChiefOnly(keras.callbacks.Callback):
    """Runs a callback on the chief worker only.

    `keras.callbacks.ModelCheckpoint` (and any callback that writes one
    shared file) has no notion of workers: under MultiWorkerMirroredStrategy
    every worker would write the same path at once and the file can come
    out corrupt. Wrapped in `ChiefOnly`, it runs on the chief (see
    `is_chief`) and does nothing elsewhere. The replicas hold identical
    weights, so the chief's file is the run's. The wrapped callback must not
    take part in a cross-worker collective (saving the model does not).

    Args:
        callback: a `keras.callbacks.Callback`.
        chief: bool or None. Whether this process is the chief (default:
            read from `TF_CONFIG`).

    Example:

    ```python
    checkpoint = kft.distributed.ChiefOnly(
        keras.callbacks.ModelCheckpoint("/shared/run1/model.keras"))
    model.fit(dataset, epochs=10, callbacks=[checkpoint])
    ```
    """

    def __init__(self, callback, chief=None):
        super().__init__()
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(
                "Argument `callback` must be a `keras.callbacks.Callback`. "
                f"Received: callback={callback!r}"
            )
        if chief is not None and not isinstance(chief, bool):
            raise ValueError(
                "Argument `chief` must be a bool or None. "
                f"Received: chief={chief!r}"
            )
        self.callback = callback
        self.chief = is_chief() if chief is None else chief

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def __getattribute__(self, name):
        # Forward every `on_*` hook to the wrapped callback on the chief.
        if name.startswith("on_"):
            inner = object.__getattribute__(self, "callback")
            if object.__getattribute__(self, "chief"):
                return getattr(inner, name)
            return _ignore
        return object.__getattribute__(self, name)


def _ignore(*args, **kwargs):
    del args, kwargs


# ------------------------------------------------ DST members across workers
def wait_for_members(member_dir, num_members, timeout_s=3600.0, poll_s=5.0):
    """Waits until every member file of a DST ensemble is in `member_dir`.

    With `train_dst_ensemble(..., member_index=i)` running in separate
    processes (for example worker i of a cluster, see
    `member_index_from_cluster`), each process writes its member atomically
    when it finishes; the process that assembles the ensemble calls this
    first.

    Args:
        member_dir: str or path-like. Folder of `member_<i>.kftm` files.
        num_members: int >= 1. Members expected (indices 0..M-1).
        timeout_s: float >= 0. Seconds to wait at most.
        poll_s: float > 0. Seconds between checks.

    Returns:
        The member paths, in index order.

    Raises:
        TimeoutError: members are still missing after `timeout_s`; the
            message lists them.

    Example:

    ```python
    paths = kft.distributed.wait_for_members("members", 3, timeout_s=600)
    ensemble = kft.FreeTicketsEnsemble.from_directory("members")
    ```
    """
    from keras_freetickets import dst
    from keras_freetickets import members as members_lib

    check_int("num_members", num_members, 1)
    if isinstance(timeout_s, bool) or not isinstance(
        timeout_s, (int, float)
    ) or timeout_s < 0:
        raise ValueError(
            "Argument `timeout_s` must be a number >= 0. "
            f"Received: timeout_s={timeout_s!r}"
        )
    if isinstance(poll_s, bool) or not isinstance(
        poll_s, (int, float)
    ) or poll_s <= 0:
        raise ValueError(
            "Argument `poll_s` must be a number > 0. "
            f"Received: poll_s={poll_s!r}"
        )
    deadline = time.monotonic() + float(timeout_s)
    while True:
        missing = (
            dst.missing_members(member_dir, num_members)
            if os.path.isdir(member_dir) else list(range(num_members))
        )
        if not missing:
            return [members_lib.member_path(member_dir, i)
                    for i in range(num_members)]
        left = deadline - time.monotonic()
        if left <= 0:
            names = [os.path.basename(members_lib.member_path(member_dir, i))
                     for i in missing]
            raise TimeoutError(
                f"{len(missing)} of {num_members} ensemble members are still "
                f"missing from {os.fspath(member_dir)} after {timeout_s} s: "
                f"members {missing} (files {names}). Check that the "
                "processes training them are running, each with its own "
                "`member_index`."
            )
        time.sleep(min(float(poll_s), left))


def ensemble_from_directory(member_dir, num_members, timeout_s=3600.0,
                            poll_s=5.0, **kwargs):
    """Waits for `num_members` members (`wait_for_members`), then builds the
    ensemble with `FreeTicketsEnsemble.from_directory(member_dir, **kwargs)`.

    Only members 0..M-1 are loaded even if the folder holds more.

    Args:
        member_dir: str or path-like. Folder of member files.
        num_members: int >= 1.
        timeout_s: float >= 0. Seconds to wait at most.
        poll_s: float > 0. Seconds between checks.
        **kwargs: `output`, `custom_objects`, `name` of the ensemble.

    Returns:
        A `FreeTicketsEnsemble`.
    """
    from keras_freetickets import members as members_lib
    from keras_freetickets.ensemble import FreeTicketsEnsemble

    paths = wait_for_members(member_dir, num_members, timeout_s, poll_s)
    if len(members_lib.list_members(member_dir, allow_gaps=True)) == num_members:
        return FreeTicketsEnsemble.from_directory(member_dir, **kwargs)
    custom_objects = kwargs.pop("custom_objects", None)
    loaded = [members_lib.load_member(p, custom_objects=custom_objects)
              for p in paths]
    return FreeTicketsEnsemble(loaded, **kwargs)
