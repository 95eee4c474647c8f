"""Data sets for the benchmarks, tests and examples, in the spirit of `keras.datasets`.

Fashion-MNIST is read from local files only; nothing here downloads. The
loaders return numpy arrays; `as_dataset` turns them into the `tf.data`
pipeline the training scripts use. Importing this module needs numpy alone:
TensorFlow, tensorflow_datasets and scikit-learn are imported inside the
functions that need them.
"""

import functools
import gzip
import hashlib
import os
import zlib

import numpy as np

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "KFT_FASHION_MNIST_DIR"

SPLITS = ("train", "validation", "test", "train_full")
NUM_TRAIN = 55_000  # FMNIST-MLP v1: the last 5,000 train images are validation.

_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
_IMAGE_SIDE = 28
# part -> (images file, labels file, number of examples, tfds split name)
_PARTS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000, "train"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000, "test"),
}
_INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    f"the files go to {DEFAULT_FASHION_MNIST_DIR}/), point `data_dir=` or the "
    f"{FASHION_MNIST_DIR_ENV} environment variable at a folder holding the four "
    "IDX .gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), or, on a machine with "
    "internet, `pip install tensorflow-datasets` and run "
    "`python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('fashion_mnist').download_and_prepare()\"` once."
)


def load_fashion_mnist(split="train", flatten=False, data_dir=None):
    """Loads one split of Fashion-MNIST as float32 images in [0, 1] and int64 labels.

    The splits follow BENCHMARK.md's FMNIST-MLP v1 protocol: `"train"` is the
    first 55,000 images of the train file, `"validation"` the last 5,000,
    `"test"` the 10,000 t10k images, and `"train_full"` all 60,000 train
    images, always in the files' order. Pixels are divided by 255. The data is
    looked for, in this order: the IDX files in `data_dir` (when given), else
    in the folder named by the `KFT_FASHION_MNIST_DIR` environment variable,
    else in `/usr/share/datasets/fashion-mnist/` (Debian's
    `dataset-fashion-mnist` package); when those files are absent, a copy of
    `fashion_mnist` that tensorflow_datasets has already prepared on this
    machine (its data dir, `TFDS_DATA_DIR` or `~/tensorflow_datasets`; never
    downloaded here), put back into the files' order. Otherwise a
    `FileNotFoundError` says how to install the data. A file that exists but is
    damaged raises a `ValueError` naming it. The decoded files are cached for
    the life of the process; every call returns fresh arrays.

    Args:
        split: str. One of `"train"`, `"validation"`, `"test"`,
            `"train_full"`.
        flatten: bool. If True, images have shape `(N, 784)`, else
            `(N, 28, 28, 1)`.
        data_dir: str, path or None. Folder holding the four
            `*-ubyte.gz` IDX files. None uses `KFT_FASHION_MNIST_DIR`, then the
            Debian folder.

    Returns:
        A tuple `(x, y)`: `x` float32 images in [0, 1], `y` int64 labels in
        0..9 (names in `CLASS_NAMES`).

    Example:

    ```python
    from keras_freetickets.contrib import datasets

    x_train, y_train = datasets.load_fashion_mnist("train", flatten=True)
    x_val, y_val = datasets.load_fashion_mnist("validation", flatten=True)
    print(x_train.shape, x_val.shape)  # (55000, 784) (5000, 784)
    ```
    """
    if split not in SPLITS:
        raise ValueError(
            f"Argument `split` must be one of {SPLITS}. Received: split={split!r}"
        )
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(
            f"Argument `flatten` must be a bool. Received: flatten={flatten!r}"
        )
    part = "t10k" if split == "test" else "train"
    images, labels = _load_raw(part, data_dir)
    if split == "train":
        rows = slice(0, NUM_TRAIN)
    elif split == "validation":
        rows = slice(NUM_TRAIN, None)
    else:
        rows = slice(None)
    x = images[rows].astype(np.float32)
    x /= np.float32(255.0)
    y = labels[rows].astype(np.int64)
    return _shape_images(x, flatten), y


