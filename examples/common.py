"""Flags and checks shared by the example scripts; imports absl and the stdlib only.

Every flag of the examples is described once, in `FLAG_SPECS`; a script
defines the ones it uses with `define(...)` (each flag once per process, so
several scripts can be imported into one process, as the tests do) and runs
`main` through `run`, which:

- parses the flags with a parser that turns every flag error (a value out of
  range, an unknown flag, a value of the wrong type) into ONE line on stderr
  and exit status 2, instead of absl's usage text;
- turns an `ExampleError` raised by `main` (unwritable output folder, unknown
  data set, missing data...) into one line on stderr and exit status 1, with
  no traceback.

Everything that a flag alone can get wrong is checked before TensorFlow is
imported: ranges by absl validators at parse time, the output folder and the
data set's name by `check_output_dir` and `check_dataset_name`, which the
scripts call first thing in `main`.
"""

import os
import sys
import tempfile

from absl import app
from absl import flags

FLAGS = flags.FLAGS

MODELS = ("mlp", "cnn", "resnet20", "wrn28_10")
DISTRIBUTIONS = ("erk", "er", "uniform")
GROW_MODES = ("gradient", "random")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
AUGMENT = ("auto", "none", "crop_flip")
# Names the examples know without asking tensorflow-datasets.
LOCAL_DATASETS = ("fashion_mnist", "fashion_mnist_local")


class ExampleError(Exception):
    """An error the scripts report as one line, without a traceback."""


# ------------------------------------------------------------------ flags
def _in(low, high, low_open=False, high_open=False):
    def check(value):
        if value is None:
            return True
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


def _at_least(minimum):
    return lambda value: value is None or value >= minimum


def _spec(kind, default, help_text, validator=None, message=None, **kwargs):
    return dict(kind=kind, default=default, help=help_text,
                validator=validator, message=message, kwargs=kwargs)


