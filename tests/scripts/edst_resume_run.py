"""Subprocess entry point for the EDST resume test (op determinism binds a process).

usage: edst_resume_run.py OUT_DIR MODE   where MODE is "full", "crash" or "resume".
"crash" raises at the end of epoch CRASH_EPOCH (after the backup and member saves),
"resume" finishes the crashed run from its BackupAndRestore directory.
Members go to OUT_DIR/members; the final kernels and masks to OUT_DIR/final.npz.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_freetickets as kft  # noqa: E402

CRASH_EPOCH = 4  # 0-based: inside the second refinement phase
EXIT_INTERRUPTED = 3


class Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == CRASH_EPOCH:
            raise SystemExit(EXIT_INTERRUPTED)


def main(out_dir, mode):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 16)).astype("float32")
    y = (x[:, :4].argmax(1)).astype("int64")
    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(48, activation="relu"),
        keras.layers.Dense(4),
    ])
    opt = kft.SparseOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
        grow="gradient", update_interval=7, seed=0,
    )
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
    edst = kft.EDSTCallback(
        num_members=3, exploration_epochs=2, refinement_epochs=2,
        member_dir=os.path.join(out_dir, "members"), quiet_steps=5,
    )
    callbacks = [
        edst,
        keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup")),
    ]
    if mode == "crash":
        callbacks.append(Crash())
    model.fit(x, y, batch_size=32, epochs=edst.total_epochs, shuffle=False,
              callbacks=callbacks, verbose=0)
    arrays = {f"kernel_{i}": v.numpy() for i, v in enumerate(model.weights)}
    for i, layer in enumerate(opt.sparse_layers):
        arrays[f"mask_{i}"] = layer.mask.numpy()
    arrays["iterations"] = np.array(int(opt.iterations.numpy()))
    np.savez(os.path.join(out_dir, "final.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
