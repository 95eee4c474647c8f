"""Serving latency of exported ensembles (BENCHMARK.md, "Speed figures" /
"Serving latency").

The parent process builds and exports, through `FreeTicketsEnsemble.export`:
one dense member (the protocol's model, random init, stored dense), an
M = 3 ensemble of sparse members (S = 0.8, the protocols', or `--sparsity`;
exact-sparsity ERK masks, compact storage) run member by member (the
default), the same ensemble exported with `batched=True`, and, for each
mode in `--kernel_modes`, the per-member ensemble exported with that
`kernel_mode` (the default, "rebuild", folds the compact kernels back into
dense ones; "sparse_matmul" runs the `Dense` layers as `tf.sparse` products
on the stored nonzeros). A child process, which never imports keras_freetickets
(it checks; importing TensorFlow itself loads keras), loads the
SavedModels with `tf.saved_model.load` and times single requests to the
`serving_default` signature at batch 1 and batch 64, interleaved (each
round calls every model `--calls` times, the order alternating between
rounds). Reported: p50 and p99 of the request latency per model and batch,
and the p50 ratio of each ensemble to the dense member. The weights are
random: the figures are about time, not accuracy.

`--floor` adds a model of one Dense(10) layer on the flattened input,
exported the same way: its request is the fixed cost every variant pays,
and the report gives the members' own work at batch 1 less it.

`--threads` times the same SavedModels under several TensorFlow thread
settings, one child process each (the settings bind a whole process):
`default` is TensorFlow's own (a thread per core for both pools), `I:J`
sets `intra_op_parallelism_threads=I` and `inter_op_parallelism_threads=J`,
as TF Serving's `--tensorflow_intra_op_parallelism` and
`--tensorflow_inter_op_parallelism` do. The report also gives, per batch,
each model at its fastest setting.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/serving_latency.py \
    --models=mlp,cnn --rounds=10 --calls=100 --threads=default,1:2
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/serving_latency.py \
    --sparsity=0.9 --kernel_modes=sparse_matmul   # the export's options
```
"""

import json
import pathlib
import shutil
import sys
import tempfile
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
NUM_MEMBERS = 3
SPARSITY = 0.8  # the protocols'; issue 11's target is read there only
BATCHES = (1, 64)
TARGET_P50_RATIO_BATCH_1 = 1.5  # M = 3 over one dense member, at most
VARIANTS = ("dense member", "M = 3 per member", "M = 3 batched")
# `--floor`'s variant: what a request costs beyond the members' own work.
FLOOR = "floor: one Dense(10)"
# export.KERNEL_MODES, here so that the flags are checked before TensorFlow
# loads (a test keeps the two equal). The first is the export's default.
KERNEL_MODES = ("rebuild", "rebuild_variables", "sparse_matmul")

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Protocols: mlp, cnn.")
flags.DEFINE_integer("rounds", 10, "Interleaved rounds per batch size.")
flags.DEFINE_integer("calls", 100, "Requests per model per round.")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for serving_latency.json and .md.")
flags.DEFINE_list(
    "threads", ["default"],
    "TensorFlow thread settings to time, each in its own serving process: "
    "'default', or INTRA:INTER (intra-op and inter-op threads).")
flags.DEFINE_float("sparsity", SPARSITY,
                   "Sparsity of the M = 3 members (the protocols' is 0.8; "
                   "issue 11's target is marked only there).")
flags.DEFINE_list(
    "kernel_modes", [],
    "Further `kernel_mode`s of the per-member M = 3 export to time, each a "
    f"row 'M = 3 per member, <mode>': {', '.join(KERNEL_MODES[1:])}.")
flags.DEFINE_bool(
    "floor", False,
    f"Also time '{FLOOR}': a model of one Dense(10) layer on the flattened "
    "input, exported the same way, whose request is the fixed cost (the "
    "signature call, the input check, the summaries, the result's copy) that "
    "every variant pays; the report then gives the members' own work, M = 3 "
    "over one dense member, less it.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 rounds of 5 calls.")
flags.DEFINE_string("child", None, "Internal: JSON spec of a timing run.")


parse_threads = benchkit.parse_threads


def parse_kernel_modes(values):
    """The extra kernel modes of a `--kernel_modes` list, in order, without
    blanks or repeats; a usage error names a mode that is not one."""
    modes = []
    for value in (v.strip() for v in values):
        if not value or value in modes:
            continue
        if value not in KERNEL_MODES[1:]:
            raise app.UsageError(
                f"Flag --kernel_modes must list modes in {list(KERNEL_MODES[1:])} "
                f"(the default, {KERNEL_MODES[0]!r}, is always timed). "
                f"Received: {value!r}"
            )
        modes.append(value)
    return modes