# Every flag of the examples: name -> definition. A script defines the ones
# it uses with `define(...)`.
FLAG_SPECS = {
    # --- data
    "dataset": _spec(
        "string", "fashion_mnist",
        "A tensorflow-datasets name of an image classification data set "
        "(for example fashion_mnist, mnist, cifar10). The default works "
        "offline: fashion_mnist is read from Debian's dataset-fashion-mnist "
        "files (/usr/share/datasets/fashion-mnist, or $KFT_FASHION_MNIST_DIR) "
        "and registered once per machine as the tfds data set "
        "'fashion_mnist_local' in --data_dir; without those files it is "
        "tfds' own fashion_mnist (downloaded when the machine is online). "
        "Splits: train / validation / test; a data set without a validation "
        "split gives the last min(5000, 10%) of its train split.",
    ),
    "data_dir": _spec(
        "string", None,
        "tensorflow-datasets data directory (default: $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets).",
    ),
    "train_examples": _spec(
        "integer", 0,
        "Use only the first N training examples (0: all). For quick tries.",
        _at_least(0), "Argument `train_examples` must be >= 0 (0: all).",
    ),
    "eval_examples": _spec(
        "integer", 0,
        "Use only the first N validation, test and out-of-distribution "
        "examples (0: all).",
        _at_least(0), "Argument `eval_examples` must be >= 0 (0: all).",
    ),
    "batch_size": _spec(
        "integer", 128,
        "Global batch size of training (split over the replicas of "
        "--strategy) and of prediction.",
        _at_least(1), "Argument `batch_size` must be >= 1.",
    ),
    "seed": _spec(
        "integer", 0,
        "Random seed: initial weights, masks, data order. DST member i uses "
        "seed + i.",
        _at_least(0), "Argument `seed` must be >= 0.",
    ),
    # --- model
    "model": _spec(
        "enum", "mlp",
        "Network: mlp (784-300-100-10, FMNIST-MLP v1), cnn (FMNIST-CNN v1), "
        "resnet20 (CIFAR ResNet-20) or wrn28_10 (Wide ResNet-28-10, the "
        "paper's CIFAR model; for accelerators).",
        enum_values=list(MODELS),
    ),
    "l2": _spec(
        "float", 5e-4, "L2 penalty on every kernel (keras.regularizers.L2).",
        _at_least(0.0), "Argument `l2` must be >= 0.",
    ),
    "augment": _spec(
        "enum", "auto",
        "Training-set augmentation: crop_flip (4-pixel pad, random crop, "
        "horizontal flip), none, or auto (crop_flip for resnet20 and "
        "wrn28_10, none otherwise).",
        enum_values=list(AUGMENT),
    ),
    # --- sparse training
    "sparsity": _spec(
        "float", 0.8,
        "Global sparsity S in [0, 1): the fraction of prunable weights "
        "(kernels; never biases) that are zero.",
        _in(0.0, 1.0, high_open=True),
        "Argument `sparsity` must be in [0, 1).",
    ),
    "distribution": _spec(
        "enum", "erk",
        "Per-layer sparsity distribution: erk (Erdos-Renyi-Kernel, RigL), er "
        "(Erdos-Renyi) or uniform.",
        enum_values=list(DISTRIBUTIONS),
    ),
    "grow": _spec(
        "enum", "gradient",
        "Regrowth rule of mask updates: gradient (RigL: largest dense "
        "gradient) or random (SET).",
        enum_values=list(GROW_MODES),
    ),
    "drop_fraction": _spec(
        "float", 0.5,
        "Fraction p in (0, 1] of each layer's active weights that a mask "
        "update drops (smallest magnitude) and regrows.",
        _in(0.0, 1.0, low_open=True),
        "Argument `drop_fraction` must be in (0, 1].",
    ),
    "update_interval": _spec(
        "integer", 100, "Training steps between two mask updates.",
        _at_least(1), "Argument `update_interval` must be >= 1.",
    ),
    # --- optimizer
    "learning_rate": _spec(
        "float", 0.05,
        "Base learning rate of SGD with momentum. DST and dense runs divide "
        "it by 10 at 50% and ~77% of the epochs (epochs 15 and 23 of 30); "
        "EDST runs its exploration at this rate and each refinement phase at "
        "1/10 then 1/100 of it.",
        _in(0.0, float("inf"), low_open=True),
        "Argument `learning_rate` must be > 0.",
    ),
    "momentum": _spec(
        "float", 0.9, "SGD momentum in [0, 1).",
        _in(0.0, 1.0, high_open=True), "Argument `momentum` must be in [0, 1).",
    ),
    # --- ensembles
    "num_members": _spec(
        "integer", 3, "Number of ensemble members M (>= 1).",
        _at_least(1), "Argument `num_members` must be >= 1.",
    ),
    "epochs": _spec(
        "integer", 30,
        "DST: training epochs of each member (and of the dense baseline).",
        _at_least(1), "Argument `epochs` must be >= 1.",
    ),
    "exploration_epochs": _spec(
        "integer", 15,
        "EDST: epochs of dynamic sparse training before the first member.",
        _at_least(0), "Argument `exploration_epochs` must be >= 0.",
    ),
    "refinement_epochs": _spec(
        "integer", 5,
        "EDST: epochs of each refinement phase; a member is saved at the end "
        "of each. The run lasts exploration_epochs + num_members x "
        "refinement_epochs epochs (the dense baseline too).",
        _at_least(1), "Argument `refinement_epochs` must be >= 1.",
    ),
    "global_drop_fraction": _spec(
        "float", None,
        "EDST: fraction q in (0, 1] of the active weights that each global "
        "exploration between two members replaces (default: EDSTCallback's; "
        "0.8 in the paper).",
        _in(0.0, 1.0, low_open=True),
        "Argument `global_drop_fraction` must be in (0, 1].",
    ),
    "edst_preset": _spec(
        "enum", "default",
        "EDST levers: default (EDSTCallback's defaults, chosen by "
        "measurement on FMNIST-MLP v2) or official (the paper code's plan: "
        "EDSTCallback(preset='official')).",
        enum_values=["default", "official"],
    ),
    # --- running
    "strategy": _spec(
        "enum", "default",
        "tf.distribute strategy: default (one device), mirrored (all local "
        "GPUs), multi_worker (MultiWorkerMirroredStrategy; workers from "
        "TF_CONFIG) or tpu (TPUStrategy; see --tpu).",
        enum_values=list(STRATEGIES),
    ),
    "tpu": _spec(
        "string", "",
        "With --strategy=tpu: the TPU name or grpc:// address for "
        "TPUClusterResolver ('' for a TPU VM's local TPU).",
    ),
    "output_dir": _spec(
        "string", "runs/example",
        "Folder that receives the outputs (created if missing; must be "
        "writable). Training scripts: member files, run.json, results.json "
        "and plots; evaluate.py: results.json and plots (default: the first "
        "of --run_dirs); export.py: the TF Serving base folder.",
    ),
    "dense_baseline": _spec(
        "bool", True,
        "Also train a single dense model of the same architecture for the "
        "same number of epochs, as the reference of the results table.",
    ),
    "evaluate": _spec(
        "bool", True,
        "After training, evaluate on the test and out-of-distribution sets, "
        "print the table and write results.json (as evaluate.py does).",
    ),
    "plots": _spec("bool", True, "Write the PNG plots beside results.json."),
    "verbose": _spec(
        "enum", "auto",
        "Keras fit verbosity: auto or 1 (progress bar), 2 (one line per "
        "epoch), 0 (silent).",
        enum_values=["auto", "0", "1", "2"],
    ),
    # --- evaluate.py
    "run_dirs": _spec(
        "list", None,
        "Comma-separated --output_dir folders of train_edst_ensemble.py / "
        "train_dst_ensemble.py runs (each holds a run.json), trained on the "
        "same data set. Every method of every run is scored together.",
    ),
    # --- export.py
    "run_dir": _spec(
        "string", None,
        "An --output_dir of a training script; its --method members are "
        "exported. Or give --member_dir.",
    ),
    "member_dir": _spec(
        "string", None,
        "A folder of member_<i>.kftm files to export (instead of --run_dir).",
    ),
    "method": _spec(
        "enum", "auto",
        "With --run_dir: which members to export, edst, dst or dense (auto: "
        "the run's sparse ensemble).",
        enum_values=["auto", "edst", "dst", "dense"],
    ),
    "model_name": _spec(
        "string", "freetickets",
        "TF Serving model name: the SavedModel goes to "
        "<output_dir>/<model_name>/<version>.",
    ),
    "version": _spec(
        "integer", 1, "TF Serving version number (>= 1).",
        _at_least(1), "Argument `version` must be >= 1.",
    ),
    "overwrite": _spec(
        "bool", False, "Replace an existing export of the same version.",
    ),
    "compact": _spec(
        "bool", True,
        "Store sparse kernels as a bitmap of nonzeros plus their values "
        "(about (1 - S) + 1/32 of the dense bytes).",
    ),
}


