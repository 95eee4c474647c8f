"""Training helpers shared by the example scripts (imported after the flag checks).

Strategies, the learning-rate steps, small callbacks that time epochs and
count mask updates, the dense baseline, FLOPs records and `run.json`.
"""

import json
import math
import os
import statistics
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

import keras_freetickets as kft
from common import ExampleError

# The pipelines are shuffled by tf.data; Keras warns that fit's default
# shuffle=True does nothing for a tf.data.Dataset (kft.train_dst_ensemble
# calls fit with that default).
warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed")


# --------------------------------------------------------------- strategies
def make_strategy(name, tpu=""):
    """The strategy named by `--strategy` (`kft.distributed.make_strategy`)."""
    from keras_freetickets import distributed

    try:
        return distributed.make_strategy(name, tpu=tpu or None)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        if name != "tpu":
            raise
        raise ExampleError(
            f"flag --strategy=tpu (--tpu={tpu!r}): no TPU found ({error})"
        ) from None


def prepare_model(model, strategy):
    """Readies a model for its strategy (`kft.distributed.prepare_model`)."""
    from keras_freetickets import distributed

    return distributed.prepare_model(model, strategy)


def is_tpu(strategy):
    return isinstance(strategy, tf.distribute.TPUStrategy)


def is_chief():
    """Whether this process writes the shared outputs (always, without TF_CONFIG)."""
    from keras_freetickets import distributed

    return distributed.is_chief()


def worker_dir(output_dir, name):
    """`output_dir/name` on the chief; a folder of this worker's own elsewhere.

    Under MultiWorkerMirroredStrategy every worker runs the callbacks that
    save members; each writes to its own folder so that no two processes
    write one file.
    """
    if is_chief():
        return os.path.join(output_dir, name)
    from keras_freetickets import distributed

    info = distributed.task_info()
    return os.path.join(output_dir, "workers",
                        f"{info['type']}_{info['index']}", name)


# ------------------------------------------------------------ learning rate
def lr_boundaries(epochs):
    """Epochs at which the rate drops x0.1: 15 and 23 of 30, scaled to `epochs`."""
    return [math.ceil(epochs * 15 / 30 - 1e-9), math.ceil(epochs * 23 / 30 - 1e-9)]


def step_decay(base_rate, epochs):
    boundaries = lr_boundaries(epochs)

    def schedule(epoch, rate=None):
        del rate
        return float(base_rate * 0.1 ** sum(epoch >= b for b in boundaries))

    return schedule


# ---------------------------------------------------------------- callbacks
class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)

    def median(self):
        return statistics.median(self.seconds) if self.seconds else None


class UpdateCounter(keras.callbacks.Callback):
    """Reads the optimizer's step and mask-update counters at given epochs' ends.

    Args:
        epochs: iterable of 0-based epochs to record, or None for the end of
            training only.
        on_record: optional callable receiving each record as it is made.
    """

    def __init__(self, epochs=None, on_record=None):
        super().__init__()
        self.epochs = None if epochs is None else set(epochs)
        self.on_record = on_record
        self.records = []

    def _record(self, epoch):
        optimizer = self.model.optimizer
        sparse = kft.sparsity_monitor.find_sparse_optimizer(optimizer)
        self.records.append({
            "epoch": epoch + 1,
            "steps": int(keras.ops.convert_to_numpy(optimizer.iterations)),
            "update_steps": int(
                keras.ops.convert_to_numpy(sparse.mask_updates)
            ),
        })
        if self.on_record is not None:
            self.on_record(dict(self.records[-1]))

    def on_epoch_end(self, epoch, logs=None):
        if self.epochs is not None and epoch in self.epochs:
            self._record(epoch)

    def on_train_end(self, logs=None):
        if self.epochs is None:
            self._record(int(self.params.get("epochs", 1)) - 1)


