"""Speed figures of `SparseOptimizer` (BENCHMARK.md, "Speed figures").

Measures, on the FMNIST-MLP v1 and FMNIST-CNN v1 models at batch 128 with
S = 0.8, ERK, RigL (gradient growth, p = 0.5):

1. Optimizer overhead: median train-step time with
   `SparseOptimizer(SGD(0.05, momentum=0.9))` and no mask update in the timed
   window, divided by plain `SGD(0.05, momentum=0.9)` on the same dense model.
2. Mask-update cost: median time of a step that runs a prune-and-grow update
   (`update_interval=1, update_start_step=0`) divided by an ordinary sparse
   step, and its share of training time at `update_interval=100`:
   `(ratio - 1) / 100`.
3. The fused SGD update: `SparseOptimizer` applies SGD to the kernels it
   masks with one TensorFlow op (the same result bit for bit). Two reference
   variants show what that does to the overhead: plain SGD given the same
   fused update for every variable, and the sparse wrapper with Keras's own
   SGD update (`fused_sgd=False`); without XLA only, where the library uses
   the fused op.
4. Memory: `SparseOptimizer.state_bytes()` over the bytes of the model's
   weights, and the peak resident set size (`ru_maxrss`) of a short plain and a
   short sparse training run, each in its own subprocess.

Step times do not depend on the values, so the data are random arrays of the
right shape. The variants (plain, sparse, sparse with an update on every
step, and the two references of point 3) are built in one process and timed
in interleaved blocks (A B C, C B A, ...): each block calls the compiled
`model.train_function` (the function `model.fit` runs,
`steps_per_execution=1`) on an iterator over one fixed batch, timing every
call. Medians are taken over all timed steps. The configuration
is repeated with `jit_compile=True` (XLA on CPU) unless `--noxla`.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/speed.py \
    --models=mlp,cnn --out=benchmarks/results
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/speed.py --quick
```
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
ARMS = ("dense", "sparse", "update")
# References timed without XLA only: the fused SGD update's two (see
# make_optimizer; XLA does not use the fused op), and the update step with
# the selections as TensorFlow ops instead of the compiled op (XLA never uses
# it), present when `keras_freetickets.native` is built.
REFERENCE_ARMS = ("sparse_keras_sgd", "dense_fused_sgd")
TF_SELECTION_ARM = "update_tf_selection"
# The ordinary sparse step traced with the library's compiled ops off: the
# masked kernels' update as TensorFlow's Select and fused SGD op, two passes
# where `native.masked_sgd_update` takes one (present when it is built).
TF_UPDATE_ARM = "sparse_tf_update"
BATCH_SIZE = 128
SPARSITY = 0.8
LEARNING_RATE = 0.05
MOMENTUM = 0.9
L2 = 5e-4
NEVER = 10**12  # an update_start_step no benchmark reaches

TARGETS = {
    "overhead_ratio": 1.05,  # at most
    "update_share_at_interval_100": 0.01,  # under
    "state_ratio": 0.5,  # at most
}

# Steps per timed block and blocks per variant. A block is long enough to be
# timed well and short enough that the variants see the same machine load.
STEPS_PER_BLOCK = {"mlp": 50, "cnn": 10}
DEFAULT_REPEATS = {"mlp": 20, "cnn": 20}
RSS_STEPS = {"mlp": 200, "cnn": 30}
QUICK = dict(steps={"mlp": 5, "cnn": 2}, repeats=3, warmup=2,
             rss_steps={"mlp": 5, "cnn": 2})

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Models to time: mlp, cnn.")
flags.DEFINE_integer(
    "repeats", None,
    "Timed blocks per variant (default: 20; 3 with --quick).",
)
flags.DEFINE_integer(
    "steps_per_block", None,
    "Train steps per timed block (default: 50 for mlp, 10 for cnn).",
)
flags.DEFINE_integer("warmup", 5, "Untimed steps per variant after tracing.")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for speed.json and speed.md.")
flags.DEFINE_bool("xla", True,
                  "Also time every model with jit_compile=True.")
flags.DEFINE_bool("rss", True,
                  "Measure peak RSS in subprocesses (one per variant).")
flags.DEFINE_bool("quick", False,
                  "Smoke run of ~30 s: tiny blocks, few repeats.")
flags.DEFINE_string("child", None,
                    "Internal: `model:variant:jit` RSS run in this process.")
flags.DEFINE_integer("child_steps", 50, "Internal: steps of an RSS run.")


# ----------------------------------------------------------------- models
def build_model(name, seed=0):
    """The protocol's model, with L2 5e-4 on every kernel."""
    if name not in MODELS:
        raise ValueError(
            f"Argument `models` must name models in {sorted(MODELS)}. "
            f"Received: {name!r}"
        )
    return protocols.build_model(name, seed=seed, l2=L2, softmax=True)


