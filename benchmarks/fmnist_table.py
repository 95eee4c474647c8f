"""The FreeTickets results table on FMNIST-MLP v1 / FMNIST-CNN v1 (BENCHMARK.md).

Trains, one run at a time on the protocol's data, model and schedule:

- single dense (seed 0) and a dense ensemble (seeds 0, 1, 2; member 0 is the
  single dense run);
- DST Ensemble: `kft.train_dst_ensemble`, M = 3 independent sparse runs
  (S = 0.8, ERK, RigL growth, p = 0.5, update interval 100, no mask update in
  the last 25% of training); its member 0 is also reported as "DST single";
- EDST Ensemble: M = 3 members from ONE `model.fit` with `kft.EDSTCallback`
  (the protocol's exploration and refinement epochs, the callback's default
  learning-rate plan, global exploration q = 0.8);
- tfmot gradual magnitude pruning (tf_keras, `prune_low_magnitude` with
  PolynomialDecay 0 -> S ending at 75% of training), single (seed 0) and an
  ensemble of 3, run by `benchmarks/tfmot_baseline.py` in a subprocess with
  `TF_USE_LEGACY_KERAS=1` (Keras 2 and Keras 3 cannot share a process).

Every ensemble averages its members' softmax probabilities, and every row is
scored by `keras_freetickets.metrics` on the 10,000 test images: accuracy,
mean member accuracy, NLL, ECE (15 bins), OOD AUROC (max probability) against
digits and noise, member disagreement, actual density (nonzero kernel entries
of the trained members), training FLOPs relative to the single dense run
(`keras_freetickets.flops`, RigL's accounting with the counted mask-update
steps; EDST's global explorations count as update steps) and the median
seconds per epoch. The results go to `<out>/<protocol key>.json` and `.md`
(`fmnist_mlp_v1`, `fmnist_cnn_v1`; `_quick` is appended for `--quick` runs
and runs on fewer training examples), with PEERS.md's rows in a second table
and a verdict on the paper's claims computed from the numbers; `--readme`
writes the tables between `<!-- results:<key>:start -->` and
`<!-- results:<key>:end -->` (appended to the file when missing).

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/fmnist_table.py \
    --protocol=mlp --out=benchmarks/results --readme=README.md
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/fmnist_table.py \
    --protocol=cnn --out=benchmarks/results --readme=README.md   # 10 epochs
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/fmnist_table.py --quick \
    --out=/tmp/kft_quick                      # smoke run: 1 epoch, 2,000 images
```
"""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

PROTOCOLS = {
    "mlp": dict(
        name="FMNIST-MLP v1", key="fmnist_mlp_v1", epochs=30,
        lr_boundaries=(15, 23), edst_exploration=15, edst_refinement=5,
        budget="the full protocol budget",
    ),
    "cnn": dict(
        name="FMNIST-CNN v1", key="fmnist_cnn_v1", epochs=10,
        lr_boundaries=(5, 8), edst_exploration=4, edst_refinement=2,
        budget="BENCHMARK.md's smaller budget (10 epochs, lr x0.1 at epochs "
               "5 and 8, EDST 4 + 3 x 2 epochs)",
    ),
}
METHODS = ("dense", "dense_ensemble", "dst", "edst", "tfmot")
NUM_TRAIN = 55_000
BATCH_SIZE = 128
LEARNING_RATE = 0.05
MOMENTUM = 0.9
L2 = 5e-4
SPARSITY = 0.8
DROP_FRACTION = 0.5
GLOBAL_DROP_FRACTION = 0.8
UPDATE_END_FRACTION = 0.75
NUM_MEMBERS = 3
ECE_BINS = 15
QUICK = dict(epochs=1, train_examples=2000, update_interval=4)

ROW_TITLES = {
    "dense": "dense single (seed 0)",
    "dense_ensemble": "dense ensemble (3 seeds)",
    "dst_single": "DST single (seed 0)",
    "dst_ensemble": "DST Ensemble (3 seeds)",
    "edst_ensemble": "EDST Ensemble M=3 (one run)",
    "tfmot_single": "tfmot pruned single (seed 0)",
    "tfmot_ensemble": "tfmot pruned ensemble (3 seeds)",
}
COLUMNS = (
    ("accuracy", "acc", 4), ("member_accuracy", "member acc", 4),
    ("nll", "NLL", 4), ("ece", "ECE", 4), ("auroc_digits", "AUROC digits", 4),
    ("auroc_noise", "AUROC noise", 4), ("disagreement", "disagreement", 4),
    ("density", "density", 3), ("train_flops", "train FLOPs", 3),
    ("seconds_per_epoch", "s/epoch", 2),
)
COLUMN_HEADERS = {name: header for name, header, _ in COLUMNS}