def sparse_optimizer(flags_values, seed, **kwargs):
    """A `SparseOptimizer` around SGD with momentum, from the flags."""
    return kft.SparseOptimizer(
        keras.optimizers.SGD(flags_values.learning_rate,
                             momentum=flags_values.momentum),
        sparsity=flags_values.sparsity,
        distribution=flags_values.distribution,
        grow=flags_values.grow,
        drop_fraction=flags_values.drop_fraction,
        update_interval=flags_values.update_interval,
        seed=seed,
        **kwargs,
    )


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------ dense baseline
def train_dense(build_model, data, epochs, flags_values, strategy, member_dir,
                verbose, log=print):
    """Trains the single dense baseline and saves it as `member_dir/member_0.kftm`.

    Returns its method record (see `method_record`).
    """
    log(f"[dense] a single dense model, {epochs} epochs (the baseline)")
    clear_members(member_dir)
    keras.backend.clear_session()
    keras.utils.set_random_seed(flags_values.seed)
    with strategy.scope():
        model = prepare_model(build_model(), strategy)
        model.compile(
            optimizer=keras.optimizers.SGD(flags_values.learning_rate,
                                           momentum=flags_values.momentum),
            loss=loss(), metrics=["accuracy"],
        )
    timer = EpochTimer()
    history = model.fit(
        data.train, epochs=epochs, validation_data=data.validation,
        shuffle=False,
        callbacks=[keras.callbacks.LearningRateScheduler(
            step_decay(flags_values.learning_rate, epochs)), timer],
        verbose=verbose,
    )
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    f_dense = float(kft.flops.dense_forward_flops(model))
    flops = kft.flops.training_flops(f_dense, f_dense, steps, 0,
                                     flags_values.batch_size)
    kft.save_member(model, kft.members.member_path(member_dir, 0), metadata={
        "method": "dense", "member_index": 0, "seed": flags_values.seed,
        "epochs": epochs,
    }, overwrite=True)
    return method_record(
        key="dense", label="dense single", kind="dense",
        member_dir=member_dir, f_dense=f_dense, f_sparse=f_dense,
        batch_size=flags_values.batch_size, epochs=epochs,
        members=[{"steps": steps, "update_steps": 0, "train_flops": flops}],
        prefix_train_flops=[flops], seconds_per_epoch=timer.median(),
        history=history.history,
    )


# ------------------------------------------------------------------ records
def method_record(key, label, kind, member_dir, f_dense, f_sparse, batch_size,
                  epochs, members, prefix_train_flops, seconds_per_epoch,
                  history=None, **extra):
    """The `run.json` entry of one trained method.

    `members[i]` holds member i's `steps`, `update_steps` and `train_flops`
    (for EDST: counted from the start of the run to its save);
    `prefix_train_flops[k - 1]` is the training cost of the ensemble of the
    first k members; `dense_run_flops` the cost of one dense run as long as
    one run of the method (an EDST run, a DST member).
    """
    longest = max(m["steps"] for m in members) if kind == "edst" else (
        members[0]["steps"])
    record = {
        "key": key, "label": label, "kind": kind,
        "member_dir": os.path.basename(os.path.normpath(member_dir)),
        "num_members": len(members), "f_dense": f_dense, "f_sparse": f_sparse,
        "batch_size": batch_size, "epochs": epochs, "members": members,
        "prefix_train_flops": prefix_train_flops,
        "train_flops": prefix_train_flops[-1],
        # What one dense run of the same number of steps costs.
        "dense_run_flops": kft.flops.training_flops(
            f_dense, f_dense, longest, 0, batch_size),
        "seconds_per_epoch": seconds_per_epoch,
    }
    if history:
        record["final_logs"] = {
            k: float(v[-1]) for k, v in history.items() if v
            and isinstance(v[-1], (int, float, np.floating))
        }
    record.update(extra)
    return record


def clear_members(member_dir, first=0, only=False):
    """Removes the files of members `first`, `first + 1`, ... of an earlier run.

    With `only=True`, those of member `first` alone.
    """
    if os.path.isdir(member_dir):
        for name in os.listdir(member_dir):
            stem = name.split(".")[0]
            if not (stem.startswith("member_") and stem[7:].isdigit()):
                continue
            index = int(stem[7:])
            if index == first or (index > first and not only):
                os.remove(os.path.join(member_dir, name))
    os.makedirs(member_dir, exist_ok=True)


def flag_values(flags_values, names):
    return {name: flags_values[name].value for name in names
            if name in flags_values}


def write_json(path, payload):
    """Writes JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=_jsonable)
        handle.write("\n")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def finish_run(script, tag, output_dir, flag_values_, recorded_flags, dataset,
               strategy, methods, started):
    """Writes run.json, then evaluates the run when --evaluate is set."""
    import evaluation

    write_json(os.path.join(output_dir, "run.json"), {
        "script": script,
        "flags": flag_values(flag_values_, recorded_flags),
        "data": dataset.summary(),
        "model": flag_values_.model,
        "replicas": strategy.num_replicas_in_sync,
        "methods": methods,
        "train_seconds": time.time() - started,
    })
    print(f"[{tag}] members and run.json written to {output_dir}")
    if flag_values_.evaluate:
        evaluation.evaluate_runs(
            [output_dir], output_dir, data_dir=flag_values_.data_dir,
            eval_examples=flag_values_.eval_examples,
            batch_size=flag_values_.batch_size, plots=flag_values_.plots,
        )
    print(f"[{tag}] done in {time.time() - started:.0f} s")