def random_batch(name, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (BATCH_SIZE, 784) if name == "mlp" else (BATCH_SIZE, 28, 28, 1)
    x = rng.random(shape, dtype=np.float32)
    y = rng.integers(0, 10, size=(BATCH_SIZE,)).astype(np.int32)
    return x, y


def _fused_sgd(learning_rate, momentum):
    """Plain SGD whose every update is TensorFlow's fused momentum op: the
    reference for what the fusion alone is worth (`SparseOptimizer` fuses
    only the kernels it masks). Timed without XLA only (REFERENCE_ARMS)."""
    import keras
    import tensorflow as tf

    class FusedSGD(keras.optimizers.SGD):
        def build(self, variables):
            super().build(variables)
            # update_step sees each variable's backend variable.
            self.slot_index = {id(v.value): i for i, v in enumerate(variables)}
            self.fused = set()  # indices whose update was traced fused

        def update_step(self, gradient, variable, learning_rate):
            index = self.slot_index.get(id(variable))
            if index is None or not isinstance(gradient, tf.Tensor):
                return super().update_step(gradient, variable, learning_rate)
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=variable.handle, accum=self.momentums[index].value.handle,
                lr=tf.cast(learning_rate, variable.dtype), grad=gradient,
                momentum=tf.constant(self.momentum, variable.dtype),
                use_nesterov=False)
            self.fused.add(index)

    return FusedSGD(learning_rate, momentum=momentum)


def make_optimizer(variant):
    """Plain SGD, or the sparse wrapper without / with an update every step;
    and two references for the fused SGD update of the masked kernels: the
    sparse wrapper with Keras's own SGD update, and plain SGD with every
    variable's update through the same fused op."""
    import keras

    if variant == "dense_fused_sgd":
        return _fused_sgd(LEARNING_RATE, MOMENTUM)
    sgd = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
    if variant == "dense":
        return sgd
    from keras_freetickets.sparse_optimizer import SparseOptimizer

    if variant in ("sparse", "sparse_keras_sgd", TF_UPDATE_ARM):
        return SparseOptimizer(
            sgd, sparsity=SPARSITY, distribution="erk", grow="gradient",
            drop_fraction=0.5, update_interval=100, update_start_step=NEVER,
            fused_sgd=variant == "sparse",
        )
    if variant in ("update", TF_SELECTION_ARM):
        return SparseOptimizer(
            sgd, sparsity=SPARSITY, distribution="erk", grow="gradient",
            drop_fraction=0.5, update_interval=1, update_start_step=0,
        )
    raise ValueError(f"Unknown variant {variant!r}")


def compiled(name, variant, jit_compile):
    model = build_model(name)
    model.compile(
        optimizer=make_optimizer(variant),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


# ----------------------------------------------------------------- timing
class _Runner:
    """One compiled model, stepped on an endless iterator over one batch."""

    def __init__(self, name, variant, jit_compile, batch):
        import tensorflow as tf
        from keras_freetickets import native

        self.variant = variant
        self.model = compiled(name, variant, jit_compile)
        dataset = tf.data.Dataset.from_tensors(batch)
        # Builds the model, the optimizer (and masks) and train_function,
        # and traces the step for a dataset iterator, as fit does; the
        # selection op is chosen when the step is traced.
        native.set_enabled(
            False if variant in (TF_SELECTION_ARM, TF_UPDATE_ARM) else None)
        try:
            self.model.fit(dataset, epochs=1, verbose=0)
        finally:
            native.set_enabled(None)
        self.iterator = iter(dataset.repeat())
        self.function = self.model.train_function
        self.times = []
        self.block_medians = []

    def step(self):
        self.function(self.iterator)

    def warm(self, steps):
        for _ in range(steps):
            self.step()

    def block(self, steps):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.function(self.iterator)
            times.append(time.perf_counter() - start)
        self.times.extend(times)
        self.block_medians.append(_median(times))


def _median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    mid = n // 2
    return values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid])


