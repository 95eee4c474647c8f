"""Shared pytest setup for keras_freetickets.

Environment variables are set before any test module imports TensorFlow or
Keras. Keras itself is imported lazily, so that test modules of the pure-numpy
parts of the library never pay for importing TensorFlow.
"""

import contextlib
import os
import pathlib
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("KFT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fashion_mnist_available():
    """True when the four Fashion-MNIST IDX files are installed."""
    return all((FASHION_MNIST_DIR / name).is_file() for name in FASHION_MNIST_FILES)


# Usage: `@requires_fashion_mnist` on a test that reads the real data set
# (installed by `scripts/setup.sh` from Debian's dataset-fashion-mnist).
requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}; "
    "run `bash scripts/setup.sh` (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def fmnist_available():
    """Skips the test unless Fashion-MNIST is installed; returns its folder."""
    if not fashion_mnist_available():
        pytest.skip(
            f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}; "
            "run `bash scripts/setup.sh`"
        )
    return FASHION_MNIST_DIR


@pytest.fixture(autouse=True)
def _clear_keras_session():
    """Frees Keras' global state (layer names, graphs) after every test.

    Only when the test (or its module) imported Keras: pure-numpy tests stay
    free of the TensorFlow import.
    """
    yield
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()


def subprocess_env(intra_op_threads=2):
    """Environment of a training subprocess: quiet, few threads, CPU only,
    with this checkout first on the import path."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_NUM_INTRAOP_THREADS=str(intra_op_threads),
        PYTHONPATH=os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH")) if p
        ),
    )
    return env


REPO = pathlib.Path(__file__).resolve().parents[1]
# The modules of the scripts that tests load in-process: each defines its
# flags in absl's one global FLAGS.
SCRIPT_MODULES = frozenset(
    path.stem for folder in ("benchmarks", "examples")
    for path in (REPO / folder).glob("*.py")
)


@contextlib.contextmanager
def script_flags_scope():
    """Runs the block with absl's FLAGS free of the scripts' flags.

    A script defines its flags once per process, and two scripts may define
    one name differently (`--epochs` in examples/common.py and in
    benchmarks/fmnist_table.py). pytest-xdist runs a process's test files in
    any order, so a test module that loads a script in-process does it in
    this scope: inside it, FLAGS holds no flag of a script loaded before it
    and those scripts' modules are out of `sys.modules`, so the block's
    scripts import afresh (modules without flags, such as benchkit, stay);
    on exit, the block's flags and flag-defining modules are removed and
    the earlier ones restored.
    """
    from absl import flags

    fv = flags.FLAGS

    def script_flags():
        by_module = fv.flags_by_module_dict()
        return {module: [(flag, fv.find_module_id_defining_flag(flag.name))
                         for flag in by_module[module]]
                for module in by_module if module in SCRIPT_MODULES}

    def remove(by_module):
        for flag_list in by_module.values():
            for flag, _ in flag_list:
                for name in (flag.name, flag.short_name):
                    if name is not None and name in fv:
                        delattr(fv, name)

    def drop_modules(by_module):
        return {name: sys.modules.pop(name) for name in by_module
                if name in sys.modules}

    saved_flags = script_flags()
    remove(saved_flags)
    saved_modules = drop_modules(saved_flags)
    try:
        yield
    finally:
        own_flags = script_flags()
        remove(own_flags)
        drop_modules(own_flags)
        for module, flag_list in saved_flags.items():
            for flag, module_id in flag_list:
                fv[flag.name] = flag
                fv.register_flag_by_module(module, flag)
                if module_id is not None:
                    fv.register_flag_by_module_id(module_id, flag)
        sys.modules.update(saved_modules)
