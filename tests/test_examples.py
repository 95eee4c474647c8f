"""End-to-end tests of the example scripts (examples/*.py) through their absl flags.

The four scripts run in this process on a tiny budget (2,000 training
examples of the offline Fashion-MNIST, an MLP, one or two epochs): their
flags are parsed into absl's global FLAGS (the scripts define each flag once
per process, so all four can be imported together) and `main` is called, as
`absl.app.run` would. The files they write are checked: member files,
run.json / results.json keys and values, and PNGs that decode.

Bad flags run each script in a subprocess whose `tensorflow` and `keras`
packages are replaced by stubs that raise on import: the script must end
with ONE line on stderr naming the flag and its value, a non-zero status and
no traceback, before TensorFlow would load.

The offline data set is registered once per machine as the tfds data set
`fashion_mnist_local` in the tfds data directory ($TFDS_DATA_DIR or
~/tensorflow_datasets), as the scripts do for a user; the first run pays
about 30 s for it.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import requires_fashion_mnist
from conftest import script_flags_scope

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUBPROCESS_TIMEOUT_S = 60
PLOTS = ("reliability.png", "ood_histograms.png", "layer_density.png",
         "mask_overlap.png", "flops_tradeoff.png")
TINY = ["--train_examples=2000", "--eval_examples=400", "--batch_size=128",
        "--update_interval=5", "--num_members=2", "--verbose=0"]

pytestmark = requires_fashion_mnist


@pytest.fixture(scope="module")
def scripts():
    """The example modules, imported with examples/ on sys.path."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("matplotlib")
    with script_flags_scope():
        sys.path.insert(0, str(EXAMPLES))
        try:
            import evaluate
            import export
            import train_dst_ensemble
            import train_edst_ensemble

            yield {"edst": train_edst_ensemble, "dst": train_dst_ensemble,
                   "evaluate": evaluate, "export": export}
        finally:
            sys.path.remove(str(EXAMPLES))
            from absl import flags

            flags.FLAGS.unparse_flags()
            # The scripts' helper modules have plain names (data, models...):
            # keep them out of the other test modules' way.
            for name, module in list(sys.modules.items()):
                if os.path.dirname(getattr(module, "__file__", None) or "") == str(
                    EXAMPLES
                ):
                    del sys.modules[name]