def define(*names, **defaults):
    """Defines the named flags of `FLAG_SPECS` (once per process).

    Args:
        *names: flag names.
        **defaults: per-script defaults, for example `output_dir="runs/edst"`.
    """
    definers = {
        "string": flags.DEFINE_string,
        "integer": flags.DEFINE_integer,
        "float": flags.DEFINE_float,
        "bool": flags.DEFINE_bool,
        "enum": flags.DEFINE_enum,
        "list": flags.DEFINE_list,
    }
    for name in names:
        # Defined here for a script imported earlier: share it. A flag of
        # the same name from any other module falls through, and absl
        # raises DuplicateFlagError naming both modules, rather than the
        # script running with another module's definition.
        if name in FLAGS and FLAGS.find_module_defining_flag(name) == __name__:
            continue
        spec = FLAG_SPECS[name]
        default = defaults.get(name, spec["default"])
        kwargs = dict(spec["kwargs"])
        if spec["kind"] == "enum":
            definers["enum"](name, default, kwargs.pop("enum_values"),
                             spec["help"], **kwargs)
        else:
            definers[spec["kind"]](name, default, spec["help"], **kwargs)
        if spec["validator"] is not None:
            flags.register_validator(name, spec["validator"],
                                     message=spec["message"])


DATA_FLAGS = ("dataset", "data_dir", "train_examples", "eval_examples",
              "batch_size", "seed")
MODEL_FLAGS = ("model", "l2", "augment")
SPARSE_FLAGS = ("sparsity", "distribution", "grow", "drop_fraction",
                "update_interval")
OPTIMIZER_FLAGS = ("learning_rate", "momentum")
RUN_FLAGS = ("strategy", "tpu", "output_dir", "dense_baseline", "evaluate",
             "plots", "verbose")


def verbose_value(value):
    return value if value == "auto" else int(value)


# ------------------------------------------------------------------ running
def parse_flags(argv):
    """absl flags parser: every flag error becomes one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        _print_error(argv[0] if argv else "", error)
        sys.exit(2)


def run(main):
    """Runs `main` like `absl.app.run`, errors as one line without a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

    def guarded(argv):
        from absl import logging

        if not FLAGS["verbosity"].present:
            # tfds logs every split it opens at INFO level.
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except ExampleError as error:
            _print_error(sys.argv[0], error)
            sys.exit(1)

    app.run(guarded, flags_parser=parse_flags)


def _print_error(program, error):
    name = os.path.basename(program) or "example"
    message = " ".join(str(error).split())  # one line, whatever the message
    sys.stderr.write(f"{name}: error: {message}\n")
    sys.stderr.flush()


def check_no_arguments(argv):
    if len(argv) > 1:
        raise ExampleError(
            f"unexpected arguments {argv[1:]}; every option is a --flag "
            "(see --helpfull)"
        )


def check_output_dir(path):
    """Creates `path` if needed and checks that a file can be written in it."""
    if not path:
        raise ExampleError("flag --output_dir='': give a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ExampleError(
            f"flag --output_dir={path}: cannot write there ({reason})"
        ) from None
    return os.path.abspath(path)


def check_dataset_name(name, data_dir=None):
    """Checks that `name` is a tensorflow-datasets name, without importing TensorFlow.

    tensorflow_datasets imports TensorFlow lazily; listing its registered
    builders does not import it. A folder of that name in `data_dir` (a data
    set prepared on this machine) counts as known too.
    """
    base = (name or "").split(":")[0].split("/")[0]
    if not base or any(c.isspace() for c in name) or base in (".", ".."):
        raise ExampleError(f"flag --dataset={name!r}: give a tfds name")
    if base in LOCAL_DATASETS:
        return
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )
    if os.path.isdir(os.path.join(data_dir, base)):
        return
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ExampleError(
            f"flag --dataset={name}: tensorflow-datasets is not installed; "
            "`pip install tensorflow-datasets` (or `pip install -e "
            ".[datasets]`), or use the offline default --dataset=fashion_mnist"
        ) from None
    known = tfds.list_builders(with_community_datasets=False)
    if base not in known:
        import difflib

        close = difflib.get_close_matches(base, known, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ExampleError(
            f"flag --dataset={name}: unknown tensorflow-datasets name.{hint} "
            "`tfds.list_builders()` lists the known names."
        )

