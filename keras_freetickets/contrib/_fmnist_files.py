"""Reading Fashion-MNIST from its IDX files, or from a prepared tensorflow_datasets copy.

The private half of `keras_freetickets.contrib.datasets`: `load_raw` finds the
files (argument, environment variable, Debian's folder), decodes and checks
them, and caches the result; when the files are absent it falls back to a copy
of `fashion_mnist` that tensorflow_datasets has already prepared, put back
into the files' order. Nothing here downloads. Importing it needs numpy alone.
"""

import functools
import gzip
import hashlib
import os
import zlib

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "KFT_FASHION_MNIST_DIR"
IMAGE_SIDE = 28

_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
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


def _resolve_dir(data_dir):
    """Returns (folder, how it was chosen) for the Fashion-MNIST IDX files."""
    if data_dir is not None:
        return os.fspath(data_dir), f"from data_dir={os.fspath(data_dir)!r}"
    from_env = os.environ.get(FASHION_MNIST_DIR_ENV)
    if from_env:
        return from_env, f"from the {FASHION_MNIST_DIR_ENV} environment variable"
    return DEFAULT_FASHION_MNIST_DIR, "the default folder"


def load_raw(part, data_dir):
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
    expected_shape = (num_examples, IMAGE_SIDE, IMAGE_SIDE)[: len(shape)]
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
    expected = (num_examples, IMAGE_SIDE, IMAGE_SIDE, 1)
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
