"""End-to-end wall time of a sparse `fit` against a dense one (BENCHMARK.md,
"Speed figures" / "End to end").

For each protocol (FMNIST-MLP v1, FMNIST-CNN v1) and each compile mode
(default, and `jit_compile=True` unless `--noxla`), whole `model.fit` runs on
the real Fashion-MNIST training split are timed in alternation: dense
(`SGD(0.05, momentum=0.9)`), sparse (`SparseOptimizer` around the same SGD:
S = 0.8, ERK, RigL, p = 0.5, update interval 100, updates stop at 75% of
training) and, without XLA, sparse with a `SparsityMonitor` callback. The arms
run in pairs (dense, sparse, sparse + monitor; the next pair in the reverse
order), at least 3 pairs, and the reported figure is the median over pairs of
the per-pair ratio of wall times.

Each `fit` is also broken down, with one callback added that has epoch hooks
only (a callback with batch hooks would make Keras synchronise every step):
the compiled `model.train_function` is wrapped in a timer before `fit` runs,
so every step is timed, and the step index tells which steps ran a mask
update. The report gives per arm: the first step (trace, compile and one
step), the sum of the ordinary steps, the sum of the update steps, and the
rest of the fit. Of that rest, the time from each epoch's begin to its first
step and from `on_train_end` to `fit`'s return is given apart as "iterator
waits": there Keras drops a `tf.data` iterator, which can block for seconds
on TensorFlow's autotuning thread (see `_EpochClock`), in either arm; the
report also gives the ratio with those waits taken out of both arms' wall
times, beside the protocol's ratio. The input pipeline is timed apart: one
epoch of the same Keras data adapter, iterated alone (in a fit it runs inside
each step, partly overlapped by prefetching). The `SparsityMonitor` cost is
its own time in `on_epoch_end`, and the monitor arm against the sparse arm.

No validation data are used: the fit is the training alone. The models are
the protocols' (with L2 5e-4 on every kernel, logits out), the learning rate
follows the protocol's steps (x0.1 at 50% and ~77% of the epochs) through a
`PiecewiseConstantDecay` schedule, the same in every arm.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/end_to_end.py \
    --models=mlp,cnn --mlp_epochs=30 --cnn_epochs=2 --pairs=3
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/end_to_end.py --quick
```
"""

import statistics
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
BATCH_SIZE = 128
SPARSITY = 0.8
LEARNING_RATE = 0.05
MOMENTUM = 0.9
UPDATE_INTERVAL = 100
TARGETS = {
    "end_to_end_ratio_without_xla": 1.05,  # at most
    "update_over_ordinary": 2.0,  # at most
    "monitor_overhead": 0.01,  # at most
}
QUICK_EXAMPLES = 2560  # 20 batches

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Protocols to time: mlp, cnn.")
flags.DEFINE_integer("pairs", 3, "Alternating pairs of fits per configuration.")
flags.DEFINE_integer("mlp_epochs", 30, "Epochs of an FMNIST-MLP v1 fit.")
flags.DEFINE_integer("cnn_epochs", 2, "Epochs of an FMNIST-CNN v1 fit.")
flags.DEFINE_bool("xla", True, "Also time every model with jit_compile=True.")
flags.DEFINE_bool("monitor", True,
                  "Add the sparse + SparsityMonitor arm (without XLA).")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for end_to_end.json and end_to_end.md.")
flags.DEFINE_bool("quick", False,
                  "Smoke run: 20 batches, 2 epochs, 1 pair, no XLA; figures "
                  "are not meaningful.")


def _validate_flags():
    """Checks the flags before TensorFlow is imported (fails in a second)."""
    models = benchkit.parse_models(FLAGS.models)
    benchkit.require_at_least(FLAGS, ("pairs", "mlp_epochs", "cnn_epochs"))
    return models


# ------------------------------------------------------------------ fits
def _epochs(name):
    if FLAGS.quick:
        return 2
    return FLAGS.mlp_epochs if name == "mlp" else FLAGS.cnn_epochs


def _update_interval():
    # A quick run has 40 steps: update every 10 so that updates happen.
    return 10 if FLAGS.quick else UPDATE_INTERVAL


