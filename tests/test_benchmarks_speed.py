"""Smoke test of benchmarks/speed.py: a `--quick` run writes its report.

Checks the structure and types of speed.json and that speed.md holds the
table, not the (machine-dependent) figures themselves. Marked slow like the
other benchmark smoke runs (tests/test_end_to_end_bench.py): it trains in a
subprocess for ~30 s, and the default run stays under 20 minutes.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"

TOP_KEYS = {
    "benchmark": str, "protocols": list, "machine": str, "cpu_count": int,
    "date": str, "versions": dict, "library_path": str, "command": str,
    "settings": dict, "targets": dict, "results": list,
    "wall_seconds": float,
}
RESULT_KEYS = {
    "model": str, "protocol": str, "jit_compile": bool, "seconds": float,
    "step_ms": dict, "overhead_ratio": float, "overhead_ratio_paired": float,
    "overhead_met": bool, "update_ratio": float, "update_ratio_paired": float,
    "update_share_at_interval_100": float, "update_met": bool,
    "weight_bytes": int, "state_bytes": int,
    "inner_optimizer_state_bytes": int, "state_ratio": float,
    "state_met": bool, "sparse_layers": int, "rss": dict,
    "overhead_vs_fused_dense_paired": float,  # null under XLA
    "keras_sgd_over_fused_paired": float,
}


def _check_types(record, expected):
    for key, kind in expected.items():
        assert key in record, f"missing key {key!r}"
        assert isinstance(record[key], kind), (
            f"{key!r} is {type(record[key]).__name__}, expected {kind.__name__}"
        )


@pytest.mark.slow
def test_quick_run_writes_report(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models=mlp",
         "--repeats=2", f"--out={tmp_path}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((tmp_path / "speed.json").read_text())
    _check_types(report, TOP_KEYS)
    assert report["benchmark"] == "speed"
    assert report["protocols"] == ["FMNIST-MLP v1"]
    assert report["settings"]["quick"] is True
    assert report["settings"]["repeats"]["mlp"] == 2
    assert set(report["targets"]) == {
        "overhead_ratio", "update_share_at_interval_100", "state_ratio",
    }
    assert len(report["results"]) == 1  # --quick leaves XLA out

    result = report["results"][0]
    _check_types(result, RESULT_KEYS)
    assert result["model"] == "mlp" and result["jit_compile"] is False
    steps = report["settings"]["steps_per_block"]["mlp"]
    for arm in ("dense", "sparse", "update", "sparse_keras_sgd",
                "dense_fused_sgd"):
        timing = result["step_ms"][arm]
        assert timing["steps"] == 2 * steps
        for key in ("median", "p25", "p75"):
            assert isinstance(timing[key], float) and timing[key] > 0
            assert math.isfinite(timing[key])
    assert 0 < result["state_bytes"] < result["weight_bytes"]
    for arm in ("dense", "sparse"):
        assert result["rss"][arm]["peak_mib"] > 0
    assert isinstance(result["rss"]["peak_ratio"], float)

    markdown = (tmp_path / "speed.md").read_text()
    assert "| FMNIST-MLP v1 | no |" in markdown
    assert "sparse with Keras's SGD update / sparse" in markdown
    # With the compiled library built (setup.sh builds it), the ordinary
    # step is timed against TensorFlow's masked update too.
    if result["compiled_selection"]:
        assert result["step_ms"]["sparse_tf_update"]["steps"] == 2 * steps
        assert result["tf_update_over_sparse_paired"] > 0
        assert "sparse with TensorFlow's masked update / sparse" in markdown
    assert markdown in proc.stdout


@pytest.mark.slow
def test_quick_run_times_the_xla_arm_when_asked(tmp_path):
    # --quick leaves XLA out unless --xla is given; then the compiled steps
    # get their own row (the fused-SGD comparison is left out under XLA).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models=mlp", "--xla",
         "--repeats=2", "--norss", f"--out={tmp_path}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["settings"]["configs"] == ["default", "xla"]
    by_jit = {r["jit_compile"]: r for r in report["results"]}
    assert set(by_jit) == {False, True}
    xla = by_jit[True]
    for arm in ("dense", "sparse", "update"):
        assert xla["step_ms"][arm]["median"] > 0
    assert xla["update_ratio"] > 0 and xla["overhead_ratio"] > 0
    assert xla["overhead_vs_fused_dense_paired"] is None
    markdown = (tmp_path / "speed.md").read_text()
    assert "| FMNIST-MLP v1 | yes |" in markdown
