"""Exact drop/grow selection: `keras_freetickets.selection` against the
top_k code of `SparseOptimizer._prune_and_grow` (BENCHMARK.md "Speed
figures", mask-update cost).

For every prunable layer of FMNIST-MLP v1 and FMNIST-CNN v1 at its ERK
density for S = 0.8, with p = 0.5 (k = round(0.5 * active), static, so the
reference's top_k is unsorted), one mask update's selection is timed both
ways, as a `tf.function` and with `jit_compile=True`: the drop (k smallest
active magnitudes) and then the grow (k largest gradient magnitudes among the
entries inactive after the drop), each returning a bool mask. The reference
is `top_k(score, k_max)` + `scatter_nd`, twice, as in the optimizer. The two
are checked to choose the same entries (bit for bit), then timed in
interleaved rounds; medians per call and the speed-up (reference / new).
Without XLA, where `keras_freetickets.native` is built, the radix select
is timed both as TensorFlow ops and as the compiled op (which the default
path then uses); under XLA the compiled op is never used.
Weights are N(0, 0.05) rounded to 1e-3 (so that magnitudes tie) and
gradients |N(0, 1)| rounded to 1e-2.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/selection_speed.py
```
"""

import statistics
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
SPARSITY = 0.8
DROP_FRACTION = 0.5

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Protocols: mlp, cnn.")
flags.DEFINE_integer("rounds", 9, "Interleaved rounds.")
flags.DEFINE_integer("calls", 20, "Calls per round and variant.")
flags.DEFINE_bool("xla", True, "Also time with jit_compile=True.")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for selection_speed.json and .md.")


def reference(weights, mask, grad, k_max):
    """The optimizer's selection today (k == k_max, unsorted top_k)."""
    import tensorflow as tf

    n = weights.shape[0]
    select = tf.range(k_max) < k_max

    def flags(indices):
        counts = tf.scatter_nd(tf.expand_dims(indices, 1), tf.cast(select, tf.int32), [n])
        return counts > 0

    drop_score = tf.where(mask, -tf.abs(weights), float("-inf"))
    _, drop_idx = tf.math.top_k(drop_score, k_max, sorted=False)
    dropped = flags(drop_idx)
    kept = tf.logical_and(mask, tf.logical_not(dropped))
    grow_score = tf.where(kept, float("-inf"), tf.abs(grad))
    _, grow_idx = tf.math.top_k(grow_score, k_max, sorted=False)
    return dropped, flags(grow_idx)


def new(weights, mask, grad, k_max, radix=None):
    import tensorflow as tf

    from keras_freetickets import selection

    dropped = selection.smallest_active_flags(weights, mask, k_max, k_max, radix=radix)
    kept = tf.logical_and(mask, tf.logical_not(dropped))
    grown = selection.largest_flags(
        tf.abs(grad), tf.logical_not(kept), k_max, k_max, radix=radix
    )
    return dropped, grown


def layers(name):
    from keras_freetickets import distributions, prunable

    model = protocols.build_model(name, seed=0)
    kernels = prunable.prunable_variables(model.weights)
    shapes = {v.path: tuple(v.shape) for v in kernels}
    sparsities = distributions.compute_sparsities(shapes, SPARSITY, "erk")
    return [
        (path, shape, distributions.active_count(int(_prod(shape)), sparsities[path]))
        for path, shape in shapes.items()
    ]


def _prod(shape):
    out = 1
    for d in shape:
        out *= d
    return out


