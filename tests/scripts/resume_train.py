"""Interrupted and resumed sparse training with BackupAndRestore.

Run by tests/test_resume.py in subprocesses with op determinism on:

    python resume_train.py full OUT.npz          # 4 epochs, uninterrupted
    python resume_train.py interrupt BACKUP_DIR  # dies after epoch 2 (exit 3)
    python resume_train.py resume BACKUP_DIR OUT.npz  # fresh model, resumes

Each phase trains two configurations, RigL with Adam and SET with SGD
momentum, each with its own backup folder under BACKUP_DIR. The data order
is fixed (`shuffle=False`) and mask updates fall inside every epoch.
"""

import os
import sys

import _training_common as _common

EPOCHS = 4
INTERRUPT_AFTER_EPOCH = 2  # epochs completed before the crash
BATCH = 32
SIZES = (20, 48, 24, 3)
EXIT_INTERRUPTED = 3
CONFIGS = ("gradient", "random")


class Interrupted(Exception):
    pass


def setup_process():
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)


def build(grow):
    import keras
    import keras_freetickets as kft

    model = _common.make_mlp(SIZES, seed=5)
    if grow == "gradient":
        inner = keras.optimizers.Adam(0.01)
    else:
        inner = keras.optimizers.SGD(0.05, momentum=0.9)
    opt = kft.SparseOptimizer(
        inner, sparsity=0.85, grow=grow, drop_fraction=0.4,
        update_interval=3, seed=11,
    )
    model.compile(optimizer=opt, loss=_common.loss_fn())
    return model, opt


def data():
    return _common.make_data(10 * BATCH, features=SIZES[0], classes=SIZES[-1],
                             seed=2)


def backup(backup_root, grow):
    import keras

    return keras.callbacks.BackupAndRestore(
        os.path.join(backup_root, grow), save_freq="epoch"
    )


def fit(model, callbacks):
    x, y = data()
    return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                     verbose=0, callbacks=callbacks)


def record(arrays, meta, grow, model, opt, history):
    import tensorflow as tf

    info = _common.record_optimizer(
        arrays, grow, tf.distribute.get_strategy(), model, opt
    )
    for j, variable in enumerate(opt.variables):
        arrays[f"{grow}/opt/{j}"] = variable.numpy()
    # Names, not paths: a slot's path depends on whether the optimizer was
    # built by its first step or by BackupAndRestore.
    info["opt_names"] = [v.name for v in opt.variables]
    info["epochs_run"] = list(history.epoch)
    meta[grow] = info


def run_full(out_path):
    arrays, meta = {}, {}
    for grow in CONFIGS:
        model, opt = build(grow)
        history = fit(model, [])
        record(arrays, meta, grow, model, opt, history)
    _common.save(out_path, arrays, meta)


def run_interrupt(backup_root):
    import keras

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == INTERRUPT_AFTER_EPOCH:
                raise Interrupted(f"planned crash after epoch {epoch + 1}")

    for grow in CONFIGS:
        model, _ = build(grow)
        try:
            # BackupAndRestore comes first, so it saves before the crash.
            fit(model, [backup(backup_root, grow), Crash()])
        except Interrupted:
            continue
        raise AssertionError("the planned crash did not happen")
    sys.exit(EXIT_INTERRUPTED)


def run_resume(backup_root, out_path):
    arrays, meta = {}, {}
    for grow in CONFIGS:
        model, opt = build(grow)
        history = fit(model, [backup(backup_root, grow)])
        record(arrays, meta, grow, model, opt, history)
    _common.save(out_path, arrays, meta)


def main(argv):
    setup_process()
    if argv[1] == "full":
        run_full(argv[2])
    elif argv[1] == "interrupt":
        run_interrupt(argv[2])
    elif argv[1] == "resume":
        run_resume(argv[2], argv[3])
    else:
        raise SystemExit(f"unknown phase {argv[1]!r}")


if __name__ == "__main__":
    main(sys.argv)