def load_ood_digits(flatten=False):
    """Loads scikit-learn's 8x8 handwritten digits as 28x28 out-of-distribution images.

    The 1,797 images of `sklearn.datasets.load_digits()` (integers 0..16) are
    scaled to [0, 1] by dividing by 16, then enlarged to 28x28 by bilinear
    interpolation with half-pixel centers, computed in numpy. The result equals
    `tf.image.resize(images, (28, 28), method="bilinear")` (TensorFlow's
    default, `antialias=False`) to float32 rounding; the tests check this.
    Digits are the near out-of-distribution set of the FMNIST benchmarks: gray
    strokes on black, like Fashion-MNIST, but not clothes.

    Args:
        flatten: bool. If True, images have shape `(1797, 784)`, else
            `(1797, 28, 28, 1)`.

    Returns:
        float32 array of images in [0, 1].

    Example:

    ```python
    from keras_freetickets.contrib import datasets

    x_ood = datasets.load_ood_digits(flatten=True)  # (1797, 784)
    ```
    """
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(
            f"Argument `flatten` must be a bool. Received: flatten={flatten!r}"
        )
    digits = _load_sklearn_digits()
    x = _resize_bilinear(digits / 16.0, _IMAGE_SIDE, _IMAGE_SIDE)
    return _shape_images(x.astype(np.float32), flatten)


def load_ood_noise(num_examples=10_000, seed=0, flatten=False):
    """Makes Gaussian-noise images, the far out-of-distribution set of the FMNIST benchmarks.

    Each pixel is drawn independently from a normal distribution with mean 0.5
    and standard deviation 0.25 (so 0.25 is the scale, not the variance), then
    clipped to [0, 1]. The draw uses `numpy.random.default_rng(seed)`, so a
    seed always gives the same images.

    Args:
        num_examples: int. Number of images, at least 1.
        seed: int. Seed of the numpy generator.
        flatten: bool. If True, images have shape `(num_examples, 784)`, else
            `(num_examples, 28, 28, 1)`.

    Returns:
        float32 array of images in [0, 1].

    Example:

    ```python
    from keras_freetickets.contrib import datasets

    x_noise = datasets.load_ood_noise(num_examples=1000, seed=0)
    ```
    """
    if (
        isinstance(num_examples, (bool, np.bool_))
        or not isinstance(num_examples, (int, np.integer))
        or num_examples < 1
    ):
        raise ValueError(
            "Argument `num_examples` must be a positive int. "
            f"Received: num_examples={num_examples!r}"
        )
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Argument `seed` must be an int. Received: seed={seed!r}")
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(
            f"Argument `flatten` must be a bool. Received: flatten={flatten!r}"
        )
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 0.25, size=(int(num_examples), _IMAGE_SIDE, _IMAGE_SIDE))
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return _shape_images(x, flatten)


def as_dataset(x, y=None, batch_size=128, shuffle=False, seed=0, epoch_seeded=True):
    """Wraps arrays in the deterministic-order `tf.data` pipeline used by the training scripts.

    The pipeline is `from_tensor_slices`, then (when `shuffle`) a full-buffer
    `shuffle` with the given `seed`, then `batch` (the last batch may be
    smaller) and `prefetch`. The arrays are already in memory, so no `cache()`
    step is added: it would only hold a second copy. The order of examples is
    a function of `seed`, TensorFlow's global seed (set by
    `keras.utils.set_random_seed`) and the number of passes already made over
    this dataset object, so two runs with the same seeds see the same batches
    in the same order. With `epoch_seeded=True` each pass (epoch) draws a new
    order from that fixed sequence (`reshuffle_each_iteration=True`); with
    `epoch_seeded=False` one seeded order is used for every epoch. For a run
    resumed from a backup in a new process to see exactly the batches of an
    uninterrupted run, use `epoch_seeded=False` (or `shuffle=False`): the
    reshuffled sequence restarts at its first order in a new process.

    Args:
        x: array of inputs, first axis the examples.
        y: array of targets with the same first dimension, or None for a
            dataset of inputs only.
        batch_size: int. Examples per batch, at least 1.
        shuffle: bool. Whether to shuffle the examples.
        seed: int. Seed of the shuffle.
        epoch_seeded: bool. Reshuffle at every pass (True) or keep one seeded
            order (False). Ignored when `shuffle=False`.

    Returns:
        A `tf.data.Dataset` of `x` batches, or of `(x, y)` batches.

    Example:

    ```python
    from keras_freetickets.contrib import datasets

    x, y = datasets.load_fashion_mnist("train", flatten=True)
    train_ds = datasets.as_dataset(x, y, batch_size=128, shuffle=True, seed=0)
    ```
    """
    if (
        isinstance(batch_size, (bool, np.bool_))
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            "Argument `batch_size` must be a positive int. "
            f"Received: batch_size={batch_size!r}"
        )
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Argument `seed` must be an int. Received: seed={seed!r}")
    num_examples = len(x)
    if y is not None and len(y) != num_examples:
        raise ValueError(
            "Arguments `x` and `y` must have the same number of examples. "
            f"Received: len(x)={num_examples}, len(y)={len(y)}"
        )
    if num_examples < 1:
        raise ValueError("Argument `x` must hold at least one example. Received: len(x)=0")

    import tensorflow as tf

    data = x if y is None else (x, y)
    dataset = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        dataset = dataset.shuffle(
            num_examples, seed=int(seed), reshuffle_each_iteration=bool(epoch_seeded)
        )
    return dataset.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Private helpers.


