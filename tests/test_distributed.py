"""SparseOptimizer under tf.distribute, XLA and mixed precision, end to end.

Splitting the CPU into logical devices and setting a mixed-precision policy
bind the whole process, so each configuration trains in a subprocess
(`tests/scripts/distributed_train.py`) with a hard timeout; the tests read
the masks and weights it wrote.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "distributed_train.py"
TIMEOUT_S = 420
# Mirrors the script's schedule: 200 steps, an update every 10 from step 10.
STEPS, INTERVAL = 200, 10


def run_script(case, out_path):
    """Runs the training script for `case`; returns (arrays, meta)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), case, str(out_path)],
        env=subprocess_env(), capture_output=True, text=True,
        timeout=TIMEOUT_S, cwd=str(ROOT),
    )
    assert result.returncode == 0, (
        f"{SCRIPT.name} {case} failed:\n{result.stderr[-4000:]}"
    )
    with np.load(out_path) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(str(data["__meta__"]))
    return arrays, meta


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    return run_script("replicas", tmp_path_factory.mktemp("dist") / "r.npz")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return run_script("mixed", tmp_path_factory.mktemp("mixed") / "m.npz")


def expected_updates(steps, interval, start=None):
    start = interval if start is None else start
    return sum(
        1 for s in range(steps) if s >= start and (s - start) % interval == 0
    )


def per_layer(arrays, meta, prefix, name, replica=0):
    return [
        arrays[f"{prefix}/{name}/{i}/{replica}"]
        for i in range(len(meta[prefix]["paths"]))
    ]


def assert_exact_sparsity(arrays, meta, prefix):
    info = meta[prefix]
    assert info["problems"] == []
    assert info["paths"], "no sparse layer: the test would check nothing"
    for replica in range(info["replicas"]):
        masks = per_layer(arrays, meta, prefix, "mask", replica)
        kernels = per_layer(arrays, meta, prefix, "kernel", replica)
        for path, target, mask, kernel in zip(
            info["paths"], info["num_active"], masks, kernels
        ):
            assert mask.dtype == bool and mask.shape == kernel.shape
            assert int(mask.sum()) == target, (prefix, path, replica)
            outside = np.count_nonzero(kernel[~mask])
            assert outside == 0, (prefix, path, replica)


# ------------------------------------------------------- MirroredStrategy fit
@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_fit_masks_and_kernels_identical_on_both_replicas(replicas, grow):
    arrays, meta = replicas
    prefix = f"fit_{grow}_two"
    assert meta[prefix]["replicas"] == 2
    assert meta["devices"] == ["/device:CPU:0", "/device:CPU:1"]
    for name in ("mask", "kernel", "ever"):
        for a, b in zip(per_layer(arrays, meta, prefix, name, 0),
                        per_layer(arrays, meta, prefix, name, 1)):
            np.testing.assert_array_equal(a, b, err_msg=f"{prefix} {name}")


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_fit_one_and_two_devices_agree(replicas, grow):
    arrays, meta = replicas
    two, one = meta[f"fit_{grow}_two"], meta[f"fit_{grow}_one"]
    assert one["replicas"] == 1
    assert two["paths"] == one["paths"]
    assert two["iterations"] == one["iterations"] == STEPS
    assert two["mask_updates"] == one["mask_updates"] == expected_updates(
        STEPS, INTERVAL
    )
    masks_two = per_layer(arrays, meta, f"fit_{grow}_two", "mask")
    masks_one = per_layer(arrays, meta, f"fit_{grow}_one", "mask")
    for path, a, b in zip(two["paths"], masks_two, masks_one):
        agree = np.count_nonzero(a & b) / np.count_nonzero(a)
        assert agree >= 0.99, f"{grow} {path}: {agree:.4f} of active agree"


@pytest.mark.parametrize("grow", ["gradient", "random"])
@pytest.mark.parametrize("devices", ["one", "two"])
def test_fit_exact_counts_zeros_and_rewiring(replicas, grow, devices):
    arrays, meta = replicas
    prefix = f"fit_{grow}_{devices}"
    assert_exact_sparsity(arrays, meta, prefix)
    # The masks moved: more weights were ever active than are active now.
    for mask, ever in zip(per_layer(arrays, meta, prefix, "mask"),
                          per_layer(arrays, meta, prefix, "ever")):
        assert np.all(ever[mask])
        assert ever.sum() > mask.sum()


# ---------------------------------------------------------------- custom loop
def test_custom_loop_masks_identical_on_replicas(replicas):
    arrays, meta = replicas
    info = meta["loop_two"]
    assert info["replicas"] == 2
    assert info["iterations"] == STEPS
    assert info["mask_updates"] == expected_updates(STEPS, INTERVAL)
    assert_exact_sparsity(arrays, meta, "loop_two")
    for name in ("mask", "kernel", "ever"):
        for a, b in zip(per_layer(arrays, meta, "loop_two", name, 0),
                        per_layer(arrays, meta, "loop_two", name, 1)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # Same global batches as `fit`: the masks match the fit run's.
    for a, b in zip(per_layer(arrays, meta, "loop_two", "mask"),
                    per_layer(arrays, meta, "fit_gradient_two", "mask")):
        assert np.count_nonzero(a & b) / np.count_nonzero(a) >= 0.99


# ------------------------------------------------------------------------ XLA
def test_jit_with_steps_per_execution_keeps_exact_masks(replicas):
    arrays, meta = replicas
    info = meta["jit_one"]
    assert info["jit_compile"] is True
    assert info["iterations"] == STEPS
    assert info["mask_updates"] == expected_updates(STEPS, INTERVAL)
    assert_exact_sparsity(arrays, meta, "jit_one")
    for mask, ever in zip(per_layer(arrays, meta, "jit_one", "mask"),
                          per_layer(arrays, meta, "jit_one", "ever")):
        assert ever.sum() > mask.sum()


# ------------------------------------------------------------ mixed precision
def test_mixed_precision_keeps_invariants(mixed):
    arrays, meta = mixed
    info = meta["mixed"]
    assert info["wrapper"] == "LossScaleOptimizer"
    assert info["found_is_opt"] is True
    assert info["compute_dtype"] == "float16"
    assert set(info["kernel_dtypes"]) == {"float32"}
    assert info["iterations"] > 0
    # Updates follow the inner optimizer's step count (skipped steps of the
    # loss scaling do not count).
    assert info["mask_updates"] == expected_updates(info["iterations"],
                                                    INTERVAL)
    assert info["last_loss"] < info["first_loss"]
    assert_exact_sparsity(arrays, meta, "mixed")
    for mask, ever in zip(per_layer(arrays, meta, "mixed", "mask"),
                          per_layer(arrays, meta, "mixed", "ever")):
        assert ever.sum() > mask.sum()