def measure(path, shape, active, jit, rounds, calls, seed):
    import numpy as np
    import tensorflow as tf

    from keras_freetickets import native, selection

    rng = np.random.default_rng(seed)
    n = _prod(shape)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:active]] = True
    weights = np.where(mask, np.round(rng.normal(0, 0.05, n), 3), 0).astype(np.float32)
    grad = np.round(np.abs(rng.standard_normal(n)), 2).astype(np.float32)
    k_max = int(np.floor(np.float32(DROP_FRACTION) * np.float32(active) + np.float32(0.5)))
    args = [tf.constant(a) for a in (weights, mask, grad)]
    fns = {
        "top_k": tf.function(lambda w, m, g: reference(w, m, g, k_max), jit_compile=jit),
        "selection": tf.function(lambda w, m, g: new(w, m, g, k_max), jit_compile=jit),
        "radix": tf.function(
            lambda w, m, g: new(w, m, g, k_max, radix=True), jit_compile=jit
        ),
    }
    # Which selection ops each variant is traced with (at its first call):
    # the default, TensorFlow's, or the compiled op.
    use_op = {"selection": None, "radix": False}
    if not jit and native.available():
        fns["compiled"] = tf.function(
            lambda w, m, g: new(w, m, g, k_max, radix=True))
        use_op["compiled"] = True
    expected = fns["top_k"](*args)
    for name, enabled in use_op.items():
        native.set_enabled(enabled)
        try:
            got = fns[name](*args)
        finally:
            native.set_enabled(None)
        for x, y in zip(expected, got):
            if not np.array_equal(x.numpy(), y.numpy()):
                raise AssertionError(f"{path}: {name} differs from top_k")
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                out = fns[name](*args)
                out[1].numpy()
            times[name].append((time.perf_counter() - start) / calls)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return dict(
        layer=path, shape=list(shape), size=n, active=active, k=k_max,
        path=("top_k (same code)" if n < selection.RADIX_MIN_SIZE
              else "compiled op" if "compiled" in fns else "radix"),
        xla=jit, ms=ms, speedup=ms["top_k"] / ms["selection"],
        radix_speedup=ms["top_k"] / ms["radix"],
        compiled_speedup=(ms["top_k"] / ms["compiled"] if "compiled" in ms
                          else None),
    )


def render_markdown(report):
    lines = [
        "# Exact drop/grow selection (BENCHMARK.md \"Speed figures\", mask-update cost)",
        "",
        f"- Protocols: {', '.join(report['protocols'])}, prunable layers at "
        f"ERK S = {SPARSITY}, p = {DROP_FRACTION} (k = round(p * active)).",
        "- One update's selection (drop, then grow), returning bool masks: "
        "the optimizer's top_k + scatter code against "
        "`keras_freetickets.selection` (checked equal bit for bit first).",
        f"- Machine: {report['machine']}.",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s); medians "
        f"of {report['settings']['rounds']} interleaved rounds of "
        f"{report['settings']['calls']} calls.",
        "",
        "| model | layer | size | active | k | XLA | default path | top_k ms | "
        "selection ms (default) | speed-up | radix forced, TensorFlow ops ms "
        "| speed-up | radix forced, compiled op ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['protocol']} | `{r['layer']}` {'x'.join(map(str, r['shape']))} "
            f"| {r['size']} | {r['active']} | {r['k']} | {'yes' if r['xla'] else 'no'} "
            f"| {r['path']} | {r['ms']['top_k']:.3f} | {r['ms']['selection']:.3f} "
            f"| {r['speedup']:.2f}x | {r['ms']['radix']:.3f} "
            f"| {r['radix_speedup']:.2f}x "
            + (f"| {r['ms']['compiled']:.3f} | {r['compiled_speedup']:.2f}x |"
               if r.get("compiled_speedup") else "| - | - |")
        )
    same = [r["speedup"] for r in report["rows"] if r["path"].startswith("top_k")]
    if same:
        lines += [
            "",
            "Where the default path is top_k, both columns run the same code: "
            f"their 'speed-ups' ({min(same):.2f}x to {max(same):.2f}x in this run) "
            "are the measurement noise of this shared machine.",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv):
    benchkit.no_arguments(argv)
    models = benchkit.parse_models(FLAGS.models)
    benchkit.require_at_least(FLAGS, ("rounds", "calls"))
    start = time.time()
    rows = []
    for name in models:
        for index, (path, shape, active) in enumerate(layers(name)):
            for jit in ([False, True] if FLAGS.xla else [False]):
                row = measure(path, shape, active, jit, FLAGS.rounds, FLAGS.calls, index)
                row["protocol"] = MODELS[name]
                rows.append(row)
                print(f"[selection] {MODELS[name]} {path} xla={jit}: "
                      f"{row['speedup']:.2f}x", flush=True)
    report = dict(
        **benchkit.report_header("selection_speed", [MODELS[m] for m in models]),
        settings=dict(sparsity=SPARSITY, drop_fraction=DROP_FRACTION,
                      rounds=FLAGS.rounds, calls=FLAGS.calls),
        rows=rows,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "selection_speed", report, render_markdown(report))


if __name__ == "__main__":
    app.run(main)
