"""tfmot gradual magnitude pruning on FMNIST-MLP v1 / FMNIST-CNN v1 (tf_keras).

The rows a Keras user would pick today for a sparse model: the protocol's
model built with `tf_keras` (Keras 2), wrapped in tfmot's
`prune_low_magnitude` with `PolynomialDecay(0 -> final_sparsity)` ending at
`end_fraction` of training (every kernel at the same sparsity; biases are
never pruned), trained with `UpdatePruningStep`, then `strip_pruning`. tfmot
works only with Keras 2, which cannot share a process with Keras 3, so
`benchmarks/fmnist_table.py` runs this script in a subprocess with
`TF_USE_LEGACY_KERAS=1`; it also runs on its own:

```
TF_CPP_MIN_LOG_LEVEL=2 TF_USE_LEGACY_KERAS=1 .venv/bin/python \
    benchmarks/tfmot_baseline.py --protocol=mlp --out=/tmp/tfmot
```

Needs the `tfmot` extra: `pip install --no-deps tensorflow-model-optimization==0.8.1
tf-keras==<your TF version>` (`--no-deps` beside `tensorflow-cpu`).

For each seed it writes the member's softmax probabilities on the test set and
the two out-of-distribution sets (`probs.npz`: arrays `test`, `digits`,
`noise` of shape (M, N, 10)), the stripped kernels (`kernels_<seed>.npz`), and
`result.json`: per member the median seconds per epoch, the number of steps,
the final kernel density, and the mean over training steps of the kernels'
mask density (read after every step), which is the member's training FLOPs
relative to a dense run under RigL's accounting (every kernel is pruned to the
same sparsity, and tfmot computes no dense gradient for growth). Metrics are
computed by the caller, with the same code as for the Keras 3 rows.
"""

import json
import os
import pathlib
import sys
import time

