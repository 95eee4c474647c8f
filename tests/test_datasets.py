"""Tests of keras_freetickets.contrib.datasets.

The Fashion-MNIST tests read the installed IDX files (skipped when absent) and
compare the loader with a direct read of the same files. Error paths use
files written to a temporary folder.
"""

import gzip
import math
import os
import pathlib
import sys

import numpy as np
import pytest

from keras_freetickets.contrib import datasets

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _raw_read(folder, part):
    """Reads an IDX file pair directly: (uint8 images (N, 28, 28), uint8 labels)."""
    image_file, label_file = FILES[part]
    with gzip.open(pathlib.Path(folder) / image_file, "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(pathlib.Path(folder) / label_file, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def _write_gz(path, data):
    with gzip.open(path, "wb") as f:
        f.write(data)


def _idx_header(magic, *dims):
    return np.array((magic,) + dims, dtype=">u4").tobytes()


@pytest.fixture
def no_tfds_copy(tmp_path, monkeypatch):
    """Points tensorflow_datasets at an empty folder, so no fallback copy exists."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


@pytest.fixture
def partial_dir(tmp_path, fmnist_available):
    """A folder with links to the real t10k files and to the real train images."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for name in FILES["t10k"] + FILES["train"][:1]:
        (folder / name).symlink_to(fmnist_available / name)
    return folder


def test_import_needs_numpy_only():
    import subprocess

    code = (
        "import sys, keras_freetickets.contrib.datasets; "
        "heavy = {'tensorflow', 'tensorflow_datasets', 'sklearn', 'keras'}; "
        "sys.exit(len(heavy & set(sys.modules)))"
    )
    root = str(pathlib.Path(datasets.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode()


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize(
    "split, part, rows",
    [
        ("train", "train", slice(0, 55_000)),
        ("validation", "train", slice(55_000, 60_000)),
        ("test", "t10k", slice(None)),
        ("train_full", "train", slice(None)),
    ],
)
def test_splits_match_direct_read_of_the_files(fmnist_available, split, part, rows):
    x, y = datasets.load_fashion_mnist(split)
    images, labels = _raw_read(fmnist_available, part)
    expected_len = {"train": 55_000, "validation": 5_000, "test": 10_000}.get(split, 60_000)
    assert x.shape == (expected_len, 28, 28, 1) and y.shape == (expected_len,)
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x[..., 0], images[rows].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, labels[rows])
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_validation_is_the_last_5000_of_the_train_file(fmnist_available):
    x_train, _ = datasets.load_fashion_mnist("train", flatten=True)
    x_val, y_val = datasets.load_fashion_mnist("validation", flatten=True)
    x_full, y_full = datasets.load_fashion_mnist("train_full", flatten=True)
    np.testing.assert_array_equal(np.concatenate([x_train, x_val]), x_full)
    np.testing.assert_array_equal(y_val, y_full[-5000:])
    images, _ = _raw_read(fmnist_available, "train")
    np.testing.assert_array_equal(x_val * 255, images[-5000:].reshape(5000, 784))


def test_flatten_and_fresh_arrays(fmnist_available):
    x, y = datasets.load_fashion_mnist("test", flatten=True)
    x4, _ = datasets.load_fashion_mnist("test")
    assert x.shape == (10_000, 784)
    np.testing.assert_array_equal(x, x4.reshape(10_000, 784))
    # Callers may modify what they get: the per-process cache is not affected.
    x[0] = 7.0
    y[0] = 42
    x_again, y_again = datasets.load_fashion_mnist("test", flatten=True)
    assert x_again.max() == 1.0 and y_again[0] != 42
    assert len(datasets.CLASS_NAMES) == 10 and datasets.CLASS_NAMES[9] == "Ankle boot"


def test_data_dir_and_environment_variable(fmnist_available, tmp_path, monkeypatch, no_tfds_copy):
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in FILES["t10k"]:
        (linked / name).symlink_to(fmnist_available / name)
    expected, _ = datasets.load_fashion_mnist("test")
    monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(linked))
    np.testing.assert_array_equal(datasets.load_fashion_mnist("test")[0], expected)
    # An explicit data_dir wins over the environment variable.
    monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(tmp_path / "empty"))
    x, _ = datasets.load_fashion_mnist("test", data_dir=linked)
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(FileNotFoundError, match="environment variable"):
        datasets.load_fashion_mnist("test")