# shared/PEERS.md, FMNIST-MLP v1, measured 2026-11-25 on a 2-core CPU.
PEERS_SOURCE = {
    "official": "official FreeTickets code (PyTorch), from shared/PEERS.md",
    "tfmot": "tfmot 0.8.1 (tf_keras), from shared/PEERS.md",
}
PEERS_COLUMNS = ("accuracy", "nll", "ece", "auroc_digits", "disagreement",
                 "density", "train_flops", "seconds_per_epoch")
PEERS = {
    "fmnist_mlp_v1": [
        ("official", "dense single (seed 0)",
         (0.8971, 0.2936, 0.0150, 0.8186, None, 1.000, 1.000, 1.34)),
        ("official", "dense ensemble (3 seeds)",
         (0.8962, 0.2895, 0.0111, 0.8288, 0.0275, 1.000, 3.000, 1.34)),
        ("official", "DST single (seed 0)",
         (0.8819, 0.3269, 0.0146, 0.7793, None, 0.200, 0.205, 1.73)),
        ("official", "DST Ensemble (3 seeds)",
         (0.8860, 0.3148, 0.0078, 0.8105, 0.0441, 0.200, 0.616, 1.73)),
        ("official", "EDST Ensemble M=3 (one run)",
         (0.8789, 0.3290, 0.0142, 0.7726, 0.0153, 0.200, 0.207, 1.46)),
        ("tfmot", "dense single (seed 0)",
         (0.8964, 0.2928, 0.0134, 0.8294, None, 1.000, 1.000, 2.36)),
        ("tfmot", "pruned single (seed 0)",
         (0.8936, 0.3002, 0.0098, 0.8233, None, 0.200, 0.353, 2.51)),
        ("tfmot", "pruned ensemble (3 seeds)",
         (0.8967, 0.2934, 0.0091, 0.8315, 0.0326, 0.200, 1.059, 2.51)),
    ],
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("protocol", "mlp", sorted(PROTOCOLS),
                  "mlp: FMNIST-MLP v1; cnn: FMNIST-CNN v1 (smaller budget).")
flags.DEFINE_integer("epochs", None,
                     "Epochs per run (default: 30 for mlp, 10 for cnn; 1 "
                     "with --quick).")
flags.DEFINE_integer("train_examples", None,
                     "Train on the first N of the 55,000 train images "
                     "(default all; 2,000 with --quick).")
flags.DEFINE_list("methods", list(METHODS),
                  f"Methods to run, from {list(METHODS)}.")
flags.DEFINE_list("lr_boundaries", None,
                  "Epochs at which the lr is multiplied by 0.1 (default: the "
                  "protocol's, scaled to --epochs).")
flags.DEFINE_integer("edst_exploration_epochs", None,
                     "EDST exploration epochs (default: the protocol's, or "
                     "scaled to --epochs).")
flags.DEFINE_integer("edst_refinement_epochs", None,
                     "EDST epochs per refinement phase (default: the "
                     "protocol's, or scaled to --epochs).")
flags.DEFINE_integer("update_interval", None,
                     "Steps between mask updates (default 100; 4 with "
                     "--quick so that tiny runs update their masks).")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for the JSON and markdown results.")
flags.DEFINE_string("readme", None,
                    "Markdown file whose results block to (re)write.")
flags.DEFINE_string("work_dir", None,
                    "Folder for member files (default: a temporary folder, "
                    "removed at the end). Its dst/ and edst/ are emptied "
                    "first.")
flags.DEFINE_string("tfmot_python", None,
                    "Python interpreter of the tfmot environment (default: "
                    "this one).")
flags.DEFINE_float("l2", L2,
                   "L2 factor of `keras.regularizers.L2` on every kernel (the "
                   "protocol's 5e-4; its gradient is 2 * l2 * w, so PyTorch's "
                   "weight_decay=5e-4 corresponds to 2.5e-4).")
flags.DEFINE_bool("render_only", False,
                  "Train nothing: rewrite the markdown (and --readme block) "
                  "from the JSON that an earlier run with the same flags "
                  "wrote to --out.")
flags.DEFINE_bool("quick", False,
                  "Smoke run: 1 epoch on 2,000 images, mask updates every 4 "
                  "steps; results get a _quick suffix.")


# ------------------------------------------------------------------ setup
def resolve_config(argv_flags):
    """The run's settings, from the protocol and the flags."""
    f = argv_flags
    protocol = PROTOCOLS[f.protocol]
    epochs = f.epochs or (QUICK["epochs"] if f.quick else protocol["epochs"])
    train_examples = f.train_examples or (
        QUICK["train_examples"] if f.quick else NUM_TRAIN
    )
    methods = [m.strip() for m in f.methods if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(
            f"Argument `methods` must name methods in {list(METHODS)}. "
            f"Received: methods={f.methods}"
        )
    if epochs < 1:
        raise ValueError(f"Argument `epochs` must be >= 1. Received: {epochs}")
    if not 1 <= train_examples <= NUM_TRAIN:
        raise ValueError(
            f"Argument `train_examples` must be in [1, {NUM_TRAIN}]. "
            f"Received: train_examples={train_examples}"
        )
    scale = epochs / protocol["epochs"]
    if f.lr_boundaries is not None:
        boundaries = [int(b) for b in f.lr_boundaries]
    else:
        boundaries = [math.ceil(b * scale - 1e-9)
                      for b in protocol["lr_boundaries"]]
    if epochs == protocol["epochs"]:
        refinement = protocol["edst_refinement"]
    else:
        refinement = max(1, round(protocol["edst_refinement"] * scale))
    if f.edst_refinement_epochs is not None:
        refinement = f.edst_refinement_epochs
    exploration = f.edst_exploration_epochs
    if exploration is None:
        exploration = max(0, epochs - NUM_MEMBERS * refinement)
    update_interval = f.update_interval or (
        QUICK["update_interval"] if f.quick else 100
    )
    reduced = (
        epochs != protocol["epochs"] or train_examples != NUM_TRAIN
        or f.quick
    )
    variant = f.l2 != L2
    full = not reduced and not variant
    key = protocol["key"] + ("_quick" if reduced else "_variant" if variant
                             else "")
    return dict(
        protocol=f.protocol, protocol_name=protocol["name"], key=key,
        marker_key=protocol["key"], full_budget=full,
        budget=(
            f"a reduced smoke budget ({epochs} epoch(s) on {train_examples} "
            "training images): NOT the protocol's numbers" if reduced else
            f"{protocol['budget']}, but with L2 {f.l2:g} instead of "
            f"{L2:g}: NOT the protocol's numbers" if variant else
            protocol["budget"]
        ),
        epochs=epochs, train_examples=train_examples, methods=methods,
        lr_boundaries=boundaries, learning_rate=LEARNING_RATE,
        momentum=MOMENTUM, l2=f.l2, batch_size=BATCH_SIZE,
        sparsity=SPARSITY, distribution="erk", grow="gradient",
        drop_fraction=DROP_FRACTION, update_interval=update_interval,
        update_end_fraction=UPDATE_END_FRACTION, num_members=NUM_MEMBERS,
        seeds=list(range(NUM_MEMBERS)),
        edst_exploration_epochs=exploration,
        edst_refinement_epochs=refinement,
        edst_global_drop_fraction=GLOBAL_DROP_FRACTION,
        edst_learning_rate_plan="default: lr in exploration, lr/10 in the "
        "first half of each refinement phase, lr/100 in the second",
        ece_bins=ECE_BINS,
    )


def build_model(protocol, seed=None, l2=L2):
    """The protocol's model with logits out and L2 on every kernel."""
    return protocols.build_model(protocol, seed=seed, l2=l2)


def epoch_timer(label, epochs):
    """A callback recording wall seconds per epoch and printing progress."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)
            loss = (logs or {}).get("loss", float("nan"))
            print(f"[{label}] epoch {epoch + 1}/{epochs} loss={loss:.4f} "
                  f"{self.seconds[-1]:.2f}s", flush=True)

    return EpochTimer()


class ProtocolData:
    """The protocol's arrays: train, test and the two OOD sets."""

    def __init__(self, protocol, train_examples):
        from keras_freetickets.contrib import datasets

        flatten = protocol == "mlp"
        x, y = datasets.load_fashion_mnist("train", flatten=flatten)
        self.x_train = x[:train_examples]
        self.y_train = y[:train_examples]
        self.x_test, self.y_test = datasets.load_fashion_mnist(
            "test", flatten=flatten
        )
        self.ood = {
            "digits": datasets.load_ood_digits(flatten=flatten),
            "noise": datasets.load_ood_noise(flatten=flatten),
        }

    def train_dataset(self, seed):
        from keras_freetickets.contrib import datasets

        return datasets.as_dataset(self.x_train, self.y_train, BATCH_SIZE,
                                   shuffle=True, seed=seed)

    @property
    def steps_per_epoch(self):
        return -(-len(self.x_train) // BATCH_SIZE)


# ------------------------------------------------------------- training
def lr_scheduler(config):
    import keras

    boundaries = config["lr_boundaries"]

    def schedule(epoch, lr=None):
        del lr
        return LEARNING_RATE * 0.1 ** sum(epoch >= b for b in boundaries)

    return keras.callbacks.LearningRateScheduler(schedule)


def _kernel_arrays(model):
    import keras
    import numpy as np

    from keras_freetickets import prunable

    return {
        v.path: np.asarray(keras.ops.convert_to_numpy(v))
        for v in prunable.prunable_variables(model.weights)
    }


def _density(kernels):
    active = sum(int((k != 0).sum()) for k in kernels.values())
    return active / sum(k.size for k in kernels.values())


def predict_member(model, data):
    """Softmax probabilities of one logits model on test and OOD sets."""
    probs = {"test": benchkit.softmax(model.predict(data.x_test, batch_size=1024,
                                            verbose=0))}
    for name, x in data.ood.items():
        probs[name] = benchkit.softmax(model.predict(x, batch_size=1024, verbose=0))
    return probs


def train_dense(config, data, seed):
    """One dense run; returns its record (probabilities, timings, density)."""
    import keras

    keras.backend.clear_session()
    model = build_model(config["protocol"], seed, config["l2"])
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    timer = epoch_timer(f"dense seed {seed}", config["epochs"])
    start = time.perf_counter()
    model.fit(data.train_dataset(seed), epochs=config["epochs"], verbose=0,
              callbacks=[lr_scheduler(config), timer])
    wall = time.perf_counter() - start
    return dict(
        seed=seed, epoch_seconds=timer.seconds, wall_seconds=wall,
        steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        update_steps=0, density=_density(_kernel_arrays(model)),
        probs=predict_member(model, data),
    )


def _sparse_member_records(config, data, member_dir, counters, timers):
    """Loads saved members as an ensemble; one record per member."""
    import keras
    import numpy as np

    import keras_freetickets as kft

    ensemble = kft.FreeTicketsEnsemble.from_directory(member_dir,
                                                      output="logits")
    per_set = {"test": ensemble.member_predictions(data.x_test,
                                                   batch_size=1024)}
    for name, x in data.ood.items():
        per_set[name] = ensemble.member_predictions(x, batch_size=1024)
    paths = kft.members.list_members(member_dir)
    f_dense = kft.flops.dense_forward_flops(ensemble.members[0])
    records = []
    for index, (path, member) in enumerate(zip(paths, ensemble.members)):
        kernels = _kernel_arrays(member)
        masks = {p: (k != 0) for p, k in kernels.items()}
        metadata = kft.members.read_member_metadata(path)
        records.append(dict(
            seed=metadata.get("seed"),
            member_file=os.path.basename(path),
            epoch_seconds=timers[index].seconds if index < len(timers) else [],
            steps=counters[index]["steps"] if index < len(counters) else None,
            update_steps=(counters[index]["update_steps"]
                          if index < len(counters) else None),
            density=_density(kernels),
            mask_density=metadata.get("density"),
            f_sparse=kft.flops.forward_flops(member, masks=masks),
            f_dense=float(f_dense),
            probs={name: np.asarray(v[index]) for name, v in per_set.items()},
        ))
    overlap = kft.members.pairwise_mask_overlap(paths)
    keras.backend.clear_session()
    return records, overlap


def _counter_callback():
    """Reads the SparseOptimizer's step and mask-update counters at the end."""
    import keras

    class Counter(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            opt = self.model.optimizer
            self.steps = int(keras.ops.convert_to_numpy(opt.iterations))
            self.update_steps = int(
                keras.ops.convert_to_numpy(opt.mask_updates)
            )

    return Counter()


def train_dst(config, data, member_dir, build=None, label="DST"):
    """DST Ensemble through `kft.train_dst_ensemble`; `build(seed)` replaces
    the protocol's model builder (the ablations share initial weights)."""
    import keras

    import keras_freetickets as kft

    timers, counters = [], []

    def callbacks(index):
        timers.append(epoch_timer(f"{label} member {index}",
                                   config["epochs"]))
        counters.append(_counter_callback())
        return [lr_scheduler(config), timers[-1], counters[-1]]

    if build is None:
        def build(seed):
            return build_model(config["protocol"], seed, config["l2"])

    start = time.perf_counter()
    kft.train_dst_ensemble(
        build,
        data.train_dataset(0),
        num_members=config["num_members"], seeds=config["seeds"],
        sparsity=config["sparsity"], member_dir=member_dir,
        epochs=config["epochs"],
        optimizer=lambda: keras.optimizers.SGD(LEARNING_RATE,
                                               momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        callbacks=callbacks,
        update_end_fraction=config["update_end_fraction"], verbose=0,
        distribution=config["distribution"], grow=config["grow"],
        drop_fraction=config["drop_fraction"],
        update_interval=config["update_interval"],
    )
    wall = time.perf_counter() - start
    counts = [dict(steps=c.steps, update_steps=c.update_steps)
              for c in counters]
    records, overlap = _sparse_member_records(config, data, member_dir,
                                              counts, timers)
    return dict(members=records, mask_overlap=overlap, wall_seconds=wall)


def train_edst(config, data, member_dir):
    """EDST Ensemble: one `model.fit` with `kft.EDSTCallback`."""
    import keras

    import keras_freetickets as kft

    keras.backend.clear_session()
    model = build_model(config["protocol"], 0, config["l2"])
    opt = kft.SparseOptimizer(
        keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
        sparsity=config["sparsity"], distribution=config["distribution"],
        grow=config["grow"], drop_fraction=config["drop_fraction"],
        update_interval=config["update_interval"], seed=0,
    )
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    edst = kft.EDSTCallback(
        num_members=config["num_members"],
        exploration_epochs=config["edst_exploration_epochs"],
        refinement_epochs=config["edst_refinement_epochs"],
        member_dir=member_dir,
        # The v1 tables measure the paper code's EDST.
        **{**kft.edst.OFFICIAL_LEVERS, "global_drop_fraction":
           config["edst_global_drop_fraction"]},
    )
    timer = epoch_timer("EDST", edst.total_epochs)
    start = time.perf_counter()
    model.fit(data.train_dataset(0), epochs=edst.total_epochs, verbose=0,
              callbacks=[edst, timer])
    wall = time.perf_counter() - start
    steps = int(keras.ops.convert_to_numpy(opt.iterations))
    update_steps = int(keras.ops.convert_to_numpy(opt.mask_updates))
    invariants = opt.check_invariants()
    counts = [dict(steps=None, update_steps=None)] * config["num_members"]
    records, overlap = _sparse_member_records(config, data, member_dir,
                                              counts, [timer])
    for record in records:
        record["epoch_seconds"] = []
    return dict(members=records, mask_overlap=overlap, wall_seconds=wall,
                steps=steps, update_steps=update_steps,
                epoch_seconds=timer.seconds, total_epochs=edst.total_epochs,
                invariant_problems=invariants)


def train_tfmot(config, work_dir):
    """tfmot rows, in a subprocess with its own (Keras 2) environment."""
    import numpy as np

    out = pathlib.Path(work_dir) / "tfmot"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        FLAGS.tfmot_python or sys.executable,
        str(benchkit.HERE / "tfmot_baseline.py"),
        f"--protocol={config['protocol']}", f"--epochs={config['epochs']}",
        f"--train_examples={config['train_examples']}",
        f"--seeds={','.join(str(s) for s in config['seeds'])}",
        f"--lr_boundaries={','.join(str(b) for b in config['lr_boundaries'])}",
        f"--learning_rate={LEARNING_RATE}", f"--momentum={MOMENTUM}",
        f"--l2={config['l2']}", f"--batch_size={BATCH_SIZE}",
        f"--final_sparsity={config['sparsity']}",
        f"--end_fraction={config['update_end_fraction']}",
        f"--frequency={config['update_interval']}", f"--out={out}",
    ]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(benchkit.REPO), env.get("PYTHONPATH")) if p
    )
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("[tfmot]"):
            print(line, flush=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(
            f"The tfmot subprocess failed (exit {proc.returncode}). Install "
            "the tfmot extra (`pip install --no-deps "
            "tensorflow-model-optimization==0.8.1 tf-keras==<TF version>`) "
            f"or leave tfmot out of --methods. Command: {' '.join(command)}\n"
            f"{tail}"
        )
    result = json.loads((out / "result.json").read_text())
    probs = np.load(out / "probs.npz")
    records = []
    kernels = []
    for index, member in enumerate(result["members"]):
        with np.load(out / member["kernels"]) as npz:
            kernels.append({k: npz[k] for k in npz.files})
        records.append(dict(
            seed=member["seed"], epoch_seconds=member["epoch_seconds"],
            steps=member["steps"], density=member["density"],
            mean_step_density=member["mean_step_density"],
            probs={name: probs[name][index] for name in probs.files},
        ))
    from keras_freetickets import members as members_lib

    overlap = members_lib.pairwise_mask_overlap(kernels)
    versions = {k: result[k] for k in ("tensorflow", "tf_keras", "tfmot")}
    return dict(members=records, mask_overlap=overlap, wall_seconds=wall,
                versions=versions, pruning_end_step=result["pruning_end_step"])


# -------------------------------------------------------------- scoring
def _score(data, records):
    """metrics.report of an ensemble of records (or of one record)."""
    import numpy as np

    from keras_freetickets import metrics

    member_probs = np.stack([r["probs"]["test"] for r in records])
    ood = {name: np.stack([r["probs"][name] for r in records])
           for name in data.ood}
    return metrics.report(data.y_test, member_probs, ood, num_bins=ECE_BINS)


def _row(report, records, train_flops, extra=None):
    import numpy as np

    ensemble = report["ensemble"]
    seconds = [s for r in records for s in r.get("epoch_seconds", [])]
    row = dict(
        accuracy=ensemble["accuracy"],
        member_accuracy=(float(np.mean([m["accuracy"]
                                        for m in report["members"]]))
                         if len(records) > 1 else None),
        nll=ensemble["nll"], ece=ensemble["ece"],
        auroc_digits=ensemble["auroc_digits"],
        auroc_noise=ensemble["auroc_noise"],
        disagreement=report["disagreement"],
        density=float(np.mean([r["density"] for r in records])),
        train_flops=train_flops,
        seconds_per_epoch=float(np.median(seconds)) if seconds else None,
        brier=ensemble["brier"], kl_divergence=report["kl_divergence"],
        num_members=len(records),
        members=[
            dict({k: v for k, v in r.items()
                  if k not in ("probs", "epoch_seconds")}, **m)
            for r, m in zip(records, report["members"])
        ],
    )
    row.update(extra or {})
    return row


def score_rows(config, data, runs):
    """The table's rows, from the finished runs."""
    import numpy as np

    from keras_freetickets import flops

    rows = {}
    f_dense = runs["f_dense"]
    dense_steps = config["epochs"] * data.steps_per_epoch
    reference = flops.training_flops(f_dense, f_dense, dense_steps, 0,
                                     BATCH_SIZE)

    def relative(f_sparse, steps, update_steps):
        return flops.training_flops(min(f_sparse, f_dense), f_dense, steps,
                                    update_steps, BATCH_SIZE) / reference

    for record in runs.get("dense", []):
        record["train_flops"] = relative(f_dense, record["steps"], 0)
    for record in runs.get("dst", {}).get("members", []):
        record["train_flops"] = relative(record["f_sparse"], record["steps"],
                                         record["update_steps"])
    for record in runs.get("tfmot", {}).get("members", []):
        record["train_flops"] = (record["mean_step_density"]
                                 * record["steps"] / dense_steps)
    dense = runs.get("dense")
    if dense:
        first = dense[:1]
        if "dense" in config["methods"]:
            rows["dense"] = _row(_score(data, first), first,
                                 first[0]["train_flops"])
        if "dense_ensemble" in config["methods"] and len(dense) > 1:
            rows["dense_ensemble"] = _row(
                _score(data, dense), dense,
                float(sum(r["train_flops"] for r in dense)),
            )
    dst = runs.get("dst")
    if dst:
        members = dst["members"]
        costs = [m["train_flops"] for m in members]
        rows["dst_single"] = _row(_score(data, members[:1]), members[:1],
                                  costs[0])
        rows["dst_ensemble"] = _row(
            _score(data, members), members, float(sum(costs)),
            dict(mask_overlap=dst["mask_overlap"].tolist(),
                 mean_mask_overlap=_mean_offdiag(dst["mask_overlap"]),
                 wall_seconds=dst["wall_seconds"]),
        )
    edst = runs.get("edst")
    if edst:
        members = edst["members"]
        f_sparse = float(np.mean([m["f_sparse"] for m in members]))
        row = _row(
            _score(data, members), members,
            relative(f_sparse, edst["steps"], edst["update_steps"]),
            dict(mask_overlap=edst["mask_overlap"].tolist(),
                 mean_mask_overlap=_mean_offdiag(edst["mask_overlap"]),
                 wall_seconds=edst["wall_seconds"], steps=edst["steps"],
                 update_steps=edst["update_steps"],
                 total_epochs=edst["total_epochs"],
                 invariant_problems=edst["invariant_problems"]),
        )
        row["seconds_per_epoch"] = float(np.median(edst["epoch_seconds"]))
        rows["edst_ensemble"] = row
    tfmot = runs.get("tfmot")
    if tfmot:
        members = tfmot["members"]
        costs = [m["train_flops"] for m in members]
        rows["tfmot_single"] = _row(_score(data, members[:1]), members[:1],
                                    costs[0])
        rows["tfmot_ensemble"] = _row(
            _score(data, members), members, float(sum(costs)),
            dict(mask_overlap=tfmot["mask_overlap"].tolist(),
                 mean_mask_overlap=_mean_offdiag(tfmot["mask_overlap"]),
                 wall_seconds=tfmot["wall_seconds"],
                 versions=tfmot["versions"]),
        )
    return rows


def _mean_offdiag(matrix):
    import numpy as np

    matrix = np.asarray(matrix)
    count = len(matrix)
    if count < 2:
        return None
    return float((matrix.sum() - np.trace(matrix)) / (count * (count - 1)))


# -------------------------------------------------------------- verdict
def verdict(rows):
    """Checks the paper's claims against the rows; returns (dict, text)."""
    checks = {}
    sentences = []
    dense = rows.get("dense")
    for key, name in (("dst_ensemble", "DST Ensemble"),
                      ("edst_ensemble", "EDST Ensemble")):
        row = rows.get(key)
        if not (dense and row):
            checks[f"{key}_beats_dense"] = None
            sentences.append(f"{name} vs single dense: not run.")
            continue
        parts = {
            "accuracy": row["accuracy"] > dense["accuracy"],
            "nll": row["nll"] < dense["nll"],
            "ece": row["ece"] < dense["ece"],
            "flops": row["train_flops"] <= dense["train_flops"] + 1e-9,
        }
        holds = all(parts.values())
        checks[f"{key}_beats_dense"] = dict(parts, holds=holds)
        detail = (
            f"accuracy {row['accuracy']:.4f} vs {dense['accuracy']:.4f} "
            f"({_mark(parts['accuracy'])}), NLL {row['nll']:.4f} vs "
            f"{dense['nll']:.4f} ({_mark(parts['nll'])}), ECE "
            f"{row['ece']:.4f} vs {dense['ece']:.4f} ({_mark(parts['ece'])}),"
            f" at {row['train_flops']:.3f}x the single dense run's training "
            f"FLOPs ({_mark(parts['flops'])})"
        )
        if holds:
            sentences.append(
                f"**{name} beats the single dense model on accuracy, NLL and "
                f"ECE at no more training FLOPs: the claim holds** ({detail})."
            )
        else:
            failed = [k.upper() if k in ("nll", "ece") else k
                      for k, ok in parts.items() if not ok]
            sentences.append(
                f"**{name} does not beat the single dense model on every "
                f"count: the claim does not hold** (fails on "
                f"{', '.join(failed)}; {detail})."
            )
    dst, dense_ens = rows.get("dst_ensemble"), rows.get("dense_ensemble")
    if dst and dense_ens:
        gap = dense_ens["accuracy"] - dst["accuracy"]
        ratio = dst["train_flops"] / dense_ens["train_flops"]
        close = gap <= 0.005 + 1e-12
        cheap = ratio <= 1.0 / 3.0 + 1e-9
        checks["dst_vs_dense_ensemble"] = dict(
            accuracy_gap=gap, flops_ratio=ratio, within_half_point=close,
            at_most_a_third=cheap, holds=close and cheap,
        )
        detail = (
            f"accuracy {dst['accuracy']:.4f} vs {dense_ens['accuracy']:.4f}, "
            f"a gap of {100 * gap:+.2f} points ({_mark(close)} within 0.5), "
            f"at {ratio:.3f} of its training FLOPs ({_mark(cheap)} <= 1/3)"
        )
        if close and cheap:
            sentences.append(
                "**DST Ensemble comes within 0.5 accuracy points of the dense "
                f"ensemble at a third of its FLOPs or less: holds** ({detail})."
            )
        else:
            sentences.append(
                "**DST Ensemble vs the dense ensemble (within 0.5 points at "
                f"<= 1/3 of the FLOPs): does not hold** ({detail})."
            )
    else:
        checks["dst_vs_dense_ensemble"] = None
        sentences.append("DST Ensemble vs dense ensemble: not run.")
    return checks, " ".join(sentences)


def _mark(ok):
    return "yes" if ok else "no"


# ------------------------------------------------------------- markdown
def _fmt(value, digits):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def markdown(config, rows, environment, checks_text):
    """The results block: our table, the peers' table, the verdict."""
    lines = [
        f"### {config['protocol_name']}: results of this project",
        "",
        f"Budget: {config['budget']}. Measured {environment['date']} on "
        f"{environment['machine']} (Keras {environment['keras']}, TensorFlow "
        f"{environment['tensorflow']}), one run at a time, by "
        f"`{environment['command']}`. Test set of 10,000 images; ensembles "
        "average member softmax; ECE with 15 bins; AUROC with the max "
        "probability score; density = nonzero fraction of the trained "
        "members' kernels; train FLOPs relative to one dense run (RigL's "
        "accounting, counted mask-update steps); s/epoch = median wall "
        "seconds per epoch (shared, noisy machine).",
        "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for key, title in ROW_TITLES.items():
        row = rows.get(key)
        if row is None:
            continue
        cells = [_fmt(row.get(name), digits) for name, _, digits in COLUMNS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    overlaps = [
        f"{ROW_TITLES[k].split(' (')[0]} {rows[k]['mean_mask_overlap']:.3f}"
        for k in ("dst_ensemble", "edst_ensemble", "tfmot_ensemble")
        if k in rows and rows[k].get("mean_mask_overlap") is not None
    ]
    if overlaps:
        lines += ["", "Mean pairwise overlap of the members' active weights "
                  "(`kft.members.pairwise_mask_overlap`; 1 = same mask, "
                  f"~{1 - config['sparsity']:.1f} = independent random "
                  "masks): " + ", ".join(overlaps) + "."]
    gains = []
    for key in ("dense_ensemble", "dst_ensemble", "edst_ensemble",
                "tfmot_ensemble"):
        if key not in rows:
            continue
        best = min(m["nll"] for m in rows[key]["members"])
        gains.append(f"{ROW_TITLES[key].split(' (')[0]} {rows[key]['nll']:.4f}"
                     f" vs {best:.4f}")
    if gains:
        lines += ["", "Ensemble NLL vs its best member's NLL: "
                  + ", ".join(gains) + "."]
    if "tfmot_ensemble" in rows:
        v = rows["tfmot_ensemble"]["versions"]
        lines += ["", f"tfmot rows: tfmot {v['tfmot']}, tf_keras "
                  f"{v['tf_keras']}, PolynomialDecay 0 -> "
                  f"{config['sparsity']} ending at "
                  f"{int(100 * config['update_end_fraction'])}% of the steps,"
                  " every kernel at the same sparsity; their FLOPs count each "
                  "step at the kernels' mask density of that step (tfmot "
                  "itself runs dense matmuls)."]
    peers = PEERS.get(config["marker_key"]) if config["full_budget"] else None
    lines += ["", f"### {config['protocol_name']}: peer implementations "
              "(numbers copied from shared/PEERS.md)", ""]
    if peers:
        headers = [COLUMN_HEADERS[c] for c in PEERS_COLUMNS]
        lines += [
            "| implementation | method | " + " | ".join(headers) + " |",
            "|---|---|" + "---|" * len(headers),
        ]
        digits = dict((c[0], c[2]) for c in COLUMNS)
        for source, title, values in peers:
            cells = [_fmt(v, digits[c]) for c, v in zip(PEERS_COLUMNS, values)]
            lines.append(f"| {PEERS_SOURCE[source]} | {title} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Peer times come from other frameworks and runs: "
                  "compare speed only within one table."]
    else:
        lines.append("No peer numbers exist for this protocol and budget.")
    lines += ["", f"### {config['protocol_name']}: verdict on the paper's "
              "claims (computed from the numbers above)", "", checks_text]
    return "\n".join(lines) + "\n"


def write_readme(path, marker_key, block):
    """Replaces (or appends) the block between the key's markers."""
    path = pathlib.Path(path)
    start = f"<!-- results:{marker_key}:start -->"
    end = f"<!-- results:{marker_key}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    content = f"{start}\n{block.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: content, text, count=1)
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + content + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_json(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------- main
def run(config, work_dir):
    """Trains every requested method; returns (rows, runs)."""
    import keras

    import keras_freetickets as kft

    data = ProtocolData(config["protocol"], config["train_examples"])
    keras.backend.clear_session()
    runs = {"f_dense": float(kft.flops.dense_forward_flops(
        build_model(config["protocol"], 0, config["l2"])))}
    methods = config["methods"]
    timings = {}
    if "dense" in methods or "dense_ensemble" in methods:
        seeds = config["seeds"] if "dense_ensemble" in methods else [0]
        start = time.perf_counter()
        runs["dense"] = [train_dense(config, data, s) for s in seeds]
        timings["dense"] = time.perf_counter() - start
    if "dst" in methods:
        member_dir = pathlib.Path(work_dir) / "dst"
        shutil.rmtree(member_dir, ignore_errors=True)
        start = time.perf_counter()
        runs["dst"] = train_dst(config, data, str(member_dir))
        timings["dst"] = time.perf_counter() - start
    if "edst" in methods:
        member_dir = pathlib.Path(work_dir) / "edst"
        shutil.rmtree(member_dir, ignore_errors=True)
        start = time.perf_counter()
        runs["edst"] = train_edst(config, data, str(member_dir))
        timings["edst"] = time.perf_counter() - start
    if "tfmot" in methods:
        start = time.perf_counter()
        runs["tfmot"] = train_tfmot(config, work_dir)
        timings["tfmot"] = time.perf_counter() - start
    rows = score_rows(config, data, runs)
    return rows, runs, timings


def render(config):
    """Rewrites the markdown and README block from a saved JSON result."""
    out = pathlib.Path(FLAGS.out)
    result = json.loads((out / f"{config['key']}.json").read_text())
    saved = result["config"]
    checks, text = verdict(result["rows"])
    block = markdown(saved, result["rows"], result["environment"], text)
    (out / f"{config['key']}.md").write_text(block)
    if FLAGS.readme:
        write_readme(FLAGS.readme, saved["marker_key"], block)
    print(block, flush=True)


def main(argv):
    # Keras warns that fit's default shuffle=True is ignored for a
    # tf.data.Dataset; the datasets here are shuffled by `as_dataset`.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")
    config = resolve_config(FLAGS)
    if FLAGS.render_only:
        return render(config)
    environment = benchkit.environment_info("fmnist_table")
    environment["load_average_start"] = list(os.getloadavg())
    print(f"[config] {json.dumps(config)}", flush=True)
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="kft_fmnist_")
    os.makedirs(work_dir, exist_ok=True)
    start = time.perf_counter()
    try:
        rows, _, timings = run(config, work_dir)
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    environment["total_seconds"] = time.perf_counter() - start
    environment["seconds_per_method"] = timings
    environment["load_average_end"] = list(os.getloadavg())
    checks, text = verdict(rows)
    block = markdown(config, rows, environment, text)
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(
        protocol=config["protocol_name"], config=config,
        environment=environment, rows=rows,
        row_titles={k: ROW_TITLES[k] for k in rows},
        peers=[dict(implementation=PEERS_SOURCE[s], method=t,
                    **dict(zip(PEERS_COLUMNS, v)))
               for s, t, v in (PEERS.get(config["marker_key"], [])
                               if config["full_budget"] else [])],
        verdict=dict(checks=checks, text=text),
    )
    json_path = out / f"{config['key']}.json"
    json_path.write_text(json.dumps(to_json(result), indent=2) + "\n")
    md_path = out / f"{config['key']}.md"
    md_path.write_text(block)
    if FLAGS.readme:
        write_readme(FLAGS.readme, config["marker_key"], block)
    print(block, flush=True)
    print(f"[done] {json_path} {md_path} in "
          f"{environment['total_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    app.run(main)
