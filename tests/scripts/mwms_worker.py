"""One worker of a MultiWorkerMirroredStrategy run of a sparse MLP (or the
1-worker reference when `TF_CONFIG` is not set).

Run by tests/test_distributed_multiworker.py and benchmarks/multiworker.py:

    python mwms_worker.py CONFIG.json

CONFIG holds: `out_dir`; `grows` (list of "random" / "gradient", trained one
after the other in this process); `edst_dir` (then an EDST run follows:
2 members, 1 exploration + 2 x 1 refinement epochs, RigL, saved into that
folder by every worker); `epochs`, `examples`, `global_batch`,
`update_interval`, `sizes`, `seed`; optional `backup_base` (per-worker
kft.BackupAndRestore), `pause_at_step` and `pause_rank` (that worker writes
`paused_<rank>` in `out_dir` at that global step and sleeps, to be killed),
`checkpoint` (a ModelCheckpoint path, formatted with `grow` and `rank`,
written by the chief only), `probe_guards` (try the settings that
multi-worker training refuses, then train a MultiWorkerModelMixin model),
`jit_compile`, `steps_per_execution`, `time_steps` (record per-step times).

Every run uses the same data (no shuffle), global batch, initial weights
(from numpy, seeded) and optimizer seed, so a 2-worker run and the 1-worker
reference differ only in how a global batch's gradient is summed. Writes
`<run>_<rank>.npz` (masks, weights, per-step times) and `<run>_<rank>.json`
(history, evaluate, counters) into `out_dir`; a Python error exits with 1.
"""

import json
import os
import sys
import time

import numpy as np


def make_data(n, features, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes)).astype("float32")
    y = (x @ w).argmax(1).astype("int64")
    return x, y


def build_model(keras, sizes, seed):
    """A ReLU MLP with fixed layer names and numpy-seeded initial weights."""
    layers = [keras.Input((sizes[0],))]
    for i, width in enumerate(sizes[1:-1]):
        layers.append(
            keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")
        )
    layers.append(keras.layers.Dense(sizes[-1], name="logits"))
    model = keras.Sequential(layers, name="mlp")
    rng = np.random.default_rng(seed)
    model.set_weights([
        (rng.normal(size=w.shape) * np.sqrt(2.0 / w.shape[0])).astype("float32")
        if len(w.shape) == 2 else np.zeros(w.shape, "float32")
        for w in model.get_weights()
    ])
    return model