def _quantile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_variants(name, jit_compile, repeats, steps, warmup):
    """Interleaved timing of the variants; returns the figures."""
    import numpy as np

    from keras_freetickets import native

    batch = random_batch(name)
    arms = ARMS if jit_compile else ARMS + REFERENCE_ARMS
    compiled_selection = native.available() and not jit_compile
    if compiled_selection:
        arms += (TF_SELECTION_ARM, TF_UPDATE_ARM)
    runners = {v: _Runner(name, v, jit_compile, batch) for v in arms}
    for runner in runners.values():
        runner.warm(warmup)
    order = list(arms)
    for r in range(repeats):
        for variant in (order if r % 2 == 0 else order[::-1]):
            runners[variant].block(steps)

    sparse_opt = runners["sparse"].model.optimizer
    if "dense_fused_sgd" in runners:
        fused = runners["dense_fused_sgd"].model.optimizer
        if len(fused.fused) != len(fused.momentums):
            raise RuntimeError("The 'dense_fused_sgd' variant left variables "
                               "on Keras's update.")
    for variant in ("sparse", "sparse_keras_sgd", TF_UPDATE_ARM):
        if (variant in runners
                and runners[variant].model.optimizer.mask_updates.numpy()):
            raise RuntimeError(f"The {variant!r} variant ran a mask update.")
    for variant in ("update", TF_SELECTION_ARM):
        if variant not in runners:
            continue
        update_opt = runners[variant].model.optimizer
        if update_opt.mask_updates.numpy() < repeats * steps:
            raise RuntimeError(f"The {variant!r} variant skipped mask updates.")
        problems = update_opt.check_invariants()
        if problems:
            raise RuntimeError(f"Mask invariants broken: {problems}")

    step_ms = {}
    for variant, runner in runners.items():
        ms = [t * 1e3 for t in runner.times]
        step_ms[variant] = dict(
            median=_median(ms), p25=_quantile(ms, 0.25),
            p75=_quantile(ms, 0.75), steps=len(ms),
        )

    def paired(a, b):
        return _median([
            x / y for x, y in zip(runners[a].block_medians,
                                  runners[b].block_medians)
        ])

    overhead = step_ms["sparse"]["median"] / step_ms["dense"]["median"]
    update_ratio = step_ms["update"]["median"] / step_ms["sparse"]["median"]
    share = (update_ratio - 1.0) / 100.0

    model = runners["sparse"].model
    weight_bytes = int(sum(
        np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights
    ))
    state_bytes = int(sparse_opt.state_bytes())
    inner_bytes = int(sum(
        np.prod(v.shape) * np.dtype(v.dtype).itemsize
        for v in sparse_opt.inner_optimizer.variables
    ))
    return dict(
        step_ms=step_ms,
        overhead_ratio=overhead,
        overhead_ratio_paired=paired("sparse", "dense"),
        overhead_met=bool(overhead <= TARGETS["overhead_ratio"]),
        # The references of the fused SGD update (see make_optimizer).
        overhead_vs_fused_dense_paired=(
            None if jit_compile else paired("sparse", "dense_fused_sgd")),
        keras_sgd_over_fused_paired=(
            None if jit_compile else paired("sparse_keras_sgd", "sparse")),
        # The ordinary step with TensorFlow's masked update over the
        # library's compiled one (paired).
        tf_update_over_sparse_paired=(
            paired(TF_UPDATE_ARM, "sparse") if compiled_selection else None),
        update_ratio=update_ratio,
        update_ratio_paired=paired("update", "sparse"),
        # Whether the update variant's selections ran the compiled op, and
        # the update step with TensorFlow's ops over an ordinary step.
        compiled_selection=compiled_selection,
        update_ratio_tf_selection=(
            step_ms[TF_SELECTION_ARM]["median"] / step_ms["sparse"]["median"]
            if compiled_selection else None),
        update_share_at_interval_100=share,
        update_met=bool(share < TARGETS["update_share_at_interval_100"]),
        weight_bytes=weight_bytes,
        state_bytes=state_bytes,
        inner_optimizer_state_bytes=inner_bytes,
        state_ratio=state_bytes / weight_bytes,
        state_met=bool(state_bytes / weight_bytes <= TARGETS["state_ratio"]),
        sparse_layers=len(sparse_opt.sparse_layers),
    )


