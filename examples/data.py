"""tensorflow-datasets pipelines for the examples, with an offline Fashion-MNIST.

Every data set goes through `tfds.load(name, split=..., as_supervised=True)`,
then `cache`, `shuffle`, `batch` and `prefetch`.

The offline default: tfds' registered `fashion_mnist` verifies the checksums
of the files it downloads, and Debian's `dataset-fashion-mnist` files are
re-gzipped, so they do not pass. The examples therefore register their own
tfds data set, `fashion_mnist_local` (the `FashionMnistLocal` builder below):
it reads the Debian IDX files through `keras_freetickets.contrib.datasets` and writes
the three splits of the FMNIST-MLP v1 protocol in the files' order (train =
the first 55,000 train images, validation = the last 5,000, test = the 10,000
t10k images). It is prepared once per machine in the tfds data directory
(about 30 s, 38 MB) and read from there afterwards.

`--dataset=fashion_mnist` picks, in this order, without ever waiting on the
network: `fashion_mnist_local` when the Debian files (or
`$KFT_FASHION_MNIST_DIR`) exist or it is already prepared; tfds' own
`fashion_mnist` when it is prepared in the data directory (train[:55000],
train[55000:], test); a download when the machine reaches the internet;
otherwise an error that says how to get the data. Any other tfds name is
loaded if prepared, downloaded if online, and otherwise reported the same way.
Whether the machine is online is probed once, with a 3 s limit.
"""

import contextlib
import dataclasses
import os
import socket
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from common import ExampleError
from keras_freetickets.contrib import datasets as kft_datasets

LOCAL_NAME = "fashion_mnist_local"
FASHION_NAMES = ("fashion_mnist", LOCAL_NAME)
FASHION_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
PROBE_HOST = ("storage.googleapis.com", 443)
PROBE_TIMEOUT_S = 3.0
NOISE_EXAMPLES = 10_000


def _define_local_builder():
    """Defines (and so registers with tfds) the `fashion_mnist_local` builder once."""
    if LOCAL_NAME in tfds.list_builders(with_community_datasets=False):
        return tfds.builder_cls(LOCAL_NAME)

    class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
        """Fashion-MNIST from local IDX files, in the FMNIST-MLP v1 splits."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "From Debian's dataset-fashion-mnist files."}
        # tfds looks for metadata and checksum files beside the builder's
        # code; this one has none (and nothing to download).
        pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    "Fashion-MNIST (Xiao et al., 2017) read from local IDX "
                    "files (Debian's dataset-fashion-mnist). Splits of "
                    "FMNIST-MLP v1: train = first 55,000 train images, "
                    "validation = last 5,000, test = the 10,000 t10k images, "
                    "in the files' order."
                ),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(
                        names=list(kft_datasets.CLASS_NAMES)
                    ),
                }),
                supervised_keys=("image", "label"),
                homepage="https://github.com/zalandoresearch/fashion-mnist",
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {
                split: self._generate_examples(split)
                for split in ("train", "validation", "test")
            }

        def _generate_examples(self, split):
            x, y = kft_datasets.load_fashion_mnist(split)
            images = np.round(x * 255.0).astype(np.uint8)
            for index in range(len(y)):
                yield index, {"image": images[index], "label": int(y[index])}

    return FashionMnistLocal


FashionMnistLocal = _define_local_builder()


@contextlib.contextmanager
def _quiet():
    """Hides tfds' warning about a data set folder that is not prepared yet."""
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _builder(name, data_dir):
    with _quiet():
        if name == LOCAL_NAME:
            return FashionMnistLocal(data_dir=data_dir)
        return tfds.builder(name, data_dir=data_dir)


def _is_prepared(name, data_dir):
    folder = os.path.join(data_dir, name.split(":")[0])
    return os.path.isdir(folder) and _builder(name, data_dir).is_prepared()