# tfmot needs Keras 2: `tf.keras` must resolve to tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_enum("protocol", "mlp", ["mlp", "cnn"], "Model of the protocol.")
flags.DEFINE_integer("epochs", 30, "Training epochs per member.")
flags.DEFINE_integer("train_examples", 55_000,
                     "Use the first N examples of the 55,000-image train split.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "One member per seed.")
flags.DEFINE_list("lr_boundaries", ["15", "23"],
                  "Epochs at which the learning rate is multiplied by 0.1.")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("l2", 5e-4, "L2 factor on every kernel.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("final_sparsity", 0.8, "PolynomialDecay's final sparsity.")
flags.DEFINE_float("end_fraction", 0.75,
                   "Pruning ends after this fraction of the training steps.")
flags.DEFINE_integer("frequency", 100, "Steps between tfmot mask updates.")
flags.DEFINE_string("out", None, "Folder for result.json, probs.npz, kernels.")
flags.mark_flag_as_required("out")


def build_model(protocol, tf_keras, l2):
    """The protocol's model (logits out) in tf_keras."""
    reg = tf_keras.regularizers.L2(l2)
    layers = tf_keras.layers
    if protocol == "mlp":
        return tf_keras.Sequential([
            tf_keras.Input((784,)),
            layers.Dense(300, activation="relu", kernel_regularizer=reg),
            layers.Dense(100, activation="relu", kernel_regularizer=reg),
            layers.Dense(10, kernel_regularizer=reg),
        ])
    return tf_keras.Sequential([
        tf_keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu",
                      kernel_regularizer=reg),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(128, activation="relu", kernel_regularizer=reg),
        layers.Dense(10, kernel_regularizer=reg),
    ])


def _softmax(logits):
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from keras_freetickets.contrib import datasets

    sparsity = tfmot.sparsity.keras
    from tensorflow_model_optimization.python.core.sparsity.keras import (
        pruning_wrapper,
    )

    flatten = FLAGS.protocol == "mlp"
    x_train, y_train = datasets.load_fashion_mnist("train", flatten=flatten)
    x_train, y_train = (x_train[: FLAGS.train_examples],
                        y_train[: FLAGS.train_examples])
    x_test, _ = datasets.load_fashion_mnist("test", flatten=flatten)
    x_digits = datasets.load_ood_digits(flatten=flatten)
    x_noise = datasets.load_ood_noise(flatten=flatten)
    steps_per_epoch = -(-len(x_train) // FLAGS.batch_size)
    total_steps = steps_per_epoch * FLAGS.epochs
    end_step = max(1, int(FLAGS.end_fraction * total_steps))
    boundaries = [int(b) for b in FLAGS.lr_boundaries]
    base_lr = FLAGS.learning_rate

    def lr_at(epoch, lr=None):
        del lr
        return base_lr * 0.1 ** sum(epoch >= b for b in boundaries)

    class Recorder(tf_keras.callbacks.Callback):
        """Epoch wall times and the kernels' mask density after every step."""

        def __init__(self):
            super().__init__()
            self.epoch_seconds = []
            self.step_density = []

        def on_train_begin(self, logs=None):
            self._masks = [
                mask for layer in self.model.layers
                if isinstance(layer, pruning_wrapper.PruneLowMagnitude)
                for _, mask, _ in layer.pruning_vars
            ]
            self._total = sum(int(np.prod(m.shape)) for m in self._masks)

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._start)
            print(f"[tfmot] epoch {epoch + 1}/{FLAGS.epochs} "
                  f"loss={logs.get('loss', float('nan')):.4f} "
                  f"{self.epoch_seconds[-1]:.2f}s", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            active = sum(float(tf.math.count_nonzero(m)) for m in self._masks)
            self.step_density.append(active / self._total)

    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    members, probs = [], {"test": [], "digits": [], "noise": []}
    for seed in (int(s) for s in FLAGS.seeds):
        tf_keras.backend.clear_session()
        tf_keras.utils.set_random_seed(seed)
        model = build_model(FLAGS.protocol, tf_keras, FLAGS.l2)
        schedule = sparsity.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=FLAGS.final_sparsity,
            begin_step=0, end_step=end_step, frequency=FLAGS.frequency,
        )
        pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
        pruned.compile(
            optimizer=tf_keras.optimizers.SGD(base_lr, momentum=FLAGS.momentum),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        train_ds = datasets.as_dataset(x_train, y_train, FLAGS.batch_size,
                                       shuffle=True, seed=seed)
        recorder = Recorder()
        pruned.fit(
            train_ds, epochs=FLAGS.epochs, verbose=0,
            callbacks=[sparsity.UpdatePruningStep(),
                       tf_keras.callbacks.LearningRateScheduler(lr_at),
                       recorder],
        )
        final = sparsity.strip_pruning(pruned)
        for name, x in (("test", x_test), ("digits", x_digits),
                        ("noise", x_noise)):
            probs[name].append(_softmax(final.predict(x, batch_size=1024,
                                                      verbose=0)))
        kernels = {
            f"w{i}/kernel": w.numpy()
            for i, w in enumerate(
                v for v in final.weights if len(v.shape) >= 2
            )
        }
        np.savez_compressed(out / f"kernels_{seed}.npz", **kernels)
        active = sum(int(np.count_nonzero(k)) for k in kernels.values())
        total = sum(k.size for k in kernels.values())
        members.append({
            "seed": seed,
            "steps": len(recorder.step_density),
            "epoch_seconds": recorder.epoch_seconds,
            "median_epoch_seconds": float(np.median(recorder.epoch_seconds)),
            "density": active / total,
            "mean_step_density": float(np.mean(recorder.step_density)),
            "kernels": f"kernels_{seed}.npz",
        })
    np.savez_compressed(out / "probs.npz",
                        **{k: np.stack(v) for k, v in probs.items()})
    result = {
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "tfmot": tfmot.__version__,
        "protocol": FLAGS.protocol,
        "epochs": FLAGS.epochs,
        "train_examples": len(x_train),
        "steps_per_epoch": steps_per_epoch,
        "pruning_end_step": end_step,
        "final_sparsity": FLAGS.final_sparsity,
        "frequency": FLAGS.frequency,
        "members": members,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"[tfmot] wrote {out}/result.json", flush=True)


if __name__ == "__main__":
    app.run(main)