def _shape_images(x, flatten):
    if flatten:
        return x.reshape(len(x), _IMAGE_SIDE * _IMAGE_SIDE)
    return x.reshape(len(x), _IMAGE_SIDE, _IMAGE_SIDE, 1)


def _resolve_dir(data_dir):
    """Returns (folder, how it was chosen) for the Fashion-MNIST IDX files."""
    if data_dir is not None:
        return os.fspath(data_dir), f"from data_dir={os.fspath(data_dir)!r}"
    from_env = os.environ.get(FASHION_MNIST_DIR_ENV)
    if from_env:
        return from_env, f"from the {FASHION_MNIST_DIR_ENV} environment variable"
    return DEFAULT_FASHION_MNIST_DIR, "the default folder"


def _load_raw(part, data_dir):
    """Returns read-only uint8 arrays (images (N, 28, 28), labels (N,)) of a file pair."""
    image_name, label_name, num_examples, tfds_split = _PARTS[part]
    folder, how = _resolve_dir(data_dir)
    image_path = os.path.abspath(os.path.join(folder, image_name))
    label_path = os.path.abspath(os.path.join(folder, label_name))
    missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
    if not missing:
        images = _read_idx_cached(image_path, _IMAGE_MAGIC, num_examples)
        labels = _read_idx_cached(label_path, _LABEL_MAGIC, num_examples)
        if labels.max() > 9:
            raise ValueError(
                f"Fashion-MNIST file {label_path} is corrupt: labels must be in "
                f"0..9, found {int(labels.max())}."
            )
        return images, labels

    tfds_data = _load_tfds_if_prepared(tfds_split, num_examples)
    if tfds_data is not None:
        return tfds_data
    raise FileNotFoundError(
        f"Fashion-MNIST was not found: missing {', '.join(missing)} "
        f"(folder {folder!r}, {how}), and no prepared tensorflow_datasets copy "
        f"of 'fashion_mnist' in {_tfds_data_dir()!r}. {_INSTALL_HINT}"
    )