@dataclasses.dataclass
class Source:
    """Where a data set's splits come from."""

    name: str  # the --dataset value
    tfds_name: str  # what tfds.load reads
    splits: dict  # role ("train", "validation", "test") -> (split, start, stop)
    description: str
    fashion: bool  # Fashion-MNIST: OOD sets exactly as BENCHMARK.md

    def split(self, role, limit=0):
        """The tfds split of `role`, cut to its first `limit` examples (0: all)."""
        base, start, stop = self.splits[role]
        if limit:
            first = start or 0
            stop = first + limit if stop is None else min(stop, first + limit)
        if start is None and stop is None:
            return base
        return f"{base}[{'' if start is None else start}:" \
               f"{'' if stop is None else stop}]"


def default_data_dir(data_dir=None):
    return os.path.abspath(os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR")
        or os.path.join("~", "tensorflow_datasets")
    ))


def local_fashion_files_available():
    """True when the four Fashion-MNIST IDX files are where keras_freetickets looks."""
    folder = os.environ.get(kft_datasets.FASHION_MNIST_DIR_ENV) or (
        kft_datasets.DEFAULT_FASHION_MNIST_DIR
    )
    return all(os.path.isfile(os.path.join(folder, f)) for f in FASHION_FILES)


def online(timeout=PROBE_TIMEOUT_S):
    """Whether tfds' download host answers within `timeout` s (never waits longer)."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # a direct probe says nothing behind a proxy
    answered = []

    def probe():
        try:
            socket.create_connection(PROBE_HOST, timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


def _prepare_local_fashion(data_dir, log):
    if _is_prepared(LOCAL_NAME, data_dir):
        return
    builder = _builder(LOCAL_NAME, data_dir)
    log(
        f"[data] registering Fashion-MNIST from the local IDX files as the "
        f"tfds data set '{LOCAL_NAME}' in {data_dir} (once per machine, "
        "about 30 s)"
    )
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - reported as one line
        # Another process may have prepared it at the same time.
        if not _is_prepared(LOCAL_NAME, data_dir):
            raise ExampleError(
                f"could not prepare {LOCAL_NAME} in {data_dir}: {error}"
            ) from None
    finally:
        tfds.enable_progress_bar()


def _missing_fashion_message(data_dir):
    return (
        "Fashion-MNIST is not available on this machine and it cannot be "
        "downloaded (offline). Install Debian's package with `sudo apt-get "
        "install dataset-fashion-mnist` (or run `bash scripts/setup.sh`), or "
        f"set {kft_datasets.FASHION_MNIST_DIR_ENV} to a folder holding "
        f"{', '.join(FASHION_FILES)}, or run `tfds build fashion_mnist` on a "
        f"machine with internet and copy its fashion_mnist folder into "
        f"{data_dir}."
    )


def resolve(name, data_dir=None, log=print):
    """Finds (preparing it if needed) the tfds data set behind `--dataset=name`.

    Args:
        name: str. The `--dataset` flag.
        data_dir: str or None. The tfds data directory.
        log: callable for progress messages.

    Returns:
        A `Source`.
    """
    data_dir = default_data_dir(data_dir)
    base = name.split(":")[0].split("/")[0]
    if base in FASHION_NAMES:
        if local_fashion_files_available() or _is_prepared(LOCAL_NAME,
                                                           data_dir):
            _prepare_local_fashion(data_dir, log)
            return Source(
                name, LOCAL_NAME,
                {"train": ("train", None, None),
                 "validation": ("validation", None, None),
                 "test": ("test", None, None)},
                f"{LOCAL_NAME} (local Fashion-MNIST files) in {data_dir}",
                fashion=True,
            )
        if base == LOCAL_NAME:
            raise ExampleError(_missing_fashion_message(data_dir))
        if _is_prepared("fashion_mnist", data_dir):
            return Source(
                name, "fashion_mnist",
                {"train": ("train", 0, kft_datasets.NUM_TRAIN),
                 "validation": ("train", kft_datasets.NUM_TRAIN, None),
                 "test": ("test", None, None)},
                f"tfds fashion_mnist in {data_dir}", fashion=True,
            )
        if not online():
            raise ExampleError(_missing_fashion_message(data_dir))
        name = "fashion_mnist"
    try:
        prepared = _is_prepared(name, data_dir)
        builder = _builder(name, data_dir) if prepared else None
    except Exception as error:  # noqa: BLE001 - DatasetNotFoundError and kin
        raise ExampleError(f"flag --dataset={name}: {error}") from None
    if not prepared:
        if not online():
            raise ExampleError(
                f"data set {name} is not prepared in {data_dir} and this "
                "machine cannot reach the internet to download it. On a "
                f"machine with internet run `tfds build {name}` (or "
                f"`tfds.builder('{name}').download_and_prepare()`) and copy "
                f"the folder {name.split(':')[0].split('/')[0]} of its "
                "~/tensorflow_datasets into "
                f"{data_dir} (or pass --data_dir), or use the offline default "
                "--dataset=fashion_mnist."
            )
        log(f"[data] downloading and preparing {name} into {data_dir}")
        try:
            builder = _builder(name, data_dir)
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001
            raise ExampleError(
                f"could not download {name}: {error}. Prepare it on a machine "
                f"with internet (`tfds build {name}`) and copy it into "
                f"{data_dir}."
            ) from None
    splits = builder.info.splits
    if "train" not in splits:
        raise ExampleError(
            f"flag --dataset={name}: it has no 'train' split "
            f"(splits: {sorted(splits)})"
        )
    if "test" not in splits:
        raise ExampleError(
            f"flag --dataset={name}: it has no 'test' split "
            f"(splits: {sorted(splits)})"
        )
    if "validation" in splits:
        roles = {"train": ("train", None, None),
                 "validation": ("validation", None, None)}
    else:
        total = splits["train"].num_examples
        held = min(5000, total // 10)
        roles = {"train": ("train", 0, total - held),
                 "validation": ("train", total - held, None)}
    roles["test"] = ("test", None, None)
    return Source(name, name, roles, f"tfds {name} in {data_dir}",
                  fashion=(name.split(":")[0] == "fashion_mnist"))


def _info(source, data_dir):
    builder = _builder(source.tfds_name, default_data_dir(data_dir))
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not isinstance(keys[0], str):
        raise ExampleError(
            f"flag --dataset={source.name}: the examples need a data set of "
            f"(image, label) pairs (as_supervised); it has "
            f"supervised_keys={keys!r}"
        )
    label = info.features[keys[1]]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ExampleError(
            f"flag --dataset={source.name}: its label '{keys[1]}' is not a "
            "class label"
        )
    image = info.features[keys[0]]
    shape = tuple(image.shape)
    if len(shape) != 3 or any(d is None for d in shape):
        raise ExampleError(
            f"flag --dataset={source.name}: the examples need images of a "
            f"fixed shape (height, width, channels); '{keys[0]}' has shape "
            f"{shape}"
        )
    return {"input_shape": shape, "num_classes": int(label.num_classes),
            "class_names": list(label.names)}


def _normalize(image, label):
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    else:
        image = tf.cast(image, tf.float32)
    return image, tf.cast(label, tf.int64)


def _crop_flip(seed, pad=4):
    def augment(image, label):
        shape = tf.shape(image)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], "REFLECT")
        image = tf.image.random_crop(padded, shape, seed=seed)
        image = tf.image.random_flip_left_right(image, seed=seed)
        return image, label

    return augment


def pipeline(source, role, data_dir=None, batch_size=128, limit=0,
             shuffle=False, seed=0, augment=False, drop_remainder=False):
    """`tfds.load(..., as_supervised=True)`, then cache, shuffle, batch, prefetch.

    Images become float32 in [0, 1], labels int64.

    Args:
        source: a `Source` from `resolve`.
        role: "train", "validation" or "test".
        data_dir: tfds data directory.
        batch_size: int. Global batch size.
        limit: int. Only the first `limit` examples of the split (0: all).
        shuffle: bool. Shuffle (full buffer, reshuffled every epoch, seeded).
        seed: int. Seed of the shuffle and the augmentation.
        augment: bool. Random 4-pixel-pad crop and horizontal flip.
        drop_remainder: bool. Drop the last smaller batch (TPUs).

    Returns:
        `(dataset, num_examples)`.
    """
    split = source.split(role, limit)
    dataset = tfds.load(
        source.tfds_name, split=split, as_supervised=True,
        data_dir=default_data_dir(data_dir), download=False,
        shuffle_files=False,
    )
    num_examples = int(dataset.cardinality())
    dataset = dataset.map(_normalize, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(max(num_examples, 1), seed=seed,
                                  reshuffle_each_iteration=True)
    if augment:
        dataset = dataset.map(_crop_flip(seed),
                              num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    # tfds writes small data sets as one file, which multi-worker training
    # cannot shard by file: shard by example instead (every worker draws the
    # same seeded order and keeps its own share of each batch).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE), num_examples


@dataclasses.dataclass
class TrainingData:
    source: Source
    train: tf.data.Dataset
    validation: tf.data.Dataset
    num_train: int
    num_validation: int
    input_shape: tuple
    num_classes: int
    class_names: list

    def summary(self):
        return {
            "dataset": self.source.name,
            "tfds_name": self.source.tfds_name,
            "source": self.source.description,
            "train_split": self.source.split("train"),
            "num_train": self.num_train,
            "num_validation": self.num_validation,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def load_training_data(name, data_dir=None, batch_size=128, train_examples=0,
                       eval_examples=0, seed=0, augment=False,
                       drop_remainder=False, log=print):
    """Resolves `--dataset` and builds the train and validation pipelines."""
    source = resolve(name, data_dir, log=log)
    meta = _info(source, data_dir)
    train, num_train = pipeline(
        source, "train", data_dir, batch_size, train_examples, shuffle=True,
        seed=seed, augment=augment, drop_remainder=drop_remainder,
    )
    validation, num_validation = pipeline(
        source, "validation", data_dir, batch_size, eval_examples,
        drop_remainder=drop_remainder,
    )
    if num_train < (batch_size if drop_remainder else 1):
        raise ExampleError(
            f"flag --train_examples={train_examples}: {num_train} training "
            f"examples do not fill one batch of {batch_size}"
        )
    log(
        f"[data] {source.description}: {num_train} train / {num_validation} "
        f"validation examples, input {meta['input_shape']}, "
        f"{meta['num_classes']} classes"
    )
    return TrainingData(source, train, validation, num_train, num_validation,
                        meta["input_shape"], meta["num_classes"],
                        meta["class_names"])


def load_test_arrays(name, data_dir=None, eval_examples=0, log=print):
    """The test split as numpy arrays `(x, y)`, with the `Source`."""
    source = resolve(name, data_dir, log=log)
    dataset, count = pipeline(source, "test", data_dir, batch_size=4096,
                              limit=eval_examples)
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), source


def ood_sets(input_shape, fashion, limit=0, seed=0):
    """The out-of-distribution sets of BENCHMARK.md, shaped like the inputs.

    For Fashion-MNIST, exactly `keras_freetickets.contrib.datasets.load_ood_digits()`
    and `load_ood_noise(10000, seed=0)`. For other image shapes: the same
    scikit-learn digits resized to the input's height and width (bilinear)
    and repeated over its channels, and the same Gaussian noise recipe
    (N(0.5, 0.25) clipped to [0, 1]) at the input's shape.

    Args:
        input_shape: tuple (height, width, channels).
        fashion: bool. Whether the data set is Fashion-MNIST.
        limit: int. At most this many examples per set (0: all).
        seed: int. Seed of the noise.

    Returns:
        dict name -> float32 array of images.
    """
    count = NOISE_EXAMPLES if not limit else min(limit, NOISE_EXAMPLES)
    height, width, channels = input_shape
    if fashion and tuple(input_shape) == (28, 28, 1):
        digits = kft_datasets.load_ood_digits()
        noise = kft_datasets.load_ood_noise(num_examples=count, seed=seed)
    else:
        from sklearn.datasets import load_digits

        small = (load_digits().images / 16.0).astype(np.float32)[..., None]
        digits = tf.image.resize(small, (height, width), method="bilinear")
        digits = np.repeat(np.clip(digits.numpy(), 0.0, 1.0), channels,
                           axis=-1).astype(np.float32)
        rng = np.random.default_rng(seed)
        noise = np.clip(rng.normal(0.5, 0.25, size=(count,) + tuple(input_shape)),
                        0.0, 1.0).astype(np.float32)
    if limit:
        digits = digits[:limit]
    return {"digits": digits, "noise": noise}
