"""Tests for benchmarks/fmnist_table.py (and benchmarks/tfmot_baseline.py).

One end-to-end run of the script on a tiny budget (`--quick`: 1 epoch on
2,000 images, mask updates every 4 steps) checks the JSON, the markdown and
the README block it writes (marked `slow`: ~25 s); the tfmot rows are
included when the `tfmot` extra is installed. The README writer, the verdict
and the flag resolution are also tested on hand-built inputs.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import fashion_mnist_available
from conftest import requires_fashion_mnist
from conftest import script_flags_scope

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "fmnist_table.py"


def _load_script():
    # Called inside script_flags_scope: the module defines absl flags.
    # Its first import is benchmarks/benchkit.py, found beside it.
    if str(SCRIPT.parent) not in sys.path:
        sys.path.append(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("fmnist_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmnist_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    with script_flags_scope():
        yield _load_script()


def _tfmot_installed():
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("tensorflow_model_optimization", "tf_keras")
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs the script once, end to end, on the quick budget."""
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST IDX files not installed")
    out = tmp_path_factory.mktemp("results")
    readme = out / "README.md"
    readme.write_text("# Title\n\nWritten by the lead.\n", encoding="utf-8")
    methods = "dense,dense_ensemble,dst,edst"
    if _tfmot_installed():
        methods += ",tfmot"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--methods={methods}",
         f"--out={out}", f"--readme={readme}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "fmnist_mlp_v1_quick.json").read_text())
    return dict(out=out, readme=readme, result=result, methods=methods,
                markdown=(out / "fmnist_mlp_v1_quick.md").read_text())


EXPECTED_ROWS = ("dense", "dense_ensemble", "dst_single", "dst_ensemble",
                 "edst_ensemble")
TFMOT_ROWS = ("tfmot_single", "tfmot_ensemble")


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_quick_run_writes_every_row_with_valid_metrics(quick_run):
    rows = quick_run["result"]["rows"]
    expected = EXPECTED_ROWS + (TFMOT_ROWS if "tfmot" in quick_run["methods"]
                                else ())
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        for name in ("accuracy", "ece", "auroc_digits", "auroc_noise"):
            assert 0.0 <= row[name] <= 1.0, (key, name, row[name])
        assert row["nll"] > 0 and math.isfinite(row["nll"])
        assert row["seconds_per_epoch"] > 0
        ensemble = row["num_members"] > 1
        assert (row["disagreement"] is not None) == ensemble
        if ensemble:
            assert 0.0 < row["disagreement"] <= 1.0
            accs = [m["accuracy"] for m in row["members"]]
            assert row["member_accuracy"] == pytest.approx(sum(accs) / 3)
        else:
            assert row["member_accuracy"] is None
            # A single model's row equals its only member's scores.
            assert row["accuracy"] == pytest.approx(
                row["members"][0]["accuracy"])


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_quick_run_density_and_flops(quick_run):
    rows = quick_run["result"]["rows"]
    assert rows["dense"]["density"] == pytest.approx(1.0)
    assert rows["dense"]["train_flops"] == pytest.approx(1.0)
    assert rows["dense_ensemble"]["train_flops"] == pytest.approx(3.0)
    sparse = [k for k in rows if k.startswith(("dst", "edst", "tfmot"))]
    for key in sparse:
        assert rows[key]["density"] == pytest.approx(0.2, abs=0.01), key
    # Members saved from the sparse optimizer: no nonzero outside the masks.
    # An active weight can still be exactly 0 (regrown on an input pixel that
    # is 0 in every image, it never receives a gradient), so nonzeros may
    # fall a hair short of the masks' count, never above it.
    for key in ("dst_ensemble", "edst_ensemble"):
        for member in rows[key]["members"]:
            assert member["density"] <= member["mask_density"] + 1e-12
            assert member["density"] == pytest.approx(
                member["mask_density"], abs=1e-3)
    # A sparse run costs less than a dense one of the same length, and the
    # 3-member DST Ensemble costs the sum of its members.
    dst = rows["dst_ensemble"]
    assert dst["members"][0]["update_steps"] > 0
    member_flops = [m["train_flops"] for m in dst["members"]]
    assert all(0.2 < f < 1.0 for f in member_flops)
    assert dst["train_flops"] == pytest.approx(sum(member_flops))
    assert rows["dst_single"]["train_flops"] == pytest.approx(member_flops[0])
    if "tfmot_ensemble" in rows:
        tfmot = [m["train_flops"] for m in rows["tfmot_ensemble"]["members"]]
        assert all(0.2 < f < 1.0 for f in tfmot)
        assert rows["tfmot_ensemble"]["train_flops"] == pytest.approx(
            sum(tfmot))
    # EDST ran 3 epochs (one per member) at the sparse density: < 3 dense.
    edst = rows["edst_ensemble"]
    assert edst["total_epochs"] == 3
    assert edst["update_steps"] > 0
    assert 0.2 * 3 < edst["train_flops"] < 3.0
    assert edst["invariant_problems"] == []


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_quick_run_mask_overlap_shows_distinct_members(quick_run):
    rows = quick_run["result"]["rows"]
    for key in ("dst_ensemble", "edst_ensemble"):
        matrix = rows[key]["mask_overlap"]
        assert len(matrix) == 3
        for i in range(3):
            assert matrix[i][i] == pytest.approx(1.0)
            for j in range(3):
                if i != j:
                    assert 0.0 < matrix[i][j] < 0.9, (key, i, j)
        assert rows[key]["mean_mask_overlap"] < 0.9


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_quick_run_verdict_matches_numbers(quick_run):
    rows = quick_run["result"]["rows"]
    checks = quick_run["result"]["verdict"]["checks"]
    dense = rows["dense"]
    for key in ("dst_ensemble", "edst_ensemble"):
        check = checks[f"{key}_beats_dense"]
        assert check["accuracy"] == (rows[key]["accuracy"] > dense["accuracy"])
        assert check["nll"] == (rows[key]["nll"] < dense["nll"])
        assert check["ece"] == (rows[key]["ece"] < dense["ece"])
        assert check["holds"] == all(
            check[k] for k in ("accuracy", "nll", "ece", "flops"))
    ratio = checks["dst_vs_dense_ensemble"]["flops_ratio"]
    assert ratio == pytest.approx(
        rows["dst_ensemble"]["train_flops"]
        / rows["dense_ensemble"]["train_flops"])


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_quick_run_markdown_and_readme(quick_run):
    text = quick_run["markdown"]
    assert "| method | acc | member acc | NLL | ECE |" in text
    assert "NOT the protocol's numbers" in text
    assert "### FMNIST-MLP v1: verdict on the paper's claims" in text
    assert "Ensemble NLL vs its best member's NLL: dense ensemble" in text
    for title in ("dense single (seed 0)", "DST Ensemble (3 seeds)",
                  "EDST Ensemble M=3 (one run)"):
        assert f"| {title} |" in text
    readme = quick_run["readme"].read_text()
    assert readme.startswith("# Title\n\nWritten by the lead.\n")
    start = "<!-- results:fmnist_mlp_v1:start -->"
    end = "<!-- results:fmnist_mlp_v1:end -->"
    assert readme.count(start) == 1 and readme.count(end) == 1
    block = readme.split(start)[1].split(end)[0]
    assert block.strip() == text.strip()