def _read_idx_cached(path, magic, num_examples):
    # The file's size and modification time are part of the cache key, so a
    # file replaced on disk is read again.
    stat = os.stat(path)
    return _read_idx(path, magic, num_examples, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx(path, magic, num_examples, file_size, mtime_ns):
    """Decodes a gzipped IDX file into a read-only uint8 array, checking its header."""
    del file_size, mtime_ns  # Only part of the cache key.
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: it is not a readable gzip "
            f"file ({type(e).__name__}: {e})."
        ) from None
    kind = "images" if magic == _IMAGE_MAGIC else "labels"
    header_size = 16 if magic == _IMAGE_MAGIC else 8
    if len(data) < header_size:
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: {len(data)} bytes, shorter "
            f"than the {header_size}-byte IDX header of an {kind} file."
        )
    header = np.frombuffer(data, dtype=">u4", count=header_size // 4)
    if int(header[0]) != magic:
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: magic number {int(header[0])}, "
            f"expected {magic} (IDX {kind} file)."
        )
    shape = tuple(int(d) for d in header[1:])
    expected_shape = (num_examples, _IMAGE_SIDE, _IMAGE_SIDE)[: len(shape)]
    if shape != expected_shape:
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: its header gives shape "
            f"{shape}, expected {expected_shape}."
        )
    expected_bytes = header_size + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise ValueError(
            f"Fashion-MNIST file {path} is corrupt: {len(data)} bytes after "
            f"decompression, expected {expected_bytes} for shape {shape}."
        )
    # A view of an immutable bytes object: the array is read-only.
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _tfds_data_dir():
    # tfds reads TFDS_DATA_DIR once, when it is imported; read it at call time.
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def _load_tfds_if_prepared(split, num_examples):
    """Reads a locally prepared tfds `fashion_mnist` split in the IDX files' order, or None."""
    tfds_dir = _tfds_data_dir()
    if not os.path.isdir(os.path.join(tfds_dir, "fashion_mnist")):
        return None
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    try:
        builder = tfds.builder("fashion_mnist", data_dir=tfds_dir)
        if hasattr(builder, "is_prepared"):
            prepared = builder.is_prepared()
        else:
            prepared = os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))
    except Exception:  # A broken tfds install is the same as no tfds copy.
        return None
    if not prepared:
        return None
    return _read_tfds(
        str(builder.data_dir), split, num_examples, bool(builder.info.disable_shuffling)
    )


@functools.lru_cache(maxsize=4)
def _read_tfds(builder_dir, split, num_examples, disable_shuffling):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_dir)
    data = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    )
    images = np.asarray(data["image"], dtype=np.uint8)
    labels = np.asarray(data["label"], dtype=np.uint8)
    expected = (num_examples, _IMAGE_SIDE, _IMAGE_SIDE, 1)
    if images.shape != expected or labels.shape != (num_examples,):
        raise ValueError(
            f"The tensorflow_datasets copy of fashion_mnist in {builder_dir} has "
            f"images of shape {images.shape} and labels of shape {labels.shape} "
            f"in split {split!r}, expected {expected} and ({num_examples},)."
        )
    images = images.reshape(expected[:3])
    if not disable_shuffling:
        # tfds writes the examples sorted by md5(split name + str(key)), where
        # the key of fashion_mnist is the example's index in the IDX file
        # (tfds' hashing is kept stable across versions, as the order of every
        # data set depends on it). Undo that permutation.
        order = _tfds_record_order(split, num_examples)
        restored_images = np.empty_like(images)
        restored_labels = np.empty_like(labels)
        restored_images[order] = images
        restored_labels[order] = labels
        images, labels = restored_images, restored_labels
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _tfds_record_order(split, num_examples):
    """Returns, for each tfds record position, the index of that example in the IDX file."""
    salted = hashlib.md5(split.encode("utf-8"))
    hashes = []
    for key in range(num_examples):
        md5 = salted.copy()
        md5.update(str(key).encode("utf-8"))
        hashes.append(md5.hexdigest())
    # Equal-length hex strings sort like the 128-bit integers they spell.
    return np.array(sorted(range(num_examples), key=hashes.__getitem__))


@functools.lru_cache(maxsize=1)
def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "load_ood_digits needs scikit-learn. Install it with "
            "`pip install scikit-learn`, or install keras_freetickets with its "
            "`datasets` or `test` extra (`pip install keras_freetickets[datasets]`)."
        ) from None
    images = np.asarray(load_digits().images, dtype=np.float64)
    images.setflags(write=False)
    return images


def _bilinear_weights(in_size, out_size):
    """Source indices and weights of half-pixel-center bilinear resizing along one axis."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, src - lower


def _resize_bilinear(images, height, width):
    """Resizes (N, h, w) images with bilinear interpolation and half-pixel centers."""
    rows_lo, rows_hi, row_w = _bilinear_weights(images.shape[1], height)
    cols_lo, cols_hi, col_w = _bilinear_weights(images.shape[2], width)
    rows = (
        images[:, rows_lo, :] * (1.0 - row_w)[None, :, None]
        + images[:, rows_hi, :] * row_w[None, :, None]
    )
    return rows[:, :, cols_lo] * (1.0 - col_w) + rows[:, :, cols_hi] * col_w
