"""What a batch-1 request's member work costs: one dense product `x @ W`,
`x` of shape `[1, --inputs]`, timed against the bytes of its kernels
(BENCHMARK.md "Serving latency": the part of a request that grows with the
members).

An exported ensemble runs each member's kernels as graph constants (the
default export folds the compact kernels back into dense ones at load, zeros
included), so at batch 1 a member's work is reading its kernels once per
request. This script times that alone, for the kernel sets of `--kernels`:
`N` is one `inputs x N` float32 kernel, `NxC` is C separate `inputs x N`
kernels in one function (C members' first layers). Each set is a
`tf.function` with its kernels as graph constants (distinct random values),
called from Python with a `[1, inputs]` input; a no-op function (`x + 1`) is
timed beside them, and each set's figure is its p50 less the no-op's, with
the rate at which that reads the kernels' bytes. The sets are timed in
interleaved rounds (order alternating), each `--threads` setting in its own
process (the settings bind a whole process), whose only imports are absl,
numpy and TensorFlow. The report's machine line names the CPU caches: a
kernel that fits in one core's L2 stays there between calls.

Usage:

```
python benchmarks/batch1_products.py                      # 784x300 .. 784x1800
python benchmarks/batch1_products.py --threads=1:2 --kernels=300,300x3
```
"""

import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

KERNELS = ["300", "600", "300x2", "900", "300x3", "1200", "1800"]

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "kernels", KERNELS,
    "Kernel sets to time: N (one INPUTS x N kernel) or NxC (C separate "
    "INPUTS x N kernels in one function).")
flags.DEFINE_integer("inputs", 784, "Rows of every kernel (the input width).")
flags.DEFINE_list(
    "threads", ["1:2", "default"],
    "TensorFlow thread settings, each in its own process: 'default', or "
    "INTRA:INTER (intra-op and inter-op threads).")
flags.DEFINE_integer("rounds", 10, "Interleaved rounds.")
flags.DEFINE_integer("calls", 200, "Calls of each function per round.")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for batch1_products.json and .md.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 rounds of 5 calls.")
flags.DEFINE_string("child", None, "Internal: JSON spec of a timing run.")

NOOP = "no-op"


def parse_kernels(values):
    """[(width, count)] of a `--kernels` list, in order, blanks and repeats
    dropped; a usage error names an entry that is not N or NxC with positive
    integers."""
    sets = []
    for value in (v.strip() for v in values):
        if not value:
            continue
        parts = value.split("x")
        numbers = [int(p) if p.isascii() and p.isdigit() else 0 for p in parts]
        if len(numbers) not in (1, 2) or 0 in numbers:
            raise app.UsageError(
                "Flag --kernels must list N or NxC with positive integers, such "
                f"as 300 or 300x3. Received: {value!r}"
            )
        entry = (numbers[0], numbers[1] if len(numbers) == 2 else 1)
        if entry not in sets:
            sets.append(entry)
    if not sets:
        raise app.UsageError("Flag --kernels must name at least one kernel set.")
    return sets


def label(width, count, inputs):
    kind = f"{inputs}x{width}"
    return kind if count == 1 else f"{count} x {kind}"


def megabytes(width, count, inputs):
    return 4 * inputs * width * count / 1e6


def _validate_flags():
    benchkit.require_at_least(FLAGS, ("inputs", "rounds", "calls"))
    return parse_kernels(FLAGS.kernels), benchkit.parse_threads(FLAGS.threads)


# ------------------------------------------------------------------ child
def child_main(spec):
    """Times the kernel sets in a process that has only TensorFlow loaded."""
    import json
    import sys

    import numpy as np
    import tensorflow as tf

    spec = json.loads(spec)
    threads = benchkit.set_thread_pools(spec["threads"])
    inputs = spec["inputs"]
    rng = np.random.default_rng(0)
    signature = [tf.TensorSpec([None, inputs], tf.float32)]

    def product(kernels):
        def run(x):
            # Graph constants, as in an export; distinct values, so that
            # Grappler cannot merge two products into one.
            outs = [tf.matmul(x, tf.constant(k)) for k in kernels]
            return outs[0] if len(outs) == 1 else tf.concat(outs, axis=1)
        return tf.function(run, input_signature=signature, autograph=False)

    functions = {NOOP: tf.function(lambda x: x + 1.0, input_signature=signature,
                                   autograph=False)}
    for width, count in spec["kernels"]:
        kernels = [rng.normal(size=(inputs, width)).astype(np.float32)
                   for _ in range(count)]
        functions[label(width, count, inputs)] = product(kernels)
    x = tf.constant(rng.random((1, inputs), dtype=np.float32))
    for fn in functions.values():
        for _ in range(20):
            fn(x).numpy()
    labels = list(functions)
    medians = {name: [] for name in labels}
    for r in range(spec["rounds"]):
        for name in (labels if r % 2 == 0 else labels[::-1]):
            fn, times = functions[name], []
            for _ in range(spec["calls"]):
                start = time.perf_counter()
                fn(x).numpy()
                times.append(time.perf_counter() - start)
            medians[name].append(float(np.median(times)))
    print("PRODUCTS_JSON " + json.dumps(dict(
        p50_us={name: 1e6 * float(np.median(v)) for name, v in medians.items()},
        threads=threads,
        library_loaded="keras_freetickets" in sys.modules,
    )), flush=True)