def main(config_path):
    with open(config_path) as f:
        config = json.load(f)
    out_dir = config["out_dir"]
    import keras
    import tensorflow as tf

    import keras_freetickets as kft
    from keras_freetickets import distributed

    info = distributed.task_info()
    rank = info["worker_rank"]
    multi = info["num_workers"] > 1
    strategy = distributed.make_strategy("multi_worker" if multi else "default")

    x, y = make_data(config["examples"], config["sizes"][0],
                     config["sizes"][-1])
    batch = config["global_batch"]
    # The last batch may be partial (and split unevenly across workers).
    steps_per_epoch = -(-len(x) // batch)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    pause_at = config.get("pause_at_step")

    class Recorder(keras.callbacks.Callback):
        """Per-step wall times; optionally pauses this worker to be killed."""

        def __init__(self):
            super().__init__()
            self.times = []
            self._t = None

        def on_train_batch_begin(self, batch_index, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            if config.get("time_steps"):
                self.times.append(time.perf_counter() - self._t)
            step = int(self.model.optimizer.iterations.numpy())
            if pause_at is not None and step == pause_at and (
                rank == config.get("pause_rank")
            ):
                with open(os.path.join(out_dir, f"paused_{rank}"), "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)  # killed by the test long before this ends

    runs = [(grow, grow) for grow in config["grows"]]
    if config.get("edst_dir"):
        runs.append(("edst", "gradient"))
    for name, grow in runs:
        with strategy.scope():
            model = distributed.prepare_model(
                build_model(keras, config["sizes"], config["seed"]), strategy
            )
            opt = kft.SparseOptimizer(
                keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
                grow=grow, drop_fraction=0.3,
                update_interval=config["update_interval"], seed=3,
                # Built in the strategy scope before fit: EDST's state must
                # be there from construction.
                global_exploration=name == "edst",
            )
            model.compile(
                optimizer=opt,
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                metrics=["accuracy"],
                jit_compile=config.get("jit_compile", False),
                steps_per_execution=config.get("steps_per_execution", 1),
            )
        recorder = Recorder()
        callbacks = [recorder]
        epochs = config["epochs"]
        if name == "edst":
            # Members 0 and 1 after epochs 2 and 3; a global exploration
            # (random regrowth, q = 0.8) starts epoch 3.
            edst = kft.EDSTCallback(
                num_members=2, exploration_epochs=1, refinement_epochs=1,
                member_dir=config["edst_dir"], preset="official",
            )
            callbacks.insert(0, edst)
            epochs = edst.total_epochs
        if config.get("backup_base"):
            callbacks.insert(0, kft.BackupAndRestore(
                distributed.worker_backup_dir(config["backup_base"])
            ))
        if config.get("checkpoint"):
            callbacks.append(distributed.ChiefOnly(
                keras.callbacks.ModelCheckpoint(
                    config["checkpoint"].format(grow=name, rank=rank)
                )
            ))
        start = time.perf_counter()
        history = model.fit(train, epochs=epochs, verbose=0,
                            callbacks=callbacks)
        fit_seconds = time.perf_counter() - start
        evaluation = model.evaluate(train.take(8), verbose=0,
                                    return_dict=True)
        arrays = {"predict": model.predict(x[:200], batch_size=batch,
                                           verbose=0)}
        for layer in opt.sparse_layers:
            arrays[f"mask/{layer.path}"] = layer.mask.numpy()
        for weight in model.weights:
            arrays[f"weight/{weight.path}"] = weight.numpy()
        arrays["step_times"] = np.asarray(recorder.times, "float64")
        np.savez(os.path.join(out_dir, f"{name}_{rank}.npz"), **arrays)
        meta = {
            "rank": rank, "num_workers": info["num_workers"],
            "replicas": strategy.num_replicas_in_sync,
            "history": {k: [float(v) for v in vs]
                        for k, vs in history.history.items()},
            "evaluate": {k: float(v) for k, v in evaluation.items()},
            "iterations": int(opt.iterations.numpy()),
            "mask_updates": int(opt.mask_updates.numpy()),
            "problems": opt.check_invariants(),
            "steps_per_epoch": steps_per_epoch,
            "fit_seconds": fit_seconds,
            "update_interval": config["update_interval"],
        }
        tmp = os.path.join(out_dir, f".{name}_{rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(out_dir, f"{name}_{rank}.json"))
    if config.get("probe_guards"):
        probe_guards(config, keras, strategy, distributed, train, rank)


def probe_guards(config, keras, strategy, distributed, train, rank):
    """Tries the settings that multi-worker training refuses (their errors
    go to `guards_<rank>.json`, None where training ran), then trains a
    model that uses `MultiWorkerModelMixin` (weights to `mixin_<rank>.npz`).
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    errors = {}
    for key, value in (("steps_per_execution", 2), ("jit_compile", True)):
        with strategy.scope():
            model = distributed.prepare_model(
                build_model(keras, config["sizes"], config["seed"]), strategy
            )
            model.compile(optimizer="sgd", loss=loss, **{key: value})
        try:
            model.fit(train.take(4), epochs=1, verbose=0)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    with open(os.path.join(config["out_dir"], f"guards_{rank}.json"),
              "w") as f:
        json.dump(errors, f)

    class MixinModel(distributed.MultiWorkerModelMixin, keras.Model):
        pass

    with strategy.scope():
        plain = build_model(keras, config["sizes"], config["seed"])
        model = MixinModel(plain.inputs, plain.outputs)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss,
                      metrics=["accuracy"])
    history = model.fit(train.take(16), epochs=2, verbose=0)
    evaluation = model.evaluate(train.take(4), verbose=0)
    np.savez(
        os.path.join(config["out_dir"], f"mixin_{rank}.npz"),
        loss=np.asarray(history.history["loss"]),
        evaluate=np.asarray(evaluation),
        **{f"weight_{i}": w for i, w in enumerate(model.get_weights())},
    )


if __name__ == "__main__":
    main(sys.argv[1])