def run_main(module, args):
    """Parses `args` into absl's FLAGS, then runs `module.main`, like app.run."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    remaining = flags.FLAGS([module.__file__] + list(args))
    return module.main(remaining)


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_pngs(folder):
    import matplotlib.image

    for name in PLOTS:
        path = folder / name
        assert path.is_file(), f"{name} was not written"
        assert path.stat().st_size < 150_000
        image = matplotlib.image.imread(str(path))
        assert image.ndim == 3 and min(image.shape[:2]) > 100


@pytest.fixture(scope="module")
def edst_run(scripts, tmp_path_factory):
    out = tmp_path_factory.mktemp("edst")
    started = time.time()
    run_main(scripts["edst"], TINY + [
        f"--output_dir={out}", "--exploration_epochs=1",
        "--refinement_epochs=1",
    ])
    return out, time.time() - started


@pytest.fixture(scope="module")
def dst_run(scripts, tmp_path_factory):
    out = tmp_path_factory.mktemp("dst")
    run_main(scripts["dst"], TINY + [f"--output_dir={out}", "--epochs=1",
                                     "--seed=3"])
    return out


def test_edst_script_writes_members_results_and_plots(edst_run):
    out, _ = edst_run
    assert sorted(p.name for p in (out / "edst").glob("*.kftm")) == [
        "member_0.kftm", "member_1.kftm"]
    assert (out / "dense" / "member_0.kftm").is_file()

    run = read_json(out / "run.json")
    assert run["script"] == "train_edst_ensemble.py"
    assert run["flags"]["num_members"] == 2
    assert run["data"]["num_train"] == 2000
    assert run["data"]["tfds_name"] == "fashion_mnist_local"
    edst, dense = run["methods"]
    assert (edst["kind"], dense["kind"]) == ("edst", "dense")
    assert [m["epoch"] for m in edst["members"]] == [2, 3]
    # 16 steps an epoch: member 0 after 32, member 1 after 48; the masks
    # were updated (interval 5) and the FLOPs grow with every member.
    assert [m["steps"] for m in edst["members"]] == [32, 48]
    assert 0 < edst["members"][0]["update_steps"] < edst["members"][1][
        "update_steps"]
    assert edst["prefix_train_flops"][0] < edst["prefix_train_flops"][1]
    assert dense["epochs"] == edst["epochs"] == 3

    results = read_json(out / "results.json")
    assert results["test_examples"] == 400
    assert results["ood_examples"] == {"digits": 400, "noise": 400}
    table = results["table"]
    assert list(table) == ["EDST member 0", "EDST member 1",
                           "EDST ensemble (M=2)", "dense single"]
    for row in table.values():
        assert set(row) == set(results["columns"])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["nll"] > 0
        assert 0.0 <= row["auroc_digits"] <= 1.0
    ensemble = table["EDST ensemble (M=2)"]
    # Nonzero fraction: a regrown weight whose gradient is always 0 (a
    # weight of a border pixel that is 0 in every image) stays 0.
    assert ensemble["density"] == pytest.approx(0.2, abs=0.01)
    assert table["dense single"]["density"] == pytest.approx(1.0, abs=1e-3)
    assert table["dense single"]["train_flops"] == pytest.approx(1.0)
    # Sparse training at density 0.2 costs well under a dense run.
    assert 0.1 < ensemble["train_flops"] < 0.5
    assert 0.0 <= ensemble["disagreement"] <= 1.0
    edst_result = results["methods"][0]
    assert [p["members"] for p in edst_result["prefix_ensembles"]] == [1, 2]
    check_pngs(out)
    assert results["plots"] == list(PLOTS)


def test_edst_prints_the_table(scripts, edst_run, capsys, tmp_path):
    # The module fixture ran before capsys; rerun the evaluation to see it.
    out, _ = edst_run
    run_main(scripts["evaluate"], [f"--run_dirs={out}",
                                   f"--output_dir={tmp_path}",
                                   "--eval_examples=200", "--noplots"])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "EDST ensemble" in line]
    assert len(lines) == 1 and "accuracy" in printed and "auroc_digits" in printed
    assert read_json(tmp_path / "results.json")["test_examples"] == 200


def test_dst_script_trains_distinct_members_and_resumes(scripts, dst_run,
                                                        capsys):
    out = dst_run
    run = read_json(out / "run.json")
    dst = run["methods"][0]
    assert dst["kind"] == "dst" and dst["num_members"] == 2
    # Independent runs: the ensemble of 2 costs twice one member.
    assert dst["prefix_train_flops"][1] == pytest.approx(
        2 * dst["prefix_train_flops"][0])
    table = read_json(out / "results.json")["table"]
    assert "DST ensemble (M=2)" in table and "dense single" in table
    members = sorted((out / "dst").glob("member_*.kftm"))
    assert len(members) == 2
    from keras_freetickets import members as members_lib

    seeds = [members_lib.read_member_metadata(p)["seed"] for p in members]
    assert seeds == [3, 4]
    overlap = members_lib.mask_overlap(str(members[0]), str(members[1]))
    assert overlap < 0.9
    check_pngs(out)

    # Same flags again: both members are kept, nothing is retrained.
    stamps = [p.stat().st_mtime_ns for p in members]
    capsys.readouterr()
    run_main(scripts["dst"], TINY + [f"--output_dir={out}", "--epochs=1",
                                     "--seed=3", "--noevaluate",
                                     "--nodense_baseline"])
    assert "already trained" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in members] == stamps
    assert read_json(out / "run.json")["methods"][0]["prefix_train_flops"] == (
        dst["prefix_train_flops"])


def test_evaluate_compares_runs(scripts, edst_run, dst_run, tmp_path):
    out_edst, _ = edst_run
    run_main(scripts["evaluate"], [
        f"--run_dirs={out_edst},{dst_run}", f"--output_dir={tmp_path}",
        "--eval_examples=300",
    ])
    results = read_json(tmp_path / "results.json")
    names = list(results["table"])
    prefix_edst, prefix_dst = out_edst.name, dst_run.name
    assert f"{prefix_edst}: EDST ensemble (M=2)" in names
    assert f"{prefix_dst}: DST ensemble (M=2)" in names
    # One FLOPs reference for every row: the first dense run.
    assert results["table"][f"{prefix_edst}: dense single"][
        "train_flops"] == pytest.approx(1.0)
    check_pngs(tmp_path)


def test_export_writes_a_saved_model_that_matches(scripts, edst_run, tmp_path):
    out, _ = edst_run
    run_main(scripts["export"], [f"--run_dir={out}",
                                 f"--output_dir={tmp_path}", "--version=7"])
    summary = read_json(tmp_path / "export.json")
    assert summary["path"] == str(tmp_path / "freetickets" / "7")
    assert (tmp_path / "freetickets" / "7" / "saved_model.pb").is_file()
    assert summary["num_members"] == 2
    assert {"serving_default", "members"} <= set(summary["signatures"])
    assert {"probabilities", "classes", "confidence", "entropy",
            "mutual_information"} <= set(summary["outputs"])
    assert summary["max_abs_difference"] < 1e-5
    assert summary["class_agreement"] == 1.0
    assert summary["bytes_ratio"] < 0.6  # compact sparse kernels
    # The same version again, without --overwrite: refused before any work.
    import common

    with pytest.raises(common.ExampleError, match="--overwrite"):
        run_main(scripts["export"], [f"--run_dir={out}",
                                     f"--output_dir={tmp_path}", "--version=7"])


def test_data_helpers(scripts):
    import data

    source = data.resolve("fashion_mnist", log=lambda message: None)
    assert source.tfds_name == "fashion_mnist_local" and source.fashion
    assert source.split("train", 2000) == "train[:2000]"
    assert source.split("test") == "test"
    carved = data.Source("x", "x", {"train": ("train", 0, 45000),
                                    "validation": ("train", 45000, None),
                                    "test": ("test", None, None)}, "", False)
    assert carved.split("train", 100) == "train[0:100]"
    assert carved.split("validation", 100) == "train[45000:45100]"
    assert carved.split("validation") == "train[45000:]"
    sets = data.ood_sets((32, 32, 3), fashion=False, limit=50)
    assert sets["digits"].shape == (50, 32, 32, 3)
    assert sets["noise"].shape == (50, 32, 32, 3)
    for images in sets.values():
        assert images.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 1.0
    started = time.time()
    data.online(timeout=1.0)  # whatever the answer, it never hangs
    assert time.time() - started < 2.5


def test_models_build_with_logits(scripts):
    import models

    resnet = models.build_model("resnet20", (32, 32, 3), 10)
    assert 0.26e6 < resnet.count_params() < 0.28e6
    cnn = models.build_model("cnn", (28, 28, 1), 10)
    assert cnn(np.zeros((2, 28, 28, 1), "float32")).shape == (2, 10)
    with pytest.raises(ValueError, match="name"):
        models.build_model("vgg", (28, 28, 1), 10)


# ------------------------------------------------------------- bad flags
@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """A PYTHONPATH folder whose tensorflow and keras raise when imported."""
    folder = tmp_path_factory.mktemp("no_tf")
    for package in ("tensorflow", "keras"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(
            "raise ImportError('TensorFlow was imported before the flags "
            "were checked')\n"
        )
    return folder


def run_script(name, args, env_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(env_path), str(ROOT)] + ([env["PYTHONPATH"]]
                                      if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")] + args,
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        env=env, cwd=str(ROOT),
    )


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "plain_file"
    path.write_text("not a folder")
    return path


BAD_FLAGS = [
    ("train_edst_ensemble", ["--sparsity=1.5"], "--sparsity=1.5", 2),
    ("train_dst_ensemble", ["--sparsity=1.5"], "--sparsity=1.5", 2),
    ("train_edst_ensemble", ["--num_members=0"], "--num_members=0", 2),
    ("train_dst_ensemble", ["--num_members=0"], "--num_members=0", 2),
    ("train_edst_ensemble", ["--dataset=no_such_dataset"],
     "--dataset=no_such_dataset", 1),
    ("train_dst_ensemble", ["--dataset=no_such_dataset"],
     "--dataset=no_such_dataset", 1),
    ("train_edst_ensemble", ["--output_dir={file}/out"], "--output_dir=", 1),
    ("train_dst_ensemble", ["--output_dir={file}/out"], "--output_dir=", 1),
    ("train_edst_ensemble", ["--global_drop_fraction=0"],
     "--global_drop_fraction=0", 2),
    ("train_dst_ensemble", ["--drop_fraction=1.5"], "--drop_fraction=1.5", 2),
    ("train_edst_ensemble", ["--model=vgg16"], "--model=vgg16", 2),
    ("evaluate", ["--run_dirs={tmp}"], "--run_dirs", 1),
    ("export", ["--member_dir={tmp}"], "--member_dir", 1),
    ("export", ["--run_dir={tmp}", "--version=0"], "--version=0", 2),
]


@pytest.mark.parametrize("script,args,expected,status", BAD_FLAGS)
def test_bad_flag_is_one_line_before_tensorflow(script, args, expected, status,
                                                no_tensorflow, a_file,
                                                tmp_path):
    args = [a.format(file=a_file, tmp=tmp_path) for a in args]
    result = run_script(script, args, no_tensorflow)
    stderr = result.stderr.strip()
    assert result.returncode == status, stderr
    assert "Traceback" not in stderr
    assert "TensorFlow was imported" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"{script}.py: error: ")
    assert expected in stderr


def test_helpfull_documents_every_flag(no_tensorflow):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import common
    finally:
        sys.path.remove(str(EXAMPLES))
    result = run_script("train_edst_ensemble", ["--helpfull"], no_tensorflow)
    text = result.stdout
    for name in ("dataset", "model", "sparsity", "distribution", "grow",
                 "drop_fraction", "update_interval", "num_members",
                 "exploration_epochs", "refinement_epochs",
                 "global_drop_fraction", "batch_size", "learning_rate",
                 "seed", "strategy", "output_dir"):
        assert f"--{name}:" in text, name
        first_words = common.FLAG_SPECS[name]["help"].split()[:3]
        assert " ".join(first_words) in " ".join(text.split()), name
    dst = run_script("train_dst_ensemble", ["--helpfull"], no_tensorflow).stdout
    assert "--epochs:" in dst and "--exploration_epochs" not in dst