@requires_fashion_mnist
@pytest.mark.slow  # the quick run takes ~25 s
def test_render_only_rewrites_the_same_markdown_from_json(quick_run):
    md = quick_run["out"] / "fmnist_mlp_v1_quick.md"
    md.write_text("stale")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--render_only",
         f"--out={quick_run['out']}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert md.read_text() == quick_run["markdown"]


def test_write_readme_replaces_only_its_block(table, tmp_path):
    path = tmp_path / "README.md"
    other = ("<!-- results:fmnist_cnn_v1:start -->\ncnn\n"
             "<!-- results:fmnist_cnn_v1:end -->")
    path.write_text(f"# Title\n\nintro\n\n{other}\n\nfooter\n")
    table.write_readme(path, "fmnist_mlp_v1", "first")
    table.write_readme(path, "fmnist_mlp_v1", "second\nblock")
    text = path.read_text()
    assert text.count("<!-- results:fmnist_mlp_v1:start -->") == 1
    assert "first" not in text
    assert ("<!-- results:fmnist_mlp_v1:start -->\nsecond\nblock\n"
            "<!-- results:fmnist_mlp_v1:end -->") in text
    assert text.startswith(f"# Title\n\nintro\n\n{other}\n\nfooter\n")
    table.write_readme(path, "fmnist_cnn_v1", "new cnn")
    assert "\ncnn\n" not in path.read_text()
    assert "footer" in path.read_text()


def test_write_readme_creates_a_missing_file(table, tmp_path):
    path = tmp_path / "README.md"
    table.write_readme(path, "fmnist_mlp_v1", "table")
    assert path.read_text() == (
        "<!-- results:fmnist_mlp_v1:start -->\ntable\n"
        "<!-- results:fmnist_mlp_v1:end -->\n"
    )


def _row(accuracy, nll, ece, flops):
    return dict(accuracy=accuracy, nll=nll, ece=ece, train_flops=flops)