def _validate_flags():
    models = benchkit.parse_models(FLAGS.models)
    benchkit.require_at_least(FLAGS, ("rounds", "calls"))
    if not 0.0 < FLAGS.sparsity < 1.0:
        raise app.UsageError(
            f"Flag --sparsity must be in (0, 1). Received: {FLAGS.sparsity}"
        )
    return (models, parse_threads(FLAGS.threads),
            parse_kernel_modes(FLAGS.kernel_modes), FLAGS.sparsity, FLAGS.floor)


# ------------------------------------------------------------------ export
def _sparsify(model, sparsity, seed):
    """Exact-sparsity ERK masks on the prunable kernels, random biases."""
    import keras
    import numpy as np

    from keras_freetickets import distributions, prunable

    rng = np.random.default_rng(seed)
    kernels = prunable.prunable_variables(model.weights)
    shapes = {v.path: tuple(v.shape) for v in kernels}
    sparsities = distributions.compute_sparsities(shapes, sparsity, "erk")
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable).copy()
        if variable.path in sparsities:
            active = distributions.active_count(value.size, sparsities[variable.path])
            flat = value.reshape(-1)
            flat[rng.permutation(flat.size)[active:]] = 0.0
        elif variable.path.endswith("bias"):
            value = rng.normal(scale=0.1, size=value.shape).astype("float32")
        variable.assign(value)
    return model


def export_models(name, work, kernel_modes=(), sparsity=SPARSITY, floor=False):
    """Exports the variants; returns {variant: path}, in `VARIANTS` order,
    then one 'M = 3 per member, <mode>' per extra kernel mode and, with
    `floor`, the `FLOOR` model."""
    import keras

    from keras_freetickets.ensemble import FreeTicketsEnsemble

    dense = protocols.build_model(name, seed=100)
    members = [
        _sparsify(protocols.build_model(name, seed=s), sparsity, s)
        for s in range(NUM_MEMBERS)
    ]
    per_member = FreeTicketsEnsemble(members)
    exports = list(zip(VARIANTS, (
        FreeTicketsEnsemble([dense]), per_member,
        FreeTicketsEnsemble(members, batched=True),
    ), ({}, {}, {}))) + [
        (f"{VARIANTS[1]}, {mode}", per_member, dict(kernel_mode=mode))
        for mode in kernel_modes
    ]
    if floor:
        head = dense.layers[-1]
        model = keras.Sequential([
            keras.Input(dense.input_shape[1:]), keras.layers.Flatten(),
            keras.layers.Dense(head.units, activation=head.activation),
        ])
        exports.append((FLOOR, FreeTicketsEnsemble([model]), {}))
    paths = {}
    for index, (label, ensemble, kwargs) in enumerate(exports):
        path = work / f"{name}_{index}" / "1"
        ensemble.export(str(path), **kwargs)
        paths[label] = str(path)
    return paths


# ------------------------------------------------------------------ child
def _quantile(values, q):
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def child_main(spec):
    """Times requests in a process that has only TensorFlow loaded."""
    import numpy as np
    import tensorflow as tf

    spec = json.loads(spec)
    threads = benchkit.set_thread_pools(spec["threads"])
    loaded_modules = [m for m in ("keras_freetickets", "keras") if m in sys.modules]
    signatures = {
        label: tf.saved_model.load(path).signatures["serving_default"]
        for label, path in spec["paths"].items()
    }
    if "keras_freetickets" in sys.modules:
        raise RuntimeError("The serving process imported keras_freetickets.")
    shape = tuple(spec["input_shape"])
    results = {}
    for batch in spec["batches"]:
        x = tf.constant(
            np.random.default_rng(batch).random((batch,) + shape, dtype=np.float32)
        )
        for fn in signatures.values():  # warm up: Grappler folds here
            for _ in range(3):
                fn(inputs=x)["probabilities"].numpy()
        latencies = {label: [] for label in signatures}
        labels = list(signatures)
        for r in range(spec["rounds"]):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                fn = signatures[label]
                for _ in range(spec["calls"]):
                    start = time.perf_counter()
                    fn(inputs=x)["probabilities"].numpy()
                    latencies[label].append(time.perf_counter() - start)
        results[str(batch)] = {
            label: dict(
                p50_ms=1e3 * _quantile(values, 0.5),
                p99_ms=1e3 * _quantile(values, 0.99),
                requests=len(values),
            )
            for label, values in latencies.items()
        }
    print("LATENCY_JSON " + json.dumps(dict(
        results=results, modules_loaded_at_start=loaded_modules,
        threads=threads,
        keras_loaded_after=("keras" in sys.modules),
    )), flush=True)


