"""benchmarks/edst_v2.py: flags fail fast; a smoke run writes the lever
table, its plot and the v2 table with its verdict."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import requires_fashion_mnist
from conftest import subprocess_env

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "edst_v2.py"


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args],
                          env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--configs=bogus"], "--configs: unknown ['bogus']"),
    (["--seeds=a"], "--seeds: not an integer: 'a'"),
    (["--runs=edst:nope:0"], "--runs: cannot read 'edst:nope:0'"),
    (["--mode=other"], "--mode"),
])
def test_bad_flags_fail_before_training(args, needle):
    result = run(*args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "training" not in result.stdout


@requires_fashion_mnist
@pytest.mark.slow
def test_quick_run_writes_lever_table_plot_and_v2_verdict(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--quick", f"--out={out}", f"--cache_dir={cache}"]
    result = run("--mode=levers", "--configs=official,default", "--seeds=0",
                 *common, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    levers = json.loads((out / "edst_v2_levers.json").read_text())
    assert set(levers["rows"]) == {"official", "default"}
    row = levers["rows"]["default"][0]
    assert 0.0 <= row["disagreement"] <= 1.0 and row["return_rate"] == 0.0
    assert (out / "edst_v2_levers.png").stat().st_size > 10_000
    result = run("--mode=table", *common, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "fmnist_mlp_v2.md").read_text()
    assert "Verdict on issue 10's targets" in text
    assert "EDST M=3, EDSTCallback defaults" in text