def test_verdict_holds_and_fails_plainly(table):
    rows = {
        "dense": _row(0.89, 0.30, 0.015, 1.0),
        "dense_ensemble": _row(0.90, 0.28, 0.010, 3.0),
        "dst_ensemble": _row(0.897, 0.29, 0.010, 0.62),
        "edst_ensemble": _row(0.88, 0.33, 0.014, 0.21),
    }
    checks, text = table.verdict(rows)
    assert checks["dst_ensemble_beats_dense"]["holds"] is True
    assert checks["edst_ensemble_beats_dense"]["holds"] is False
    assert checks["edst_ensemble_beats_dense"]["ece"] is True
    assert checks["dst_vs_dense_ensemble"]["holds"] is True
    assert checks["dst_vs_dense_ensemble"]["accuracy_gap"] == pytest.approx(
        0.003)
    assert "EDST Ensemble does not beat" in text
    assert "fails on accuracy, NLL" in text
    rows["dst_ensemble"] = _row(0.89, 0.29, 0.010, 1.2)
    checks, text = table.verdict(rows)
    assert checks["dst_vs_dense_ensemble"]["holds"] is False
    assert checks["dst_vs_dense_ensemble"]["at_most_a_third"] is False
    assert checks["dst_ensemble_beats_dense"]["flops"] is False
    assert "does not hold" in text


def test_verdict_says_when_a_method_was_not_run(table):
    checks, text = table.verdict({"dense": _row(0.89, 0.3, 0.01, 1.0)})
    assert checks["dst_vs_dense_ensemble"] is None
    assert "not run" in text


class _Flags:
    def __init__(self, **kwargs):
        defaults = dict(protocol="mlp", epochs=None, train_examples=None,
                        methods=["dense", "dst"], lr_boundaries=None,
                        edst_exploration_epochs=None,
                        edst_refinement_epochs=None, update_interval=None,
                        l2=5e-4, quick=False)
        defaults.update(kwargs)
        self.__dict__.update(defaults)


def test_resolve_config_follows_the_protocols(table):
    mlp = table.resolve_config(_Flags())
    assert (mlp["epochs"], mlp["lr_boundaries"]) == (30, [15, 23])
    assert (mlp["edst_exploration_epochs"],
            mlp["edst_refinement_epochs"]) == (15, 5)
    assert mlp["key"] == "fmnist_mlp_v1" and mlp["full_budget"]
    assert mlp["update_interval"] == 100
    cnn = table.resolve_config(_Flags(protocol="cnn"))
    assert (cnn["epochs"], cnn["lr_boundaries"]) == (10, [5, 8])
    assert (cnn["edst_exploration_epochs"],
            cnn["edst_refinement_epochs"]) == (4, 2)
    scaled = table.resolve_config(_Flags(epochs=10))
    assert scaled["lr_boundaries"] == [5, 8]
    assert scaled["key"] == "fmnist_mlp_v1_quick"
    assert scaled["edst_exploration_epochs"] + 3 * scaled[
        "edst_refinement_epochs"] == 10
    variant = table.resolve_config(_Flags(l2=2.5e-4))
    assert variant["key"] == "fmnist_mlp_v1_variant"
    assert variant["l2"] == 2.5e-4 and not variant["full_budget"]
    quick = table.resolve_config(_Flags(quick=True))
    assert (quick["epochs"], quick["train_examples"]) == (1, 2000)
    assert not quick["full_budget"]
    with pytest.raises(ValueError, match="methods"):
        table.resolve_config(_Flags(methods=["dense", "lottery"]))
    with pytest.raises(ValueError, match="train_examples"):
        table.resolve_config(_Flags(train_examples=60_000))


def test_its_flags_and_the_examples_share_a_process_in_either_order():
    """Both define `--epochs` (and more) differently; a pytest-xdist worker
    may load the examples first. script_flags_scope gives each loader its
    own flags and puts the earlier ones back."""
    from absl import flags

    def load_common():
        spec = importlib.util.spec_from_file_location(
            "common", REPO / "examples" / "common.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["common"] = module
        spec.loader.exec_module(module)
        module.define("epochs")
        return module

    before = "epochs" in flags.FLAGS
    with script_flags_scope():
        assert "epochs" not in flags.FLAGS
        load_common()
        examples_epochs = flags.FLAGS["epochs"]
        assert examples_epochs.default == 30
        with script_flags_scope():
            assert "epochs" not in flags.FLAGS
            assert "common" not in sys.modules
            module = _load_script()
            assert flags.FLAGS["epochs"].default is None
            assert flags.FLAGS.find_module_defining_flag("epochs") == "fmnist_table"
            assert module.FLAGS is flags.FLAGS
        assert flags.FLAGS["epochs"] is examples_epochs
        assert flags.FLAGS.find_module_defining_flag("epochs") == "common"
        assert "fmnist_table" not in sys.modules and "common" in sys.modules
    assert "common" not in sys.modules
    assert ("epochs" in flags.FLAGS) == before
    # Without the scope the examples refuse fmnist_table's --epochs rather
    # than run with it.
    with script_flags_scope():
        _load_script()
        with pytest.raises(flags.DuplicateFlagError,
                           match="epochs.*fmnist_table.*common"):
            load_common()