@pytest.mark.parametrize("use_env", [True, False])
def test_missing_files_error_says_how_to_install(tmp_path, monkeypatch, no_tfds_copy, use_env):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    if use_env:
        monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(empty))
        kwargs = {}
    else:
        kwargs = {"data_dir": str(empty)}
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist("train", **kwargs)
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert str(empty / "train-images-idx3-ubyte.gz") in message
    assert "tensorflow_datasets" in message and "download_and_prepare" in message


def test_corrupt_image_files(partial_dir, no_tfds_copy):
    target = partial_dir / "train-images-idx3-ubyte.gz"
    (partial_dir / "train-labels-idx1-ubyte.gz").symlink_to(
        os.path.realpath(partial_dir / "t10k-labels-idx1-ubyte.gz")
    )
    cases = [
        (b"this is not gzip data at all", "not a readable gzip file"),
        (_idx_header(2049, 60000, 28, 28) + bytes(100), "magic number 2049, expected 2051"),
        (_idx_header(2051, 60000, 28) + bytes(100), "expected \\(60000, 28, 28\\)"),
        (_idx_header(2051, 60000, 28, 28) + bytes(100), "after decompression"),
        (b"\x00\x00", "shorter than the 16-byte IDX header"),
    ]
    for data, reason in cases:
        target.unlink()
        if data.startswith(b"this"):
            target.write_bytes(data)
        else:
            _write_gz(target, data)
        with pytest.raises(ValueError, match=reason) as info:
            datasets.load_fashion_mnist("validation", data_dir=partial_dir)
        assert str(target) in str(info.value)


def test_corrupt_label_files(partial_dir, no_tfds_copy):
    target = partial_dir / "train-labels-idx1-ubyte.gz"
    _write_gz(target, _idx_header(2049, 60000) + bytes(59_999))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is corrupt"):
        datasets.load_fashion_mnist("train", data_dir=partial_dir)
    # A rewritten file is read again (the cache key holds size and mtime).
    _write_gz(target, _idx_header(2049, 60000) + bytes([12]) * 60_000)
    with pytest.raises(ValueError, match="labels must be in 0..9, found 12"):
        datasets.load_fashion_mnist("train", data_dir=partial_dir)
    _write_gz(target, _idx_header(2049, 60000) + bytes([3]) * 60_000)
    _, y = datasets.load_fashion_mnist("validation", data_dir=partial_dir)
    assert y.shape == (5000,) and np.all(y == 3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Argument `split` must be one of .*split='val'"):
        datasets.load_fashion_mnist("val")
    with pytest.raises(ValueError, match="Argument `flatten` must be a bool"):
        datasets.load_fashion_mnist("test", flatten="yes")


def _tfds_copy_dir():
    folder = pathlib.Path(
        os.environ.get("TFDS_DATA_DIR") or pathlib.Path.home() / "tensorflow_datasets"
    )
    return folder if list(folder.glob("fashion_mnist/*/dataset_info.json")) else None


@pytest.mark.skipif(
    _tfds_copy_dir() is None,
    reason="no prepared tensorflow_datasets copy of fashion_mnist on this machine",
)
def test_tfds_copy_is_put_back_in_file_order(fmnist_available, tmp_path, monkeypatch):
    expected = {s: datasets.load_fashion_mnist(s) for s in ("test", "validation")}
    monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(tmp_path))
    for split, (x_expected, y_expected) in expected.items():
        x, y = datasets.load_fashion_mnist(split)
        np.testing.assert_array_equal(x, x_expected)
        np.testing.assert_array_equal(y, y_expected)


# ------------------------------------------------------------------ OOD sets


