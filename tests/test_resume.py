"""Resuming sparse training: BackupAndRestore, `.keras` files, get_config.

The BackupAndRestore test needs op determinism, which binds a whole process,
so it trains in subprocesses (`tests/scripts/resume_train.py`): an
uninterrupted run, a run that crashes after epoch 2, and a new process that
resumes it. The final masks, weights and optimizer state must equal the
uninterrupted run's bit for bit.
"""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import subprocess_env
import tensorflow as tf

import keras_freetickets as kft
from keras_freetickets.sparsity_monitor import find_sparse_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "resume_train.py"
TIMEOUT_S = 300
EXIT_INTERRUPTED = 3  # resume_train.py's exit status after its planned crash
GROWS = ("gradient", "random")


# ------------------------------------------- BackupAndRestore (subprocess)
def run_phase(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env=subprocess_env(), capture_output=True, text=True,
        timeout=TIMEOUT_S, cwd=str(ROOT),
    )


def load_npz(path):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(str(data["__meta__"]))
    return arrays, meta


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    backup_root = tmp / "backup"
    full = run_phase("full", tmp / "full.npz")
    assert full.returncode == 0, full.stderr[-4000:]
    crash = run_phase("interrupt", backup_root)
    assert crash.returncode == EXIT_INTERRUPTED, crash.stderr[-4000:]
    saved = {}
    for grow in GROWS:
        folder = backup_root / grow
        saved[grow] = dict(
            files=sorted(p.name for p in folder.iterdir()),
            metadata=json.loads(
                (folder / "training_metadata.json").read_text()
            ),
        )
    resumed = run_phase("resume", backup_root, tmp / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return dict(
        full=load_npz(tmp / "full.npz"),
        resumed=load_npz(tmp / "resumed.npz"),
        saved=saved,
        backup_root=backup_root,
    )


@pytest.mark.parametrize("grow", GROWS)
def test_crash_left_a_backup_of_epoch_two(resume_runs, grow):
    saved = resume_runs["saved"][grow]
    assert "latest.weights.h5" in saved["files"]
    assert saved["metadata"]["epoch"] == 2
    # The resumed fit finished, so BackupAndRestore deleted its folder.
    assert not (resume_runs["backup_root"] / grow).exists()


@pytest.mark.parametrize("grow", GROWS)
def test_resumed_run_equals_uninterrupted_run(resume_runs, grow):
    full_arrays, full_meta = resume_runs["full"]
    res_arrays, res_meta = resume_runs["resumed"]
    full, res = full_meta[grow], res_meta[grow]
    assert full["epochs_run"] == [0, 1, 2, 3]
    assert res["epochs_run"] == [2, 3]  # it resumed, it did not start over
    assert full["problems"] == res["problems"] == []
    assert res["iterations"] == full["iterations"] == 40
    assert res["mask_updates"] == full["mask_updates"] == 13  # steps 3..39
    assert res["opt_names"] == full["opt_names"]
    keys = [k for k in full_arrays if k.startswith(f"{grow}/")]
    assert any("/mask/" in k for k in keys) and any("/opt/" in k for k in keys)
    assert sorted(keys) == sorted(
        k for k in res_arrays if k.startswith(f"{grow}/")
    )
    for key in keys:
        np.testing.assert_array_equal(res_arrays[key], full_arrays[key],
                                      err_msg=key)
    # The masks really moved during the run (so equality is not trivial).
    for i in range(len(full["paths"])):
        mask = full_arrays[f"{grow}/mask/{i}/0"]
        assert full_arrays[f"{grow}/ever/{i}/0"].sum() > mask.sum()


# ------------------------------------------- .keras save / load
def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(16, activation="relu", name="hidden_2"),
        keras.layers.Dense(4, name="logits"),
    ], name="mlp")


