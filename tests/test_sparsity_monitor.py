"""Tests of SparsityMonitor, sparsity_summary and find_sparse_optimizer."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets import distributions
from keras_freetickets.sparsity_monitor import find_sparse_optimizer

EPOCHS, STEPS_PER_EPOCH, BATCH = 4, 8, 16


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(48, activation="relu"),
        keras.layers.Dense(24, activation="relu"),
        keras.layers.Dense(4),
    ])


def data(n=STEPS_PER_EPOCH * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    return x, x[:, :4].argmax(1).astype("int64")


def sparse_model(sparsity=0.8, update_interval=5, **kwargs):
    model = mlp()
    opt = kft.SparseOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.9), sparsity=sparsity,
        update_interval=update_interval, **kwargs,
    )
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, opt


def expected_counts(model, sparsity, distribution="erk"):
    """{path: (target active, total)}, from the distribution functions."""
    shapes = {v.path: tuple(v.shape) for v in model.trainable_variables
              if v.name == "kernel"}
    counts = distributions.resolve_counts(
        shapes,
        distributions.compute_sparsities(shapes, sparsity, distribution),
    )
    return {p: (counts[p], int(np.prod(s))) for p, s in shapes.items()}


@pytest.fixture
def trained():
    """A sparse MLP fitted for EPOCHS epochs with a SparsityMonitor."""
    model, opt = sparse_model()
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0, callbacks=[kft.SparsityMonitor()])
    return model, opt, history.history


# ------------------------------------------------------------------ History
def test_history_has_global_and_per_layer_keys(trained):
    model, opt, logs = trained
    paths = [v.path for v in model.trainable_variables if v.name == "kernel"]
    assert len(paths) == 3
    expected = {"kft/density", "kft/mask_changed", "kft/ever_active"}
    for path in paths:
        expected |= {f"kft/{path}/{k}"
                     for k in ("density", "mask_changed", "ever_active")}
    assert expected <= set(logs)
    for path in [v.path for v in model.trainable_variables
                 if v.name == "bias"]:
        assert not any(key.startswith(f"kft/{path}") for key in logs)
    assert all(len(logs[key]) == EPOCHS for key in expected)


def test_density_equals_the_erk_target(trained):
    model, opt, logs = trained
    counts = expected_counts(model, 0.8)
    active = sum(a for a, _ in counts.values())
    total = sum(t for _, t in counts.values())
    assert logs["kft/density"] == pytest.approx([active / total] * EPOCHS,
                                                abs=1e-12)
    assert abs(active / total - 0.2) < 0.01
    for path, (a, t) in counts.items():
        assert logs[f"kft/{path}/density"] == pytest.approx(
            [a / t] * EPOCHS, abs=1e-12
        )


def test_ever_active_grows_and_exceeds_density(trained):
    model, opt, logs = trained
    ever = logs["kft/ever_active"]
    assert np.all(np.diff(ever) >= 0)
    assert ever[-1] > ever[0] > logs["kft/density"][0]
    # Matches the optimizer's own record.
    records = [layer.ever_active.numpy() for layer in opt.sparse_layers]
    dense = [v for v in model.trainable_variables if v.name == "kernel"
             and v.path not in {layer.path for layer in opt.sparse_layers}]
    total = sum(r.size for r in records) + sum(
        int(np.prod(v.shape)) for v in dense
    )
    ever_count = sum(int(r.sum()) for r in records) + sum(
        int(np.prod(v.shape)) for v in dense
    )
    assert ever[-1] == pytest.approx(ever_count / total)
    for layer in opt.sparse_layers:
        series = logs[f"kft/{layer.path}/ever_active"]
        assert np.all(np.diff(series) >= 0)


def test_mask_changed_is_reported_after_updates(trained):
    model, opt, logs = trained
    assert int(opt.mask_updates.numpy()) > 0
    for layer in opt.sparse_layers:
        series = logs[f"kft/{layer.path}/mask_changed"]
        assert all(0.0 <= value <= 1.0 for value in series)
        assert series[-1] == pytest.approx(float(layer.changed.numpy()))
        assert max(series) > 0.0
    assert 0.0 < logs["kft/mask_changed"][-1] <= 1.0


def test_per_layer_false_logs_only_global_keys():
    model, _ = sparse_model()
    x, y = data()
    logs = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                     callbacks=[kft.SparsityMonitor(per_layer=False)]).history
    keys = {k for k in logs if k.startswith("kft/")}
    assert keys == {"kft/density", "kft/mask_changed", "kft/ever_active"}


# -------------------------------------------------------------- TensorBoard
def read_scalars(folder):
    """{tag: {step: value}} from every event file under `folder`."""
    scalars = {}
    files = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    for path in files:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = float(value.simple_value)
                scalars.setdefault(value.tag, {})[event.step] = number
    return files, scalars


def test_tensorboard_event_files_hold_the_logged_values(tmp_path):
    model, opt = sparse_model()
    x, y = data()
    log_dir = str(tmp_path / "logs")
    logs = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
                     shuffle=False,
                     callbacks=[kft.SparsityMonitor(log_dir=log_dir)]).history
    files, scalars = read_scalars(os.path.join(log_dir, "sparsity"))
    assert files
    kft_keys = {k for k in logs if k.startswith("kft/")}
    assert len(kft_keys) == 3 + 3 * 3
    assert kft_keys <= set(scalars)
    for key in kft_keys:
        assert sorted(scalars[key]) == [0, 1, 2]
        for step in range(3):
            assert scalars[key][step] == pytest.approx(logs[key][step],
                                                       rel=1e-6)


# --------------------------------------------------------------- invariants
def test_nonzero_outside_mask_raises(trained):
    model, opt, _ = trained
    layer = opt.sparse_layers[0]
    kernel = layer.variable.numpy()
    outside = np.argwhere(~layer.mask.numpy())[0]
    kernel[tuple(outside)] = 0.5
    layer.variable.assign(kernel)
    monitor = kft.SparsityMonitor()
    monitor.set_model(model)
    with pytest.raises(RuntimeError, match="nonzero weights outside the mask"):
        monitor.on_epoch_end(0, {})
    assert layer.path in str(opt.check_invariants())


def test_wrong_active_count_raises(trained):
    model, opt, _ = trained
    layer = opt.sparse_layers[-1]
    mask = layer.mask.numpy()
    mask[tuple(np.argwhere(~mask)[0])] = True  # one weight too many
    layer.mask.assign(mask)
    monitor = kft.SparsityMonitor()
    monitor.set_model(model)
    with pytest.raises(RuntimeError,
                       match=f"{layer.num_active + 1} active weights"):
        monitor.on_epoch_end(0, {})


def test_not_strict_warns_and_still_logs(trained):
    model, opt, _ = trained
    layer = opt.sparse_layers[0]
    kernel = layer.variable.numpy()
    kernel[~layer.mask.numpy()] = 1.0
    layer.variable.assign(kernel)
    monitor = kft.SparsityMonitor(strict=False)
    monitor.set_model(model)
    logs = {}
    with pytest.warns(UserWarning, match="invariants violated"):
        monitor.on_epoch_end(0, logs)
    assert "kft/density" in logs


def test_healthy_model_passes_the_check(trained):
    model, opt, _ = trained
    monitor = kft.SparsityMonitor()
    monitor.set_model(model)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs["kft/density"] > 0


def test_monitor_get_config(tmp_path):
    monitor = kft.SparsityMonitor(log_dir=str(tmp_path), per_layer=False,
                                  strict=False)
    clone = kft.SparsityMonitor(**monitor.get_config())
    assert (clone.log_dir, clone.per_layer, clone.strict) == (
        str(tmp_path), False, False
    )


def test_monitor_serialization_round_trip(tmp_path):
    monitor = kft.SparsityMonitor(log_dir=str(tmp_path), per_layer=False,
                                  strict=False)
    config = keras.saving.serialize_keras_object(monitor)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, kft.SparsityMonitor)
    assert clone.get_config() == monitor.get_config()


# -------------------------------------------------------- sparsity_summary
def test_sparsity_summary_lists_every_prunable_weight(trained):
    model, opt, _ = trained
    printed = []
    table = kft.sparsity_summary(model, print_fn=printed.append)
    assert printed == [table]
    lines = table.splitlines()
    assert "active / total" in lines[0]
    masks = opt.get_masks()
    assert len(masks) == 3
    for path, mask in masks.items():
        rows = [line for line in lines if line.split()[0] == path]
        assert len(rows) == 1, path
        assert f"{int(mask.sum())} / {mask.size}" in rows[0]
        assert "x".join(map(str, mask.shape)) in rows[0]
    total_row = [line for line in lines if line.split()[0] == "total"]
    active = sum(int(m.sum()) for m in masks.values())
    assert f"{active} / {sum(m.size for m in masks.values())}" in total_row[0]
    # The optimizer itself works too; print_fn=None only returns the table.
    assert kft.sparsity_summary(opt, print_fn=None) == table


# --------------------------------------------------- find_sparse_optimizer
def test_find_sparse_optimizer_looks_through_loss_scaling():
    _, opt = sparse_model()
    assert find_sparse_optimizer(opt) is opt
    scaled = keras.optimizers.LossScaleOptimizer(opt)
    assert find_sparse_optimizer(scaled) is opt


def test_model_without_sparse_optimizer_is_an_error():
    model = mlp()
    with pytest.raises(ValueError, match="SparseOptimizer"):
        find_sparse_optimizer(model)  # not compiled
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="SparseOptimizer"):
        find_sparse_optimizer(model)
    with pytest.raises(ValueError, match="SparseOptimizer"):
        kft.sparsity_summary(model, print_fn=None)
    x, y = data(32)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.raises(ValueError, match="SparseOptimizer"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kft.SparsityMonitor()])