def test_ood_noise():
    x = datasets.load_ood_noise(num_examples=2000, seed=3)
    assert x.shape == (2000, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x, datasets.load_ood_noise(num_examples=2000, seed=3))
    assert not np.array_equal(x, datasets.load_ood_noise(num_examples=2000, seed=4))
    flat = datasets.load_ood_noise(num_examples=2000, seed=3, flatten=True)
    np.testing.assert_array_equal(flat, x.reshape(2000, 784))
    # Standard deviation 0.25: P(N(0.5, 0.25) < 0) = P(Z < -2) = 0.0228 are
    # clipped to 0 (a variance of 0.25 would clip 0.159).
    clipped_low = 0.5 * math.erfc(2 / math.sqrt(2))
    assert np.mean(x == 0.0) == pytest.approx(clipped_low, abs=0.002)
    assert np.mean(x == 1.0) == pytest.approx(clipped_low, abs=0.002)
    assert np.mean(x) == pytest.approx(0.5, abs=0.002)
    with pytest.raises(ValueError, match="Argument `num_examples`"):
        datasets.load_ood_noise(num_examples=0)


def _bilinear_pixel(image, row, col, out_size=28):
    """Half-pixel-center bilinear sample of one output pixel, written out by hand."""
    size = image.shape[0]

    def source(i):
        s = min(max((i + 0.5) * size / out_size - 0.5, 0.0), size - 1)
        lo = int(math.floor(s))
        return lo, min(lo + 1, size - 1), s - lo

    r0, r1, wr = source(row)
    c0, c1, wc = source(col)
    top = image[r0, c0] * (1 - wc) + image[r0, c1] * wc
    bottom = image[r1, c0] * (1 - wc) + image[r1, c1] * wc
    return top * (1 - wr) + bottom * wr


def test_ood_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x = datasets.load_ood_digits()
    assert x.shape == (1797, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert datasets.load_ood_digits(flatten=True).shape == (1797, 784)
    raw = sklearn_datasets.load_digits().images / 16.0
    # Resizing is linear, so the mean image is the resized mean of the 8x8 images.
    mean_raw = raw.mean(axis=0)
    expected = np.array(
        [[_bilinear_pixel(mean_raw, r, c) for c in range(28)] for r in range(28)]
    )
    np.testing.assert_allclose(x.mean(axis=0)[..., 0], expected, atol=1e-5)
    assert x.mean() == pytest.approx(raw.mean(), abs=1e-3)


def test_ood_digits_match_tensorflow_resize():
    pytest.importorskip("sklearn.datasets")
    tf = pytest.importorskip("tensorflow")
    raw = pytest.importorskip("sklearn.datasets").load_digits().images / 16.0
    expected = tf.image.resize(
        raw[..., None].astype(np.float32), (28, 28), method="bilinear"
    ).numpy()
    np.testing.assert_allclose(datasets.load_ood_digits(), expected, atol=1e-6)


def test_ood_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    datasets._load_sklearn_digits.cache_clear()
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        datasets.load_ood_digits()
    datasets._load_sklearn_digits.cache_clear()


# ------------------------------------------------------------------ tf.data


def _batches(dataset):
    return [tuple(np.asarray(t) for t in batch) for batch in dataset]


def test_as_dataset_batches_in_order():
    pytest.importorskip("tensorflow")
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10) % 3
    batches = _batches(datasets.as_dataset(x, y, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    only_x = [np.asarray(b) for b in datasets.as_dataset(x, batch_size=4)]
    np.testing.assert_array_equal(np.concatenate(only_x), x)


@pytest.mark.parametrize("epoch_seeded", [True, False])
def test_as_dataset_shuffle_is_seeded(epoch_seeded):
    pytest.importorskip("tensorflow")
    x = np.arange(64, dtype=np.int64)

    def epochs(seed, num_epochs=2):
        dataset = datasets.as_dataset(
            x, x * 2, batch_size=16, shuffle=True, seed=seed, epoch_seeded=epoch_seeded
        )
        orders = []
        for _ in range(num_epochs):
            batches = _batches(dataset)
            xs = np.concatenate([b[0] for b in batches])
            np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), xs * 2)
            orders.append(xs)
        return orders

    first = epochs(seed=5)
    again = epochs(seed=5)
    other = epochs(seed=6)
    for order in first:
        np.testing.assert_array_equal(np.sort(order), x)  # A permutation.
    assert not np.array_equal(first[0], x)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert np.array_equal(first[0], first[1]) == (not epoch_seeded)


def test_as_dataset_invalid_arguments():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="Argument `batch_size` must be an integer >= 1. Received: batch_size=0"):
        datasets.as_dataset(x, batch_size=0)
    with pytest.raises(ValueError, match=r"len\(x\)=5, len\(y\)=4"):
        datasets.as_dataset(x, np.zeros(4))
