"""Tests for benchmarks/ablations.py and benchmarks/corruptions.py.

The corruption functions of FMNIST-C v1 are checked on synthetic images
(determinism, ranges, shapes, what each corruption does, and that a higher
severity moves the images further from the clean ones). Every experiment of
`ablations.py` then runs end to end once, in one process, on the tiny budget
(2 epochs on 1,000 images, M = 2, 500 test images), and its JSON, markdown,
plot and README block are checked.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from conftest import fashion_mnist_available
from conftest import script_flags_scope

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


corruptions = _load("corruptions")


def _images(n=64, seed=0):
    """Smooth blob images in [0, 1] with a dark border (like FMNIST)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28]
    centers = rng.uniform(9, 19, size=(n, 2))
    widths = rng.uniform(3, 6, size=(n, 1, 1))
    d2 = ((rows - centers[:, 0, None, None]) ** 2
          + (cols - centers[:, 1, None, None]) ** 2)
    texture = rng.uniform(0.6, 1.0, size=(n, 28, 28))
    return (np.exp(-d2 / (2 * widths ** 2)) * texture).astype(np.float32)


def _high_frequency_energy(x):
    x = x.reshape(len(x), 28, 28).astype(np.float64)
    return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2))


# ------------------------------------------------------------ corruptions
@pytest.mark.parametrize("corruption", corruptions.CORRUPTIONS)
def test_every_set_is_deterministic_in_range_and_keeps_the_shape(corruption):
    x = _images(32).reshape(32, 784)
    for severity in corruptions.SEVERITIES:
        a = corruptions.corrupt(x, corruption, severity)
        b = corruptions.corrupt(x, corruption, severity)
        assert a.shape == x.shape and a.dtype == np.float32
        assert np.array_equal(a, b)
        assert a.min() >= 0.0 and a.max() <= 1.0
    # The same images as (N, 28, 28, 1) give the same pixels.
    c = corruptions.corrupt(x.reshape(32, 28, 28, 1), corruption, 3)
    assert c.shape == (32, 28, 28, 1)
    np.testing.assert_array_equal(c.reshape(32, 784),
                                  corruptions.corrupt(x, corruption, 3))


