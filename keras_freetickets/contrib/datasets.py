"""Data sets for the benchmarks, tests and examples, in the spirit of `keras.datasets`.

Fashion-MNIST is read from local files only; nothing here downloads. The
loaders return numpy arrays; `as_dataset` turns them into the `tf.data`
pipeline the training scripts use. Importing this module needs numpy alone:
TensorFlow, tensorflow_datasets and scikit-learn are imported inside the
functions that need them. Finding, decoding and caching the files is the job
of the private `_fmnist_files` module.
"""

import functools

import numpy as np

from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_int
from keras_freetickets._validation import check_one_of
from keras_freetickets.contrib import _fmnist_files
from keras_freetickets.contrib._fmnist_files import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
)
from keras_freetickets.contrib._fmnist_files import IMAGE_SIDE as _IMAGE_SIDE

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "NUM_TRAIN",
    "SPLITS",
    "as_dataset",
    "load_fashion_mnist",
    "load_ood_digits",
    "load_ood_noise",
]

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

SPLITS = ("train", "validation", "test", "train_full")
NUM_TRAIN = 55_000  # FMNIST-MLP v1: the last 5,000 train images are validation.


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
    check_one_of("split", split, SPLITS)
    check_bool("flatten", flatten)
    part = "t10k" if split == "test" else "train"
    images, labels = _fmnist_files.load_raw(part, data_dir)
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
    check_bool("flatten", flatten)
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
    check_int("num_examples", num_examples, 1)
    check_int("seed", seed)
    check_bool("flatten", flatten)
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
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed)
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