def _lr_schedule(steps_per_epoch, epochs):
    import keras

    # Protocol v1: x0.1 at epochs 15 and 23 of 30.
    bounds = [int(round(epochs * 15 / 30)) * steps_per_epoch,
              int(round(epochs * 23 / 30)) * steps_per_epoch]
    bounds = sorted({max(1, b) for b in bounds})
    values = [LEARNING_RATE * 0.1 ** i for i in range(len(bounds) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)


def build(name, arm, jit_compile, steps_per_epoch, epochs):
    """A compiled protocol model for `arm` in {dense, sparse, monitor}."""
    import keras

    from keras_freetickets.sparse_optimizer import SparseOptimizer

    model = protocols.build_model(name, seed=0)
    sgd = keras.optimizers.SGD(_lr_schedule(steps_per_epoch, epochs),
                               momentum=MOMENTUM)
    if arm == "dense":
        optimizer = sgd
    else:
        optimizer = SparseOptimizer(
            sgd, sparsity=SPARSITY, distribution="erk", grow="gradient",
            drop_fraction=0.5, update_interval=_update_interval(),
            total_steps=steps_per_epoch * epochs, seed=0,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


class _StepTimer:
    """Wraps `model.train_function`: the start and duration of every call."""

    def __init__(self, function):
        self.function = function
        self.starts = []
        self.times = []

    def __call__(self, iterator):
        start = time.perf_counter()
        logs = self.function(iterator)
        self.starts.append(start)
        self.times.append(time.perf_counter() - start)
        return logs


class _EpochClock:
    """A callback that records when each epoch begins and when training ends.

    It has no batch hooks, so Keras still dispatches batch ends without
    waiting. Between `on_epoch_begin` and the epoch's first step Keras makes
    the epoch's data iterator and drops the previous one; after
    `on_train_end` it returns from `fit`, dropping the last one. There
    TensorFlow 2.21 was seen to wait for seconds, at random in either arm:
    the main thread blocked in `~RootDataset::Iterator` while the iterator's
    autotuning thread (`tf_data_model`) slept in `Model::OptimizeLoop`
    (benchmarks/SPEED.md).
    """

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epoch_begins = []
                self.train_end = None

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch_begins.append(time.perf_counter())

            def on_train_end(self, logs=None):
                self.train_end = time.perf_counter()

        return Clock()


class _TimedMonitor:
    """A SparsityMonitor whose `on_epoch_end` time is recorded."""

    def __new__(cls):
        from keras_freetickets.sparsity_monitor import SparsityMonitor

        class Timed(SparsityMonitor):
            seconds = 0.0

            def on_epoch_end(self, epoch, logs=None):
                start = time.perf_counter()
                super().on_epoch_end(epoch, logs)
                Timed.seconds += time.perf_counter() - start

        Timed.seconds = 0.0
        return Timed()


def update_steps(optimizer, total_steps):
    """Indices of the steps that run a mask update (0-based, as iterations)."""
    start = optimizer.update_start_step
    end = optimizer.update_end_step
    if end is None:
        end = total_steps
    return {s for s in range(start, min(end, total_steps))
            if (s - start) % optimizer.update_interval == 0}


def one_fit(name, arm, jit_compile, data, epochs):
    """Runs one timed fit; returns its wall time and breakdown (seconds)."""
    import keras

    x, y = data
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    total = steps_per_epoch * epochs
    keras.backend.clear_session()
    model = build(name, arm, jit_compile, steps_per_epoch, epochs)
    model.make_train_function()
    timer = _StepTimer(model.train_function)
    model.train_function = timer
    clock = _EpochClock()
    callbacks = [clock]
    monitor = None
    if arm == "monitor":
        monitor = _TimedMonitor()
        callbacks.append(monitor)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True,
              verbose=0, callbacks=callbacks)
    end = time.perf_counter()
    wall = end - start
    if len(timer.times) != total:
        raise RuntimeError(
            f"Expected {total} timed steps, got {len(timer.times)}: fit did "
            "not use the wrapped train_function."
        )
    updates = set()
    if arm != "dense":
        updates = update_steps(model.optimizer, total)
        ran = int(model.optimizer.mask_updates.numpy())
        if ran != len(updates):
            raise RuntimeError(
                f"Predicted {len(updates)} mask updates, the optimizer ran {ran}."
            )
        problems = model.optimizer.check_invariants()
        if problems:
            raise RuntimeError(f"Mask invariants broken: {problems}")
    ordinary = [t for i, t in enumerate(timer.times) if i > 0 and i not in updates]
    update = [t for i, t in enumerate(timer.times) if i > 0 and i in updates]
    steps_total = sum(timer.times)
    epoch_starts = sum(timer.starts[e * steps_per_epoch] - begin
                       for e, begin in enumerate(clock.epoch_begins))
    fit_end = end - clock.train_end
    return dict(
        wall_s=wall,
        first_step_s=timer.times[0],
        trace_compile_s=timer.times[0] - statistics.median(ordinary),
        ordinary_steps=len(ordinary),
        ordinary_s=sum(ordinary),
        ordinary_median_ms=1e3 * statistics.median(ordinary),
        update_steps=len(update),
        update_s=sum(update),
        update_median_ms=1e3 * statistics.median(update) if update else None,
        outside_steps_s=wall - steps_total,
        epoch_starts_s=epoch_starts,
        fit_end_s=fit_end,
        iterator_waits_s=epoch_starts + fit_end,
        outside_other_s=wall - steps_total - epoch_starts - fit_end,
        wall_less_waits_s=wall - epoch_starts - fit_end,
        monitor_s=(type(monitor).seconds if monitor is not None else None),
    )


def input_pipeline_seconds(data, repeats=3):
    """Median time to iterate one epoch of fit's own data adapter, alone."""
    from keras.src.trainers.data_adapters import get_data_adapter

    x, y = data
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapter = get_data_adapter(x, y, batch_size=BATCH_SIZE, shuffle=True)
        for _ in adapter.get_tf_dataset():
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_data(name):
    from keras_freetickets.contrib.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("train", flatten=(name == "mlp"))
    if FLAGS.quick:
        x, y = x[:QUICK_EXAMPLES], y[:QUICK_EXAMPLES]
    return x, y


def time_configuration(name, jit_compile, pairs):
    data = load_data(name)
    epochs = _epochs(name)
    arms = ["dense", "sparse"]
    if FLAGS.monitor and not jit_compile:
        arms.append("monitor")
    runs = {arm: [] for arm in arms}
    for p in range(pairs):
        order = arms if p % 2 == 0 else arms[::-1]
        for arm in order:
            record = one_fit(name, arm, jit_compile, data, epochs)
            runs[arm].append(record)
            print(f"[end_to_end] {MODELS[name]} xla={jit_compile} pair {p} "
                  f"{arm}: {record['wall_s']:.2f} s", flush=True)

    def pair_ratios(a, b, key="wall_s"):
        return [ra[key] / rb[key] for ra, rb in zip(runs[a], runs[b])]

    def ratio(a, b, key="wall_s"):
        return statistics.median(pair_ratios(a, b, key))

    def med(arm, key):
        values = [r[key] for r in runs[arm] if r[key] is not None]
        return statistics.median(values) if values else None

    breakdown = {
        arm: {key: med(arm, key) for key in runs[arm][0]} for arm in arms
    }
    sparse_ordinary = med("sparse", "ordinary_median_ms")
    sparse_update = med("sparse", "update_median_ms")
    result = dict(
        model=name, protocol=MODELS[name], jit_compile=jit_compile,
        epochs=epochs, examples=len(data[0]), pairs=pairs,
        steps_per_epoch=-(-len(data[0]) // BATCH_SIZE),
        wall_ratio=ratio("sparse", "dense"),
        wall_ratios=pair_ratios("sparse", "dense"),
        wall_ratio_less_waits=ratio("sparse", "dense", "wall_less_waits_s"),
        wall_ratios_less_waits=pair_ratios("sparse", "dense",
                                           "wall_less_waits_s"),
        ordinary_step_ratio=ratio("sparse", "dense", "ordinary_median_ms"),
        update_over_ordinary=(sparse_update / sparse_ordinary
                              if sparse_update else None),
        breakdown=breakdown,
        runs=runs,
        input_pipeline_epoch_s=input_pipeline_seconds(data),
    )
    dense_wall = med("dense", "wall_s")
    sparse_wall = med("sparse", "wall_s")
    excess = sparse_wall - dense_wall
    result["excess_s"] = excess
    result["excess_parts_s"] = dict(
        trace_compile=(med("sparse", "trace_compile_s")
                       - med("dense", "trace_compile_s")),
        ordinary_steps=med("sparse", "ordinary_s") - med("dense", "ordinary_s"),
        update_steps=(med("sparse", "update_s")
                      - med("sparse", "update_steps") * 1e-3
                      * med("dense", "ordinary_median_ms")),
        outside_steps=(med("sparse", "outside_steps_s")
                       - med("dense", "outside_steps_s")),
        iterator_waits=(med("sparse", "iterator_waits_s")
                        - med("dense", "iterator_waits_s")),
        outside_other=(med("sparse", "outside_other_s")
                       - med("dense", "outside_other_s")),
    )
    if "monitor" in arms:
        result["monitor_ratio"] = ratio("monitor", "sparse")
        result["monitor_share"] = med("monitor", "monitor_s") / sparse_wall
    result["met"] = dict(
        end_to_end=(bool(result["wall_ratio"]
                         <= TARGETS["end_to_end_ratio_without_xla"])
                    if not jit_compile else None),
        update=(bool(result["update_over_ordinary"]
                     <= TARGETS["update_over_ordinary"])
                if result["update_over_ordinary"] else None),
        monitor=(bool(result["monitor_share"] <= TARGETS["monitor_overhead"])
                 if "monitor" in arms else None),
    )
    return result


# ---------------------------------------------------------------- report
def _mark(met):
    return "-" if met is None else ("yes" if met else "NO")


def _f(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def render_markdown(report):
    lines = [
        "# End to end (BENCHMARK.md \"Speed figures\" / \"End to end\")",
        "",
        f"- Protocols: End to end, on {', '.join(report['protocols'][:-1])}: the real "
        "Fashion-MNIST train split (55,000 images), batch 128, SGD(0.05, "
        "momentum 0.9) with the protocol's lr steps, L2 5e-4; sparse: "
        "SparseOptimizer S = 0.8 ERK, RigL, p = 0.5, update interval "
        f"{report['settings']['update_interval']}, updates stop at 75% of the "
        "steps. No validation data.",
        f"- Budget: FMNIST-MLP v1 {report['settings']['epochs']['mlp']} epochs"
        f", FMNIST-CNN v1 {report['settings']['epochs']['cnn']} epochs"
        " (the CNN's budget is shorter than the protocol's, for time on 2 "
        "cores; its trace and compile time weighs more in the ratio)."
        + (" QUICK SMOKE RUN: figures are not meaningful."
           if report["settings"]["quick"] else ""),
        f"- Machine: {report['machine']} (ratios are from alternating "
        "fits in one process).",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}"
        f", Keras {report['versions']['keras']}.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s).",
        "",
        "## Wall time of a whole fit, sparse / dense (median over pairs)",
        "",
        "| model | XLA | epochs | pairs | dense s | sparse s | sparse / dense "
        "(target <= 1.05 without XLA) | per-pair ratios | sparse / dense "
        "less the tf.data iterator waits (per-pair) | ordinary step "
        "sparse / dense | update step / ordinary (<= 2) | SparsityMonitor "
        "share of a fit (<= 1%) | monitor arm / sparse arm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        b = r["breakdown"]
        lines.append(
            f"| {r['protocol']} | {'yes' if r['jit_compile'] else 'no'} "
            f"| {r['epochs']} | {r['pairs']} "
            f"| {_f(b['dense']['wall_s'])} | {_f(b['sparse']['wall_s'])} "
            f"| {_f(r['wall_ratio'], 3)} {_mark(r['met']['end_to_end'])} "
            f"| {', '.join(f'{x:.3f}' for x in r['wall_ratios'])} "
            f"| {_f(r['wall_ratio_less_waits'], 3)} ("
            f"{', '.join(f'{x:.3f}' for x in r['wall_ratios_less_waits'])}) "
            f"| {_f(r['ordinary_step_ratio'], 3)} "
            f"| {_f(r['update_over_ordinary'])}x {_mark(r['met']['update'])} "
            f"| {_f(100 * r['monitor_share'], 3) + '%' if 'monitor_share' in r else '-'}"
            f" {_mark(r['met']['monitor'])} "
            f"| {_f(r.get('monitor_ratio'), 3)} |"
        )
    lines += [
        "",
        "## Breakdown (seconds, medians over the fits of each arm)",
        "",
        "First step = trace + compile + one step; trace/compile = first step "
        "minus a median ordinary step. Outside steps = fit wall time minus "
        "the time inside `train_function`; of it, iterator waits = the time "
        "from each `on_epoch_begin` to the epoch's first step plus the time "
        "from `on_train_end` to `fit`'s return, where Keras drops a "
        "`tf.data` iterator and TensorFlow waits for its autotuning thread "
        "(benchmarks/SPEED.md); the rest is setup, epoch ends and callbacks. "
        "Input pipeline = one epoch of fit's data adapter iterated alone "
        "(inside a fit it runs within the steps, partly overlapped).",
        "",
        "| model | XLA | arm | wall | first step | trace/compile | ordinary "
        "steps (n, median ms) | update steps (n, median ms) | outside steps | "
        "of it: iterator waits | of it: the rest | "
        "SparsityMonitor | input pipeline / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for arm, b in r["breakdown"].items():
            lines.append(
                f"| {r['protocol']} | {'yes' if r['jit_compile'] else 'no'} "
                f"| {arm} | {_f(b['wall_s'])} | {_f(b['first_step_s'])} "
                f"| {_f(b['trace_compile_s'])} "
                f"| {_f(b['ordinary_s'])} ({b['ordinary_steps']:.0f}, "
                f"{_f(b['ordinary_median_ms'], 3)}) "
                f"| {_f(b['update_s'])} ({b['update_steps']:.0f}, "
                f"{_f(b['update_median_ms'], 3)}) "
                f"| {_f(b['outside_steps_s'])} | {_f(b['iterator_waits_s'])} "
                f"| {_f(b['outside_other_s'])} | {_f(b['monitor_s'], 4)} "
                f"| {_f(r['input_pipeline_epoch_s'])} |"
            )
    lines += [
        "",
        "## Where the sparse run's excess goes (seconds, sparse minus dense "
        "medians)",
        "",
        "| model | XLA | excess | trace/compile | ordinary steps | update steps "
        "(beyond an ordinary step each) | outside steps | of it: iterator "
        "waits | of it: the rest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        e = r["excess_parts_s"]
        lines.append(
            f"| {r['protocol']} | {'yes' if r['jit_compile'] else 'no'} "
            f"| {_f(r['excess_s'])} | {_f(e['trace_compile'])} "
            f"| {_f(e['ordinary_steps'])} | {_f(e['update_steps'])} "
            f"| {_f(e['outside_steps'])} | {_f(e['iterator_waits'])} "
            f"| {_f(e['outside_other'])} |"
        )
    lines += [
        "",
        "## Fit by fit",
        "",
        "The medians above hide how much a fit's own time moves on a shared "
        "machine: every fit's wall time, median ordinary step and time "
        "outside the steps. Fit n of each arm belongs to pair n; even pairs "
        "(0, 2, ...) ran the arms in the order listed, odd pairs reversed.",
        "",
        "| model | XLA | arm | pair | wall s | ordinary step median ms "
        "| outside steps s | of it: iterator waits s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for arm, runs in r["runs"].items():
            for pair, run in enumerate(runs):
                lines.append(
                    f"| {r['protocol']} | {'yes' if r['jit_compile'] else 'no'} "
                    f"| {arm} | {pair} | {_f(run['wall_s'])} "
                    f"| {_f(run['ordinary_median_ms'], 3)} "
                    f"| {_f(run['outside_steps_s'])} "
                    f"| {_f(run['iterator_waits_s'])} |"
                )
    lines.append("")
    return "\n".join(lines)


def run_benchmark(models):
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    start = time.time()
    pairs = 1 if FLAGS.quick and not FLAGS["pairs"].present else FLAGS.pairs
    use_xla = FLAGS.xla and not (FLAGS.quick and not FLAGS["xla"].present)
    results = []
    for jit in ([False, True] if use_xla else [False]):
        for name in models:
            results.append(time_configuration(name, jit, pairs))
            # Written after every configuration, so that a long run that is
            # stopped keeps what it measured.
            write_report(models, results, pairs, use_xla, start)
    return write_report(models, results, pairs, use_xla, start, echo=True)


def write_report(models, results, pairs, use_xla, start, echo=False):
    report = dict(
        **benchkit.report_header("end_to_end",
                               [MODELS[m] for m in models] + ["End to end"],
                               library_path=True),
        settings=dict(
            batch_size=BATCH_SIZE, sparsity=SPARSITY, distribution="erk",
            grow="gradient", drop_fraction=0.5, update_interval=_update_interval(),
            learning_rate=LEARNING_RATE, momentum=MOMENTUM, l2=protocols.L2,
            epochs={"mlp": _epochs("mlp"), "cnn": _epochs("cnn")},
            pairs=pairs, quick=FLAGS.quick, monitor=FLAGS.monitor,
            configs=["default"] + (["xla"] if use_xla else []),
        ),
        targets=dict(TARGETS),
        results=results,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "end_to_end", report, render_markdown(report),
                        echo=echo)
    return report


def main(argv):
    benchkit.no_arguments(argv)
    models = _validate_flags()
    run_benchmark(models)


if __name__ == "__main__":
    app.run(main)
