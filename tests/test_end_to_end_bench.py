"""Smoke tests of the issue-11 benchmark scripts: a `--quick` run of each
writes its report with the protocol, machine line and command; the figures
themselves are machine-dependent and not checked. Marked slow (each starts
TensorFlow in a subprocess and trains or exports small models)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def _run(script, *args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout,
        check=False,
    )


def _check_header(report, markdown, benchmark):
    assert report["benchmark"] == benchmark
    assert "2-core" in report["machine"] or "-core CPU" in report["machine"]
    assert report["command"].startswith(f"python benchmarks/{benchmark}.py")
    assert report["date"]
    assert "QUICK SMOKE RUN" in markdown


def test_bad_flags_fail_before_tensorflow_loads():
    proc = _run("end_to_end.py", "--models=mlp,rnn", timeout=60)
    assert proc.returncode != 0
    assert "Flag --models must list names in ['cnn', 'mlp']. Received: 'rnn'" in proc.stderr
    proc = _run("end_to_end.py", "--pairs=0", timeout=60)
    assert "Flag --pairs must be >= 1. Received: 0" in proc.stderr
    for bad in ("2", "0:2", "1:x", "1:2:3", "1:\u00b2", "-1:2"):
        proc = _run("serving_latency.py", f"--threads=default,{bad}", timeout=60)
        assert proc.returncode != 0
        assert ("Flag --threads must list 'default' or INTRA:INTER with positive "
                f"integers, such as 1:2. Received: '{bad}'") in proc.stderr
    proc = _run("serving_latency.py", "--kernel_modes=sparse_matmul,dense",
                timeout=60)
    assert proc.returncode != 0
    assert ("Flag --kernel_modes must list modes in ['rebuild_variables', "
            "'sparse_matmul'] (the default, 'rebuild', is always timed). "
            "Received: 'dense'") in proc.stderr
    for bad in ("0", "1", "1.5", "-0.2"):
        proc = _run("serving_latency.py", f"--sparsity={bad}", timeout=60)
        assert proc.returncode != 0
        assert ("Flag --sparsity must be in (0, 1). Received: "
                f"{float(bad)}") in proc.stderr
    for flag, bad, allowed in (("fit_layers", "3", "0, 1, 2"),
                               ("cnn_fit_layers", "1,4", "0, 1, 2, 3"),
                               ("cnn_fit_layers", "", "0, 1, 2, 3")):
        proc = _run("sparse_kernels.py", f"--{flag}={bad}", timeout=60)
        assert proc.returncode != 0
        assert (f"Flag --{flag} must list places among {allowed}. "
                f"Received: {bad!r}") in proc.stderr
    for bad in ("30y", "300x0", "x3", "300x3x2", "0"):
        proc = _run("batch1_products.py", f"--kernels=300,{bad}", timeout=60)
        assert proc.returncode != 0
        assert ("Flag --kernels must list N or NxC with positive integers, such "
                f"as 300 or 300x3. Received: '{bad}'") in proc.stderr
    proc = _run("batch1_products.py", "--threads=1:2,2", timeout=60)
    assert "Received: '2'" in proc.stderr and proc.returncode != 0
    proc = _run("batch1_products.py", "--inputs=0", timeout=60)
    assert "Flag --inputs must be >= 1. Received: 0" in proc.stderr


@pytest.fixture(scope="module")
def serving_helpers():
    """What serving_latency's pure helpers return, from a child: the script
    defines absl flags (--out, --quick) that other benchmark modules loaded
    by this test process define too."""
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, "benchmarks")
        import serving_latency
        from keras_freetickets import export

        def timing(dense, per_member, batched, sparse_matmul):
            row = lambda p50: dict(p50_ms=p50, p99_ms=2 * p50, requests=1)
            return {"latency": {"1": {
                "dense member": row(dense), "M = 3 per member": row(per_member),
                "M = 3 batched": row(batched),
                "M = 3 per member, sparse_matmul": row(sparse_matmul),
            }}}

        mark = serving_latency._mark
        floor = serving_latency.FLOOR
        row = lambda p50: dict(p50_ms=p50, p99_ms=2 * p50, requests=1)
        print(json.dumps(dict(
            work=[serving_latency.members_work(rows) for rows in (
                {"dense member": row(0.5), "M = 3 per member": row(1.1),
                 floor: row(0.3)},
                {"dense member": row(0.5), "M = 3 per member": row(1.1)},
                {"dense member": row(0.3), "M = 3 per member": row(1.1),
                 floor: row(0.3)},
            )],
            fastest=serving_latency.fastest_settings({
                "default": timing(2.0, 3.0, 5.0, 1.5),
                "1:2": timing(1.0, 4.0, 2.5, 6.0),
            }),
            kernel_modes=[serving_latency.KERNEL_MODES, export.KERNEL_MODES],
            marks=[mark("1", "M = 3 per member", 1.5),
                   mark("1", "M = 3 per member", 1.51),
                   mark("64", "M = 3 per member", 1.2),
                   mark("1", "dense member", 1.0),
                   mark("1", "M = 3 per member", 1.2, sparsity=0.9),
                   mark("1", floor, 0.7)],
        )))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fastest_settings_picks_each_variants_lowest_p50(serving_helpers):
    fastest = serving_helpers["fastest"]["1"]
    assert list(fastest) == ["dense member", "M = 3 per member", "M = 3 batched",
                             "M = 3 per member, sparse_matmul"]
    assert fastest["dense member"] == dict(threads="1:2", p50_ms=1.0, ratio=1.0)
    assert fastest["M = 3 per member"] == dict(threads="default", p50_ms=3.0, ratio=3.0)
    assert fastest["M = 3 batched"] == dict(threads="1:2", p50_ms=2.5, ratio=2.5)
    assert fastest["M = 3 per member, sparse_matmul"] == dict(
        threads="default", p50_ms=1.5, ratio=1.5)


def test_serving_target_marked_at_batch_1_and_the_protocols_sparsity_only(
        serving_helpers):
    # The flags are checked against a copy of the export's modes.
    modes, export_modes = serving_helpers["kernel_modes"]
    assert modes == export_modes
    assert serving_helpers["marks"] == [" yes", " NO", "", "", "", ""]


def test_members_work_is_measured_above_the_floor(serving_helpers):
    # (1.1 - 0.3) / (0.5 - 0.3); none without a floor, or with a dense
    # member no slower than it.
    assert serving_helpers["work"][0] == pytest.approx(4.0)
    assert serving_helpers["work"][1:] == [None, None]


@pytest.mark.slow
def test_end_to_end_quick_run_writes_breakdown(tmp_path):
    proc = _run("end_to_end.py", "--quick", "--models=mlp", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "end_to_end.json").read_text())
    markdown = (tmp_path / "end_to_end.md").read_text()
    _check_header(report, markdown, "end_to_end")
    assert report["protocols"] == ["FMNIST-MLP v1", "End to end"]
    (result,) = report["results"]
    assert result["jit_compile"] is False and result["pairs"] == 1
    assert set(result["breakdown"]) == {"dense", "sparse", "monitor"}
    sparse = result["breakdown"]["sparse"]
    steps = result["steps_per_epoch"] * result["epochs"]
    assert sparse["ordinary_steps"] + sparse["update_steps"] + 1 == steps
    assert sparse["update_steps"] >= 1  # the quick run updates every 10 steps
    assert result["breakdown"]["dense"]["update_steps"] == 0
    assert result["wall_ratio"] > 0 and result["monitor_share"] >= 0
    assert "| FMNIST-MLP v1 | no | 2 | 1 |" in markdown
    # Every fit of every arm, with its own figures; the iterator waits are a
    # part of the time outside the steps, and the ratio without them is the
    # median of the pairs' ratios of the wall times less the waits.
    for arm in ("dense", "sparse", "monitor"):
        run = report["results"][0]["runs"][arm][0]
        assert (f"| FMNIST-MLP v1 | no | {arm} | 0 | {run['wall_s']:.2f} "
                f"| {run['ordinary_median_ms']:.3f} "
                f"| {run['outside_steps_s']:.2f} "
                f"| {run['iterator_waits_s']:.2f} |") in markdown
        assert 0 <= run["iterator_waits_s"] <= run["outside_steps_s"]
        assert run["iterator_waits_s"] == pytest.approx(
            run["epoch_starts_s"] + run["fit_end_s"])
        assert run["outside_other_s"] == pytest.approx(
            run["outside_steps_s"] - run["iterator_waits_s"])
    sparse_run, dense_run = (result["runs"][arm][0] for arm in ("sparse", "dense"))
    assert result["wall_ratio_less_waits"] == pytest.approx(
        (sparse_run["wall_s"] - sparse_run["iterator_waits_s"])
        / (dense_run["wall_s"] - dense_run["iterator_waits_s"]))


@pytest.mark.slow
def test_serving_latency_quick_run_never_imports_the_library(tmp_path):
    proc = _run("serving_latency.py", "--quick", "--models=mlp",
                "--threads=default,1:1", "--kernel_modes=sparse_matmul",
                "--floor", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "serving_latency.json").read_text())
    markdown = (tmp_path / "serving_latency.md").read_text()
    _check_header(report, markdown, "serving_latency")
    (result,) = report["results"]
    # TensorFlow's own import loads keras; the library itself never loads.
    assert "keras_freetickets" not in result["serving_process"]["modules_loaded_at_start"]
    for batch in ("1", "64"):
        rows = result["latency"][batch]
        assert list(rows) == ["dense member", "M = 3 per member", "M = 3 batched",
                              "M = 3 per member, sparse_matmul",
                              "floor: one Dense(10)"]
        for row in rows.values():
            assert 0 < row["p50_ms"] <= row["p99_ms"]
    # Each thread setting ran in its own serving process, with its pools.
    assert list(result["by_threads"]) == ["default", "1:1"]
    assert result["by_threads"]["1:1"]["threads_in_effect"] == [1, 1]
    assert result["by_threads"]["default"]["threads_in_effect"] == [0, 0]
    assert result["latency"] == result["by_threads"]["default"]["latency"]
    fastest = result["fastest"]["1"]["dense member"]
    assert fastest["threads"] in ("default", "1:1") and fastest["ratio"] == 1.0
    assert "| FMNIST-MLP v1 | 1:1 | 1 | M = 3 per member |" in markdown
    assert "| FMNIST-MLP v1 | 1:1 | 1 | M = 3 per member, sparse_matmul |" in markdown
    assert report["settings"]["kernel_modes"] == ["rebuild", "sparse_matmul"]
    assert report["settings"]["sparsity"] == 0.8
    assert report["settings"]["floor"] is True
    assert "fastest setting" in markdown
    # The floor is no target row; the members' work is given above it.
    floor_rows = [ln for ln in markdown.splitlines()
                  if "| 1 | floor: one Dense(10) |" in ln]
    assert len(floor_rows) == 3  # one per thread setting, one at the fastest
    assert not any(" yes " in ln or " NO " in ln for ln in floor_rows)
    assert "M = 3 work / one member's work" in markdown


@pytest.mark.slow
def test_batch1_products_quick_run_reports_each_set_against_the_no_op(tmp_path):
    proc = _run("batch1_products.py", "--quick", "--kernels=300,300x2,300",
                "--inputs=64", "--threads=1:1,default", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "batch1_products.json").read_text())
    markdown = (tmp_path / "batch1_products.md").read_text()
    _check_header(report, markdown, "batch1_products")
    assert report["settings"]["kernels"] == ["64x300", "2 x 64x300"]  # no repeat
    assert list(report["results"]) == ["1:1", "default"]
    assert report["results"]["1:1"]["threads_in_effect"] == [1, 1]
    assert report["results"]["default"]["threads_in_effect"] == [0, 0]
    for result in report["results"].values():
        rows = result["rows"]
        assert [r["kernels"] for r in rows] == ["64x300", "2 x 64x300"]
        assert [r["mb"] for r in rows] == [pytest.approx(4 * 64 * 300 / 1e6),
                                           pytest.approx(2 * 4 * 64 * 300 / 1e6)]
        for r in rows:
            assert r["over_noop_us"] == pytest.approx(r["p50_us"] - result["noop_us"])
            if r["over_noop_us"] > 0:
                assert r["gb_per_s"] == pytest.approx(r["mb"] * 1e3 / r["over_noop_us"])
            else:
                assert r["gb_per_s"] is None
    assert "| 2 x 64x300 | 0.15 |" in markdown


@pytest.mark.slow
def test_sparse_kernels_quick_run_checks_every_layer(tmp_path):
    proc = _run("sparse_kernels.py", "--quick", "--models=mlp", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "sparse_kernels.json").read_text())
    markdown = (tmp_path / "sparse_kernels.md").read_text()
    _check_header(report, markdown, "sparse_kernels")
    assert len(report["rows"]) == 3 * 2  # 3 kernels x 2 sparsities
    compiled = {"compiled"} if report["settings"]["compiled"] else set()
    for row in report["rows"]:
        assert 0 < row["density"] <= 1
        for part in ("forward", "training"):
            for timing in row[part].values():
                assert set(timing) == {"dense", "tf.sparse", "gather"} | compiled
    assert "## Where a sparse path beat dense" in markdown
    if compiled:  # g++ is here: the whole-fit pairs ran, on the 784x300 layer
        fit = report["fit"]
        assert fit["layers"] == [0] and len(fit["ratios"]) == fit["pairs"] == 5
        assert "## Whole fits: dense against the compiled path" in markdown


@pytest.mark.slow
def test_sparse_kernels_times_the_compiled_convolution_forward_only(tmp_path):
    proc = _run("sparse_kernels.py", "--quick", "--models=cnn", "--fit_pairs=0",
                f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "sparse_kernels.json").read_text())
    if not report["settings"]["compiled"]:
        pytest.skip("no C++ compiler: the compiled paths were left out")
    convs = [r for r in report["rows"] if r["kind"] == "conv"]
    assert len(convs) == 2 * 2  # 2 convolutions x 2 sparsities
    for row in convs:
        for timing in row["forward"].values():
            assert timing["compiled"]["ms"] > 0
        for timing in row["training"].values():
            assert "compiled" not in timing
    markdown = (tmp_path / "sparse_kernels.md").read_text()
    assert "`native.sparse_conv2d`" in markdown


@pytest.mark.slow
def test_end_to_end_quick_run_times_the_xla_arm_when_asked(tmp_path):
    # --quick leaves XLA out unless --xla is given; the XLA arm then runs
    # compiled fits with their own breakdown.
    proc = _run("end_to_end.py", "--quick", "--models=mlp", "--xla", "--nomonitor",
                f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "end_to_end.json").read_text())
    assert report["settings"]["configs"] == ["default", "xla"]
    by_jit = {r["jit_compile"]: r for r in report["results"]}
    assert set(by_jit) == {False, True}
    xla = by_jit[True]
    sparse = xla["breakdown"]["sparse"]
    assert sparse["update_steps"] >= 1
    assert sparse["ordinary_steps"] + sparse["update_steps"] + 1 == (
        xla["steps_per_epoch"] * xla["epochs"])
    assert xla["wall_ratio"] > 0
    markdown = (tmp_path / "end_to_end.md").read_text()
    assert "| FMNIST-MLP v1 | yes | 2 | 1 |" in markdown


@pytest.mark.slow
def test_storage_and_inference_quick_run_times_the_ensemble_against_separate_calls(
        tmp_path):
    proc = _run("storage_and_inference.py", "--quick", "--models=mlp",
                f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "storage_inference.json").read_text())
    markdown = (tmp_path / "storage_inference.md").read_text()
    _check_header(report, markdown, "storage_and_inference")
    assert report["protocols"] == ["FMNIST-MLP v1", "Storage", "Ensemble inference"]
    assert [r["sparsity"] for r in report["storage"]] == [0.8, 0.9]
    for r in report["storage"]:
        assert 0 < r["member_vs_dense_member"] < 1
    (predict,) = report["predict"]
    for key in ("cost_ratio", "batched_cost_ratio", "separate_cost_ratio"):
        assert predict[key] > 0
    # The ratios against M separate calls come from the same medians.
    assert predict["ensemble_vs_separate"] == pytest.approx(
        predict["cost_ratio"] / predict["separate_cost_ratio"])
    assert predict["batched_vs_separate"] == pytest.approx(
        predict["batched_cost_ratio"] / predict["separate_cost_ratio"])
    assert (f"| FMNIST-MLP v1 | {predict['separate_cost_ratio']:.2f} "
            f"| {predict['ensemble_vs_separate']:.2f} "
            f"| {predict['batched_vs_separate']:.2f} |") in markdown
    variants = {(r["batch_size"], r["variant"]) for r in report["serving"]}
    assert {b for b, _ in variants} == {1, 1024}


@pytest.mark.slow
def test_selection_speed_checks_every_layer_before_timing(tmp_path):
    proc = _run("selection_speed.py", "--models=mlp", "--rounds=1", "--calls=1",
                "--noxla", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "selection_speed.json").read_text())
    markdown = (tmp_path / "selection_speed.md").read_text()
    assert report["benchmark"] == "selection_speed"
    assert report["command"].startswith("python benchmarks/selection_speed.py")
    # One row for each of the MLP's three kernels (784x300, 300x100, 100x10).
    assert sorted(r["size"] for r in report["rows"]) == [1000, 30000, 235200]
    for r in report["rows"]:
        assert r["xla"] is False and r["k"] >= 1
        assert all(ms > 0 for ms in r["ms"].values())
        assert f"| FMNIST-MLP v1 | `{r['layer']}` " in markdown
    # The 784x300 kernel is large enough for the radix select.
    largest = max(report["rows"], key=lambda r: r["size"])
    assert largest["path"] in ("radix", "compiled op")
