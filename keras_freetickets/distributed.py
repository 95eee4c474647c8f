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

import importlib
import os
import re

import keras

from keras_freetickets import _keras_compat as compat
from keras_freetickets._multiworker import MultiWorkerModelMixin
from keras_freetickets._multiworker import is_multi_worker
from keras_freetickets._multiworker import prepare_model
from keras_freetickets._tf_config import read_tf_config
from keras_freetickets._validation import check_bool

__all__ = [
    "STRATEGY_NAMES", "TPU_REJECTED_OPS", "task_info", "is_chief",
    "member_index_from_cluster", "worker_backup_dir", "make_strategy",
    "is_multi_worker", "MultiWorkerModelMixin", "prepare_model",
    "tpu_compatibility_problems", "ChiefOnly",
]

STRATEGY_NAMES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


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
    if compat.needs_symbolic_build(model):
        compat.symbolic_build(model, data)
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
        chief = check_bool("chief", chief, allow_none=True)
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
# Old names of helpers that now live with the members and the ensemble
# (`keras_freetickets.members.wait_for_members`,
# `keras_freetickets.ensemble.ensemble_from_directory`), resolved on first
# use so that this module depends on neither.
_MOVED = {
    "wait_for_members": "keras_freetickets.members",
    "ensemble_from_directory": "keras_freetickets.ensemble",
}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MOVED))