def data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = (x[:, :4] + 0.5 * x[:, 4:8]).argmax(1).astype("int64")
    return x, y


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("grow, inner", [
    ("gradient", lambda: keras.optimizers.Adam(0.01)),
    ("random", lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
])
def test_keras_file_round_trip_and_training_continues(tmp_path, grow, inner):
    x, y = data()
    model = mlp()
    opt = kft.SparseOptimizer(inner(), sparsity=0.8, grow=grow,
                              update_interval=4, seed=7)
    model.compile(optimizer=opt, loss=loss())
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert int(opt.mask_updates.numpy()) == 3  # steps 4, 8, 12 of 16
    path = tmp_path / "m.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    lopt = find_sparse_optimizer(loaded)
    assert isinstance(lopt, kft.SparseOptimizer) and lopt is not opt
    assert type(lopt.inner_optimizer) is type(opt.inner_optimizer)
    assert lopt.get_config() == opt.get_config()
    # A loaded Sequential's variable paths lack the model name, so the
    # masks are compared in order, each with its weight's own name.
    masks, lmasks = opt.get_masks(), lopt.get_masks()
    assert [k.split("/")[-2:] for k in masks] == [
        k.split("/")[-2:] for k in lmasks
    ]
    for mask, lmask in zip(masks.values(), lmasks.values()):
        np.testing.assert_array_equal(lmask, mask)
    for a, b in zip(opt.sparse_layers, lopt.sparse_layers):
        np.testing.assert_array_equal(b.ever_active.numpy(),
                                      a.ever_active.numpy())
        assert not np.array_equal(a.ever_active.numpy(), a.mask.numpy())
    assert int(lopt.mask_updates.numpy()) == int(opt.mask_updates.numpy())
    assert int(lopt.iterations.numpy()) == int(opt.iterations.numpy()) == 16
    # Optimizer variables (named after those paths too) match in order.
    assert len(lopt.variables) == len(opt.variables)
    for a, b in zip(opt.variables, lopt.variables):
        assert b.name.endswith(a.name.replace("mlp_", "", 1))
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.name)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy())

    # One more epoch (with two mask updates) from both gives the same model.
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(lopt.mask_updates.numpy()) == int(opt.mask_updates.numpy()) == 5
    for mask, lmask in zip(opt.get_masks().values(),
                           lopt.get_masks().values()):
        np.testing.assert_array_equal(lmask, mask)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-6)
    assert lopt.check_invariants() == []


# ------------------------------------------- get_config / from_config
@keras.saving.register_keras_serializable(package="kft_tests")
def step_down_schedule(step):
    """Drop fraction 0.4, then 0.1 from step 50 on (a traced callable)."""
    return tf.where(step < 50, 0.4, 0.1)


CONFIGS = [
    dict(sparsity=0.9, distribution="er", grow="random", drop_fraction=0.3,
         drop_fraction_schedule="cosine", update_interval=7,
         update_start_step=3, update_end_step=700, overrides={"hidden": 0.95},
         seed=4, name="sparse_adam"),
    dict(sparsity=0.5, distribution="uniform", grow="gradient",
         drop_fraction=1.0, drop_fraction_schedule="constant",
         update_interval=1, total_steps=400,
         overrides={"mlp/logits/kernel": 0.0, "hidden_2/kernel": 0.2},
         include_embeddings=True, seed=0),
    dict(sparsity=0.0, distribution="erk", drop_fraction=0.2,
         drop_fraction_schedule=step_down_schedule, update_interval=10),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["er_cosine", "uniform",
                                                  "callable_schedule"])
def test_get_config_from_config_round_trip(kwargs):
    opt = kft.SparseOptimizer(keras.optimizers.Adam(0.003), **kwargs)
    config = opt.get_config()
    json.dumps(keras.optimizers.serialize(opt))  # JSON-serializable
    for key, value in kwargs.items():
        if key == "drop_fraction_schedule" and callable(value):
            assert isinstance(config[key], dict)
        else:
            assert config[key] == value, key
    for restored in (
        kft.SparseOptimizer.from_config(config),
        keras.optimizers.deserialize(
            json.loads(json.dumps(keras.optimizers.serialize(opt)))
        ),
    ):
        assert isinstance(restored, kft.SparseOptimizer)
        assert restored.get_config() == config
        for key, value in kwargs.items():
            assert getattr(restored, key if key != "name" else "name") == value
        assert isinstance(restored.inner_optimizer, keras.optimizers.Adam)
        assert float(restored.learning_rate.numpy()) == pytest.approx(0.003)
        # The restored optimizer draws the same masks on the same model.
        assert masks_of(restored) == masks_of(
            kft.SparseOptimizer.from_config(config)
        )


def masks_of(opt):
    model = mlp()
    opt.build(model.trainable_variables)
    return {k: v.tobytes() for k, v in opt.get_masks().items()}


@pytest.mark.parametrize("key", [
    "hidden",
    "hidden/kernel",
    "mlp/hidden/kernel",
])
def test_keras_file_round_trip_with_overrides(tmp_path, key):
    x, y = data(64)
    model = mlp()
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.5,
                              overrides={key: 0.0}, update_interval=2)
    model.compile(optimizer=opt, loss=loss())
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert opt.get_masks()[model.layers[0].kernel.path].min() == 1
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    lopt = find_sparse_optimizer(loaded)
    assert lopt.overrides == {key: 0.0}
    assert loaded.layers[0].kernel.path in lopt.get_masks()
    assert lopt.get_masks()[loaded.layers[0].kernel.path].min() == 1
    for mask, lmask in zip(opt.get_masks().values(),
                           lopt.get_masks().values()):
        np.testing.assert_array_equal(lmask, mask)