# -------------------------------------------------------------------- RSS
def _proc_status_kib(field):
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets the kernel's peak-RSS mark (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child_main(spec, steps):
    """Runs `steps` training steps with model.fit; prints peak RSS as JSON.

    `ru_maxrss` is the whole process's peak, TensorFlow's import included.
    The peak of the model's own part is VmHWM after a reset of the mark
    right after the import, less the RSS at that moment.
    """
    import keras  # noqa: F401
    import tensorflow as tf

    import keras_freetickets.sparse_optimizer  # noqa: F401

    name, variant, jit = spec.split(":")
    import_kib = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    model = compiled(name, variant, jit == "1")
    batch = random_batch(name)
    dataset = tf.data.Dataset.from_tensors(batch).repeat(steps)
    model.fit(dataset, epochs=1, verbose=0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_kib = _proc_status_kib("VmHWM") if reset else None
    print("RSS_JSON " + json.dumps(dict(
        import_kib=import_kib, peak_kib=peak_kib, hwm_since_import_kib=hwm_kib,
        steps=steps,
    )), flush=True)


def measure_rss(name, jit_compile, steps):
    """Peak RSS (MiB) of short plain and sparse fit runs, one process each."""
    out = {}
    for variant in ("dense", "sparse"):
        spec = f"{name}:{variant}:{int(jit_compile)}"
        proc = subprocess.run(
            [sys.executable, str(pathlib.Path(__file__).resolve()),
             f"--child={spec}", f"--child_steps={steps}"],
            capture_output=True, text=True, check=False,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        lines = [ln for ln in proc.stdout.splitlines()
                 if ln.startswith("RSS_JSON ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"RSS run {spec} failed (rc={proc.returncode}):\n"
                f"{proc.stderr[-3000:]}"
            )
        record = json.loads(lines[-1][len("RSS_JSON "):])
        hwm = record["hwm_since_import_kib"]
        if hwm is None or record["import_kib"] is None:
            hwm = record["peak_kib"]  # no reset allowed: whole-process peak
        out[variant] = dict(
            peak_mib=record["peak_kib"] / 1024.0,
            after_import_mib=(record["import_kib"] or 0) / 1024.0,
            above_import_mib=(hwm - (record["import_kib"] or 0)) / 1024.0,
        )
    out["steps"] = steps
    out["peak_ratio"] = out["sparse"]["peak_mib"] / out["dense"]["peak_mib"]
    out["above_import_ratio"] = (
        out["sparse"]["above_import_mib"]
        / max(out["dense"]["above_import_mib"], 1e-9)
    )
    return out


# ----------------------------------------------------------------- report
def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def _mark(met):
    return "yes" if met else "NO"


def render_markdown(report):
    lines = [
        "# Speed figures (BENCHMARK.md \"Speed figures\")",
        "",
        f"- Protocols: {', '.join(report['protocols'])}; batch "
        f"{report['settings']['batch_size']}, S = {SPARSITY} ERK, RigL, "
        "p = 0.5, SGD(0.05, momentum 0.9), L2 5e-4; random data of the "
        "protocol's shape.",
        f"- Machine: {report['machine']}.",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}"
        f", Keras {report['versions']['keras']}.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s).",
        "- Times: medians over all timed steps of interleaved blocks "
        "(plain / sparse / sparse+update / the two references, order "
        "alternating); "
        f"steps per block {report['settings']['steps_per_block']}, blocks "
        f"{report['settings']['repeats']}."
        + (" QUICK SMOKE RUN: figures are not meaningful." if
           report["settings"]["quick"] else ""),
        "",
        "| model | XLA | plain ms/step | sparse ms/step | overhead "
        "(<= 1.05) | sparse / plain, both with the fused SGD update | "
        "sparse with Keras's SGD update / sparse | sparse with TensorFlow's "
        "masked update / sparse | update-step ms | update "
        "/ ordinary | share at interval 100 (< 1%) | update / ordinary with "
        "TensorFlow's selection ops | state / weights "
        "(<= 0.5) | peak RSS plain / sparse MiB (+ above import) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ms = r["step_ms"]
        rss = r.get("rss")
        rss_text = (
            f"{rss['dense']['peak_mib']:.0f} / {rss['sparse']['peak_mib']:.0f}"
            f" (+{rss['dense']['above_import_mib']:.0f} / "
            f"+{rss['sparse']['above_import_mib']:.0f})" if rss else "-"
        )
        lines.append(
            f"| {r['protocol']} | {'yes' if r['jit_compile'] else 'no'} "
            f"| {_fmt(ms['dense']['median'])} | {_fmt(ms['sparse']['median'])}"
            f" | {_fmt(r['overhead_ratio'], 3)} "
            f"(paired {_fmt(r['overhead_ratio_paired'], 3)}) "
            f"{_mark(r['overhead_met'])} "
            f"| {_fmt(r['overhead_vs_fused_dense_paired'], 3)} "
            f"| {_fmt(r['keras_sgd_over_fused_paired'], 3)} "
            f"| {_fmt(r.get('tf_update_over_sparse_paired'), 3)} "
            f"| {_fmt(ms['update']['median'])} "
            f"| {_fmt(r['update_ratio'], 2)}x "
            f"| {100 * r['update_share_at_interval_100']:.2f}% "
            f"{_mark(r['update_met'])} "
            f"| {_fmt(r.get('update_ratio_tf_selection'), 2)} "
            f"| {_fmt(r['state_ratio'], 3)} {_mark(r['state_met'])} "
            f"| {rss_text} |"
        )
    lines += [
        "",
        "Overhead = median sparse step (no mask update in the window) / "
        "median plain step; paired = median over rounds of the per-block "
        "ratio. The two reference columns (paired ratios) show what the "
        "sparse wrapper's fused SGD update of the masked kernels "
        "(`ResourceApplyKerasMomentum`, the same arithmetic) does: against "
        "plain SGD given the same fused update for every variable, and "
        "against the wrapper with Keras's own SGD update (`fused_sgd=False`)."
        " They are not timed under XLA, where the library does not use the "
        "fused op. Where `keras_freetickets.native` is built, the masked "
        "kernels' select and SGD update are one compiled op "
        "(`masked_sgd_update`); the column after them is the same ordinary "
        "step traced with TensorFlow's Select and fused op instead (paired)."
        " Update / ordinary = median step with a prune-and-grow update "
        "(update_interval=1) / median sparse step without; share = (ratio - "
        "1) / 100. Its selections run the compiled op of "
        "`keras_freetickets.native` when it is built (not under XLA); the "
        "column after the share is the same update step traced with "
        "TensorFlow's selection ops, timed in the same rounds. State = `SparseOptimizer.state_bytes()` (masks, "
        "ever-active records, counters), weights = all model weights. Peak "
        "RSS = `ru_maxrss` of a separate process that imports TensorFlow, "
        "builds the model and runs a short `fit` (in brackets: the peak "
        "minus the RSS right after importing TensorFlow).",
        "",
    ]
    return "\n".join(lines)


def run_benchmark():
    quick = FLAGS.quick
    models = benchkit.parse_models(FLAGS.models)
    for flag in ("repeats", "steps_per_block"):
        if FLAGS[flag].value is not None:
            benchkit.require_at_least(FLAGS, [flag])
    import keras

    start = time.time()
    steps = dict(QUICK["steps"] if quick else STEPS_PER_BLOCK)
    repeats = dict(DEFAULT_REPEATS)
    rss_steps = dict(QUICK["rss_steps"] if quick else RSS_STEPS)
    warmup = QUICK["warmup"] if quick else FLAGS.warmup
    if quick:
        repeats = {m: QUICK["repeats"] for m in repeats}
    if FLAGS.steps_per_block is not None:
        steps = {m: FLAGS.steps_per_block for m in steps}
    if FLAGS.repeats is not None:
        repeats = {m: FLAGS.repeats for m in repeats}
    # --quick leaves XLA out (its compiles take ~30 s) unless asked for.
    use_xla = FLAGS.xla and not (quick and not FLAGS["xla"].present)
    configs = [False, True] if use_xla else [False]

    results = []
    for jit in configs:
        for m in models:
            t0 = time.time()
            figures = time_variants(m, jit, repeats[m], steps[m], warmup)
            if FLAGS.rss:
                figures["rss"] = measure_rss(m, jit, rss_steps[m])
            keras.backend.clear_session()
            figures.update(
                model=m, protocol=MODELS[m], jit_compile=jit,
                seconds=time.time() - t0,
            )
            results.append(figures)
            print(f"[speed] {MODELS[m]} jit={jit}: overhead "
                  f"{figures['overhead_ratio']:.3f}, update "
                  f"{figures['update_ratio']:.2f}x "
                  f"({time.time() - t0:.0f} s)", flush=True)

    report = dict(
        **benchkit.report_header("speed", [MODELS[m] for m in models],
                               library_path=True),
        settings=dict(
            batch_size=BATCH_SIZE, sparsity=SPARSITY, distribution="erk",
            grow="gradient", drop_fraction=0.5, learning_rate=LEARNING_RATE,
            momentum=MOMENTUM, l2=L2, repeats=repeats, steps_per_block=steps,
            warmup=warmup, rss_steps=rss_steps if FLAGS.rss else None,
            quick=quick, configs=["default"] + (["xla"] if use_xla else []),
        ),
        targets=dict(TARGETS),
        results=results,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "speed", report, render_markdown(report))
    return report


def main(argv):
    benchkit.no_arguments(argv)
    if FLAGS.child:
        _child_main(FLAGS.child, FLAGS.child_steps)
        return
    run_benchmark()


if __name__ == "__main__":
    app.run(main)
