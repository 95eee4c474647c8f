"""`SparsityMonitor` callback and `sparsity_summary`."""

import os

import keras
import numpy as np

from keras_freetickets._config import ArgumentsConfig
from keras_freetickets.sparse_optimizer import SparseOptimizer


def find_sparse_optimizer(model_or_optimizer):
    """Returns the SparseOptimizer of a model (looking through loss scaling)."""
    opt = model_or_optimizer
    if isinstance(opt, keras.Model):
        opt = getattr(opt, "optimizer", None)
    while opt is not None and not isinstance(opt, SparseOptimizer):
        opt = getattr(opt, "inner_optimizer", None)
    if opt is None:
        raise ValueError(
            "Expected a model compiled with a SparseOptimizer, or a "
            f"SparseOptimizer. Received: {model_or_optimizer!r}"
        )
    return opt


@keras.saving.register_keras_serializable(package="keras_freetickets")
class SparsityMonitor(ArgumentsConfig, keras.callbacks.Callback):
    """Logs the masks' density and rewiring, and checks their invariants.

    At the end of every epoch it adds to the logs (and so to `History`):
    `kft/density` (active fraction over all prunable weights),
    `kft/mask_changed` (mean over layers of the fraction of active weights
    that the last mask update activated), `kft/ever_active` (fraction of
    prunable weights that were ever active: the in-time
    over-parameterization rate), and the same three per layer as
    `kft/<variable path>/<name>`. With `log_dir` it also writes them to
    TensorBoard. Once an epoch it checks that every sparse layer holds exactly
    its target count of active weights and is exactly zero outside its mask;
    a violation raises `RuntimeError` (or warns, with `strict=False`).

    Args:
        log_dir: str or None. TensorBoard log directory (a `sparsity`
            subdirectory is written).
        per_layer: bool. Also log the per-layer values.
        strict: bool. Raise on a violated invariant instead of warning.

    Example:

    ```python
    model.fit(x, y, epochs=2, callbacks=[kft.SparsityMonitor(log_dir="logs")])
    ```
    """

    CONFIG_ARGUMENTS = ("log_dir", "per_layer", "strict")

    def __init__(self, log_dir=None, per_layer=True, strict=True):
        super().__init__()
        self.log_dir = log_dir
        self.per_layer = bool(per_layer)
        self.strict = bool(strict)
        self._writer = None

    def _values(self):
        opt = find_sparse_optimizer(self.model)
        stats = opt.layer_stats()
        overall = opt.overall_stats(stats)
        values = {
            "kft/density": overall["density"],
            "kft/mask_changed": float(
                np.mean([s["mask_changed"] for s in stats])
            ),
            "kft/ever_active": overall["ever_active"],
        }
        if self.per_layer:
            for s in stats:
                for key in ("density", "mask_changed", "ever_active"):
                    values[f"kft/{s['path']}/{key}"] = float(s[key])
        return opt, values

    def on_epoch_end(self, epoch, logs=None):
        opt, values = self._values()
        problems = opt.check_invariants()
        if problems:
            message = "Sparse mask invariants violated: " + "; ".join(problems)
            if self.strict:
                raise RuntimeError(message)
            import warnings

            warnings.warn(message)
        if logs is not None:
            logs.update(values)
        if self.log_dir:
            self._write(epoch, values)

    def _write(self, epoch, values):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "sparsity")
            )
        # tf.summary.scalar needs the tensorboard package, which
        # tensorflow-cpu does not install; a raw summary tagged for the
        # scalars plugin reads back the same in TensorBoard.
        metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
                plugin_name="scalars"
            )
        )
        with self._writer.as_default():
            for key, value in values.items():
                tf.summary.write(
                    key, tf.constant(value, tf.float32), step=epoch,
                    metadata=metadata,
                )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None



def sparsity_summary(model_or_optimizer, print_fn=print):
    """Prints a per-layer table: weight, shape, density, active / total.

    Args:
        model_or_optimizer: a model compiled with a built `SparseOptimizer`,
            or the optimizer itself.
        print_fn: callable used to print the table (`None` to only return it).

    Returns:
        The table as a string.
    """
    opt = find_sparse_optimizer(model_or_optimizer)
    stats = opt.layer_stats()
    rows = [("weight", "shape", "density", "active / total", "ever active")]
    for s in stats:
        rows.append((
            s["path"], "x".join(str(d) for d in s["shape"]),
            f"{s['density']:.4f}", f"{s['active']} / {s['total']}",
            f"{s['ever_active']:.4f}",
        ))
    overall = opt.overall_stats(stats)
    rows.append(("total", "", f"{overall['density']:.4f}",
                 f"{overall['active']} / {overall['total']}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    table = "\n".join(lines)
    if print_fn is not None:
        print_fn(table)
    return table