@pytest.mark.parametrize("corruption", corruptions.CORRUPTIONS)
def test_higher_severity_moves_images_further_from_clean(corruption):
    x = _images(200)
    distances = [
        float(np.mean(np.abs(corruptions.corrupt(x, corruption, s) - x)))
        for s in corruptions.SEVERITIES
    ]
    assert all(b > a for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0


def test_random_sets_depend_on_the_seed_and_not_on_order():
    x = _images(16)
    a = corruptions.corrupt(x, "gaussian_noise", 2, seed=0)
    assert not np.array_equal(a, corruptions.corrupt(x, "gaussian_noise", 2,
                                                     seed=1))
    sets = {(c, s): v for c, s, v in corruptions.fmnist_c(
        x, corruptions=("pixel_dropout", "gaussian_noise"), severities=(2,))}
    np.testing.assert_array_equal(sets[("gaussian_noise", 2)], a)
    assert len(list(corruptions.fmnist_c(x))) == 30


def test_blur_reduces_high_frequency_energy_with_severity():
    x = _images(64)
    energies = [_high_frequency_energy(x)] + [
        _high_frequency_energy(corruptions.corrupt(x, "gaussian_blur", s))
        for s in corruptions.SEVERITIES
    ]
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    kernel = corruptions.gaussian_kernel(1.0)
    assert len(kernel) == 7 and kernel.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(corruptions.gaussian_blur(x, 0.0), x)


def test_rotation_by_zero_is_identity_and_by_90_matches_rot90():
    x = _images(8)
    np.testing.assert_allclose(corruptions.rotate(x, 0.0), x, atol=1e-6)
    np.testing.assert_allclose(corruptions.rotate(x, 360.0), x, atol=1e-5)
    turned = corruptions.rotate(x, 90.0)
    np.testing.assert_allclose(turned, np.rot90(x, k=1, axes=(1, 2)),
                               atol=1e-5)
    # A rotation keeps the centred blob's mass roughly (nothing leaves).
    small = corruptions.rotate(x, 15.0)
    assert abs(small.sum() - x.sum()) / x.sum() < 0.05


def test_translation_shifts_with_zero_fill():
    x = _images(4)
    moved = corruptions.translate(x, [[0, 2], [3, 0], [0, -1], [-4, 0]])
    np.testing.assert_array_equal(moved[0, :, 2:], x[0, :, :-2])
    assert np.all(moved[0, :, :2] == 0)
    np.testing.assert_array_equal(moved[1, 3:], x[1, :-3])
    np.testing.assert_array_equal(moved[2, :, :-1], x[2, :, 1:])
    np.testing.assert_array_equal(moved[3, :-4], x[3, 4:])
    # The protocol's translation moves every image by exactly the severity.
    severity = 3
    y = corruptions.corrupt(x, "translation", severity)
    for image, shifted in zip(x, y):
        candidates = [corruptions.translate(image[None], [d])[0]
                      for d in ([0, 3], [0, -3], [3, 0], [-3, 0])]
        assert any(np.array_equal(shifted, c) for c in candidates)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(st.floats(min_value=0.0, max_value=1.0))
def test_pixel_dropout_zeroes_the_exact_fraction(fraction):
    x = np.full((5, 784), 0.5, dtype=np.float32)
    y = corruptions.pixel_dropout(x, fraction, np.random.default_rng(0))
    zeros = (y == 0).sum(axis=1)
    assert np.all(zeros == int(round(fraction * 784)))
    assert np.all(y[y != 0] == 0.5)


def test_contrast_and_noise_do_what_they_say():
    x = _images(32)
    faded = corruptions.contrast(x, 0.4)
    np.testing.assert_allclose(faded.mean(axis=(1, 2)), x.mean(axis=(1, 2)),
                               atol=1e-5)
    np.testing.assert_allclose(faded.std(axis=(1, 2)),
                               0.4 * x.std(axis=(1, 2)), rtol=1e-4)
    gray = np.full((50, 784), 0.5, dtype=np.float32)
    noisy = corruptions.gaussian_noise(gray, 0.08, np.random.default_rng(0))
    assert np.std(noisy - gray) == pytest.approx(0.08, rel=0.02)


def test_corruption_arguments_are_checked():
    x = _images(2)
    with pytest.raises(ValueError, match="corruption"):
        corruptions.corrupt(x, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corruptions.corrupt(x * 255, "contrast", 1)
    with pytest.raises(ValueError, match="shape"):
        corruptions.corrupt(np.zeros((2, 30)), "contrast", 1)
    with pytest.raises(ValueError, match="fraction"):
        corruptions.pixel_dropout(x, 1.5, np.random.default_rng(0))


# ------------------------------------------------------------- ablations
@pytest.fixture(scope="module")
def ablations():
    # ablations.py and the fmnist_table.py it imports define absl flags.
    with script_flags_scope():
        yield _load("ablations")


def test_budgets_and_arguments(ablations):
    small = ablations.make_config("small")
    assert small["epochs"] == 10 and small["lr_boundaries"] == [5, 8]
    assert (small["edst_exploration_epochs"]
            + small["num_members"] * small["edst_refinement_epochs"]
            == small["epochs"])
    full = ablations.make_config("full")
    assert full["epochs"] == 30 and full["train_examples"] == 55000
    with pytest.raises(ValueError, match="budget"):
        ablations.make_config("huge")
    with pytest.raises(ValueError, match="experiments"):
        ablations.run_experiments(["nope"], "tiny", "/tmp/unused")


def test_cli_rejects_an_unknown_experiment():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ablations.py"),
         "--experiment=bogus"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "experiment" in proc.stdout


@pytest.fixture(scope="module")
def tiny_run(ablations, tmp_path_factory):
    """Every experiment, end to end, on the tiny budget, in one process."""
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST IDX files not installed")
    out = tmp_path_factory.mktemp("ablations")
    readme = out / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written text.\n")
    results = ablations.run_experiments(
        list(ablations.EXPERIMENTS), "tiny", out, readme=readme,
        argv=["ablations.py", "--experiment=all", "--budget=tiny"])
    return dict(out=out, readme=readme, results=results)


def _files(run, name):
    stem = run["out"] / f"ablation_{name}_tiny"
    payload = json.loads(stem.with_suffix(".json").read_text())
    markdown = stem.with_suffix(".md").read_text()
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert payload["experiment"] == name
    assert payload["config"]["budget_name"] == "tiny"
    assert "--budget=tiny" in markdown and "Budget: tiny" in markdown
    assert "Verdict" in markdown and payload["verdict"]["text"] in markdown
    return payload, markdown


def _in_unit(value):
    return value is not None and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_q_experiment(tiny_run):
    payload, markdown = _files(tiny_run, "q")
    rows = payload["rows"]
    assert [r["q"] for r in rows.values()] == [0.1, 0.5, 0.8]
    for row in rows.values():
        assert _in_unit(row["accuracy"]) and _in_unit(row["ece"])
        assert row["nll"] > 0 and row["kl_divergence"] >= 0
        assert _in_unit(row["disagreement"])
        assert _in_unit(row["mean_mask_overlap"])
        assert row["num_members"] == 2
        assert f"| {row['q']:g} | {row['accuracy']:.4f} |" in markdown
    # Replacing more of the mask leaves less of it shared.
    assert (rows["q=0.1"]["mean_mask_overlap"]
            > rows["q=0.8"]["mean_mask_overlap"])


@pytest.mark.slow
def test_p_interval_experiment(tiny_run):
    payload, _ = _files(tiny_run, "p_interval")
    rows = payload["rows"]
    settings_run = {(r["p"], r["update_interval"]) for r in rows.values()}
    assert settings_run == {(0.3, 4), (0.5, 4), (0.7, 4), (0.5, 2), (0.5, 8)}
    for row in rows.values():
        # Weights ever active: at least the final density, at most all.
        assert row["density"] - 1e-6 <= row["ever_active"] <= 1.0
        assert row["mask_updates"] >= 1
        assert _in_unit(row["member_accuracy"])
    by = {(r["p"], r["update_interval"]): r for r in rows.values()}
    assert by[(0.5, 2)]["mask_updates"] > by[(0.5, 8)]["mask_updates"]
    assert by[(0.7, 4)]["ever_active"] > by[(0.3, 4)]["ever_active"]


@pytest.mark.slow
def test_diversity_experiment(tiny_run):
    payload, _ = _files(tiny_run, "diversity")
    rows = payload["rows"]
    assert set(rows) == {"dense", "dense_ensemble", "dst_ensemble",
                         "dst_same_init", "edst_ensemble",
                         "dense_at_edst_flops"}
    edst, matched = rows["edst_ensemble"], rows["dense_at_edst_flops"]
    assert rows["dense_ensemble"]["train_flops"] == pytest.approx(2.0)
    # The matched dense ensemble spends about EDST's FLOPs (whole steps).
    steps = matched["steps_per_member"]
    assert matched["train_flops"] == pytest.approx(
        2 * steps / (2 * 8), rel=1e-6)  # M x steps / (epochs x 8 steps)
    assert abs(matched["train_flops"] - edst["train_flops"]) <= 2 / 16 + 1e-9
    assert edst["train_flops"] < 1.0
    for row in rows.values():
        assert _in_unit(row["accuracy"])


@pytest.mark.slow
def test_robustness_experiment(tiny_run):
    payload, markdown = _files(tiny_run, "robustness")
    rows = payload["rows"]
    assert set(rows) == {"dense", "dense_ensemble", "dst_ensemble",
                         "edst_ensemble"}
    for row in rows.values():
        assert len(row["per_set"]) == 31
        assert set(row["by_severity"]) == {"1", "2", "3", "4", "5"}
        means = [row["by_severity"][s]["accuracy"] for s in "12345"]
        assert row["mean"]["accuracy"] == pytest.approx(np.mean(means))
        assert all(_in_unit(v["accuracy"]) for v in row["per_set"].values())
    # Clean accuracy matches the diversity experiment's row of the same run.
    diversity = json.loads(
        (tiny_run["out"] / "ablation_diversity_tiny.json").read_text())
    assert rows["dst_ensemble"]["clean"]["accuracy"] == pytest.approx(
        diversity["rows"]["dst_ensemble"]["accuracy"])
    assert "sev 5 acc" in markdown


@pytest.mark.slow
def test_readme_gets_one_block_per_experiment(tiny_run, ablations):
    text = tiny_run["readme"].read_text()
    assert text.startswith("# Benchmarks\n\nHand-written text.\n")
    for name in ablations.EXPERIMENTS:
        start = f"<!-- results:ablation_{name}_tiny:start -->"
        assert text.count(start) == 1
        assert f"<!-- results:ablation_{name}_tiny:end -->" in text