def time_in_child(name, paths, rounds, calls, threads=None):
    shape = (784,) if name == "mlp" else (28, 28, 1)
    # The child runs this file with only --child: its imports are absl,
    # the standard library, numpy and TensorFlow.
    return benchkit.run_child(
        pathlib.Path(__file__).resolve(),
        dict(paths=paths, input_shape=shape, batches=list(BATCHES),
             rounds=rounds, calls=calls, threads=threads),
        "LATENCY_JSON")


# ----------------------------------------------------------------- report
def _mark(batch, label, ratio, sparsity=SPARSITY):
    if batch != "1" or not label.startswith("M = 3") or sparsity != SPARSITY:
        return ""
    return " yes" if ratio <= TARGET_P50_RATIO_BATCH_1 else " NO"


def members_work(rows):
    """(M = 3 per member less the floor) / (dense member less the floor)
    from one batch's p50s, or None without a floor or when the dense member
    is not above it."""
    if FLOOR not in rows:
        return None
    floor = rows[FLOOR]["p50_ms"]
    one = rows["dense member"]["p50_ms"] - floor
    if one <= 0:
        return None
    return (rows["M = 3 per member"]["p50_ms"] - floor) / one


def fastest_settings(by_threads):
    """{batch: {variant: {threads, p50_ms, ratio}}}: each variant at the
    thread setting of its lowest p50, the ratio against the dense member at
    its own fastest setting."""
    fastest = {}
    first = next(iter(by_threads.values()))["latency"]
    for batch in first:
        rows = {}
        for label in first[batch]:
            setting, p50 = min(
                ((s, t["latency"][batch][label]["p50_ms"])
                 for s, t in by_threads.items()),
                key=lambda item: item[1],
            )
            rows[label] = dict(threads=setting, p50_ms=p50)
        for row in rows.values():
            row["ratio"] = row["p50_ms"] / rows["dense member"]["p50_ms"]
        fastest[batch] = rows
    return fastest