# ----------------------------------------------------------------- report
def rows_of(p50_us, kernels, inputs):
    """Per kernel set: p50, p50 less the no-op's, and the rate (GB/s) at
    which that reads the set's bytes (None where it is not positive)."""
    floor = p50_us[NOOP]
    rows = []
    for width, count in kernels:
        name = label(width, count, inputs)
        over = p50_us[name] - floor
        mb = megabytes(width, count, inputs)
        rows.append(dict(kernels=name, mb=mb, p50_us=p50_us[name], over_noop_us=over,
                         gb_per_s=(mb * 1e3 / over) if over > 0 else None))
    return rows


def render_markdown(report):
    settings = report["settings"]
    lines = [
        "# Batch-1 products (BENCHMARK.md \"Serving latency\": a request's member work)",
        "",
        f"- What: `x @ W` for `x` of shape [1, {settings['inputs']}], float32 kernels "
        "as graph constants (as an export's folded kernels), one `tf.function` per "
        "kernel set; figures are p50 less a no-op function's, and the rate at which "
        "that reads the kernels' bytes; "
        f"{settings['rounds']} interleaved rounds of {settings['calls']} calls."
        + (" QUICK SMOKE RUN: figures are not meaningful." if settings["quick"] else ""),
        f"- Machine: {report['machine']}.",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}.",
        "- Threads: `default` is TensorFlow's own setting; `I:J` is intra-op I, "
        "inter-op J threads; each setting runs in its own process.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s).",
        "",
    ]
    names = list(report["results"])
    header = "| kernels | MB |" + "".join(
        f" {t}: µs over the no-op | {t}: GB/s |" for t in names)
    lines += [header, "|---|---|" + "---|---|" * len(names)]
    first = report["results"][names[0]]["rows"]
    for i, row in enumerate(first):
        cells = [row["kernels"], f"{row['mb']:.2f}"]
        for t in names:
            r = report["results"][t]["rows"][i]
            rate = "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
            cells += [f"{r['over_noop_us']:.1f}", rate]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "No-op call p50: " + ", ".join(
        f"{t} {report['results'][t]['noop_us']:.0f} µs" for t in names) + "."]
    return "\n".join(lines) + "\n"


def run_benchmark(kernels, threads):
    start = time.time()
    rounds, calls = (2, 5) if FLAGS.quick else (FLAGS.rounds, FLAGS.calls)
    results = {}
    for name, setting in threads.items():
        print(f"[batch1_products] threads {name}", flush=True)
        timed = benchkit.run_child(
            __file__, dict(kernels=kernels, inputs=FLAGS.inputs, rounds=rounds,
                           calls=calls, threads=setting), "PRODUCTS_JSON")
        if timed["library_loaded"]:
            raise RuntimeError("The timing process imported keras_freetickets.")
        results[name] = dict(
            rows=rows_of(timed["p50_us"], kernels, FLAGS.inputs),
            noop_us=timed["p50_us"][NOOP], threads_in_effect=timed["threads"])
    report = dict(
        **benchkit.report_header("batch1_products", ["Serving latency"]),
        settings=dict(kernels=[label(w, c, FLAGS.inputs) for w, c in kernels],
                      inputs=FLAGS.inputs, threads=list(threads), rounds=rounds,
                      calls=calls, quick=FLAGS.quick),
        results=results,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "batch1_products", report, render_markdown(report))
    return report


def main(argv):
    benchkit.no_arguments(argv)
    if FLAGS.child:
        child_main(FLAGS.child)
        return
    run_benchmark(*_validate_flags())


if __name__ == "__main__":
    app.run(main)