def render_markdown(report):
    sparsity = report["settings"]["sparsity"]
    lines = [
        "# Serving latency (BENCHMARK.md \"Speed figures\" / \"Serving latency\")",
        "",
        f"- Protocols: Serving latency, on {', '.join(report['protocols'][:-1])} "
        f"(architectures only, random weights; members at S = {sparsity} with "
        "exact-sparsity ERK masks, stored compact; the dense member stored "
        "dense)."
        + ("" if sparsity == SPARSITY else
           f" The protocols' sparsity is {SPARSITY}: issue 11's target is "
           "not marked at this one."),
        "- Variants: `M = 3 per member` is the default export (compact "
        "kernels folded back into dense ones at load); `M = 3 batched` is "
        "`FreeTicketsEnsemble(members, batched=True)`; `M = 3 per member, "
        "<mode>` is the per-member export with that `kernel_mode`.",
        "- Requests: one `serving_default` call each (`tf.saved_model.load`, "
        "in a process that never imports keras_freetickets; importing "
        "TensorFlow there loads keras, for `tf.keras`), timed from the call "
        "to the numpy result; "
        f"{report['settings']['rounds']} interleaved rounds of "
        f"{report['settings']['calls']} requests per model."
        + (" QUICK SMOKE RUN: figures are not meaningful."
           if report["settings"]["quick"] else ""),
        f"- Machine: {report['machine']} (p99 follows the machine's load).",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}.",
        "- Threads: `default` is TensorFlow's own setting; `I:J` is "
        "intra-op I, inter-op J threads (TF Serving's "
        "`--tensorflow_intra_op_parallelism` / `--tensorflow_inter_op_parallelism`); "
        "each setting runs in its own serving process, so its ratios are "
        "within one process and figures across settings are not.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s).",
        "",
        "| model | threads | batch | variant | p50 ms | p99 ms | p50 / dense member "
        f"(target at batch 1: <= {TARGET_P50_RATIO_BATCH_1}) | p99 / dense member |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for setting, timing in r["by_threads"].items():
            for batch, rows in timing["latency"].items():
                base = rows["dense member"]
                for label, row in rows.items():
                    ratio = row["p50_ms"] / base["p50_ms"]
                    lines.append(
                        f"| {r['protocol']} | {setting} | {batch} | {label} "
                        f"| {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
                        f"| {ratio:.2f}{_mark(batch, label, ratio, sparsity)} "
                        f"| {row['p99_ms'] / base['p99_ms']:.2f} |"
                    )
    lines += [
        "",
        "Each model at its fastest thread setting (lowest p50 per batch), "
        "against the dense member at its own fastest (figures from different "
        "serving processes):",
        "",
        "| model | batch | variant | fastest setting | p50 ms | p50 / dense member at its fastest |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for batch, rows in r["fastest"].items():
            for label, row in rows.items():
                lines.append(
                    f"| {r['protocol']} | {batch} | {label} | {row['threads']} "
                    f"| {row['p50_ms']:.3f} | {row['ratio']:.2f}"
                    f"{_mark(batch, label, row['ratio'], sparsity)} |"
                )
    work = [
        (r["protocol"], setting, rows, members_work(rows))
        for r in report["results"]
        for setting, timing in r["by_threads"].items()
        for rows in [timing["latency"]["1"]] if FLOOR in rows
    ]
    if work:
        lines += [
            "",
            f"The members' own work at batch 1: each p50 less the floor's "
            f"(`{FLOOR}`, the fixed cost of a request), within one serving process:",
            "",
            "| model | threads | floor ms | dense member less the floor ms "
            "| M = 3 per member less the floor ms | M = 3 work / one member's work |",
            "|---|---|---|---|---|---|",
        ]
        for protocol, setting, rows, ratio in work:
            base = rows[FLOOR]["p50_ms"]
            lines.append(
                f"| {protocol} | {setting} | {base:.3f} "
                f"| {rows['dense member']['p50_ms'] - base:.3f} "
                f"| {rows['M = 3 per member']['p50_ms'] - base:.3f} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
    return "\n".join(lines)


def run_benchmark(models, threads, kernel_modes=(), sparsity=SPARSITY, floor=False):
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    start = time.time()
    rounds = 2 if FLAGS.quick else FLAGS.rounds
    calls = 5 if FLAGS.quick else FLAGS.calls
    results = []
    work = pathlib.Path(tempfile.mkdtemp(prefix="kft_serving_"))
    try:
        for name in models:
            paths = export_models(name, work, kernel_modes, sparsity, floor)
            keras.backend.clear_session()
            by_threads = {}
            for setting, pools in threads.items():
                timing = time_in_child(name, paths, rounds, calls, pools)
                by_threads[setting] = dict(
                    latency=timing["results"],
                    threads_in_effect=timing["threads"],
                    serving_process=dict(
                        modules_loaded_at_start=timing["modules_loaded_at_start"],
                        keras_loaded_after=timing["keras_loaded_after"],
                    ),
                )
                one = timing["results"]["1"]
                ratio = one["M = 3 per member"]["p50_ms"] / one["dense member"]["p50_ms"]
                print(f"[serving] {MODELS[name]}, threads {setting}: batch-1 "
                      f"p50 ratio {ratio:.2f}", flush=True)
            first = next(iter(by_threads.values()))
            results.append(dict(
                model=name, protocol=MODELS[name],
                # The first setting's figures (TensorFlow's default unless
                # --threads says otherwise).
                latency=first["latency"], serving_process=first["serving_process"],
                by_threads=by_threads, fastest=fastest_settings(by_threads),
            ))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = dict(
        **benchkit.report_header("serving_latency",
                               [MODELS[m] for m in models] + ["Serving latency"]),
        settings=dict(num_members=NUM_MEMBERS, sparsity=sparsity,
                      kernel_modes=[KERNEL_MODES[0], *kernel_modes],
                      batches=list(BATCHES), rounds=rounds, calls=calls,
                      threads=list(threads), floor=floor, quick=FLAGS.quick),
        target=dict(p50_ratio_batch_1=TARGET_P50_RATIO_BATCH_1),
        results=results,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "serving_latency", report, render_markdown(report))
    return report


def main(argv):
    benchkit.no_arguments(argv)
    if FLAGS.child:
        child_main(FLAGS.child)
        return
    run_benchmark(*_validate_flags())


if __name__ == "__main__":
    app.run(main)
