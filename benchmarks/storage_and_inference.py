"""Storage and inference figures of ensembles and their export (BENCHMARK.md).

Measures, on the FMNIST-MLP v1 (784-300-100-10) and FMNIST-CNN v1 models:

1. "Storage": bytes of one member file (`save_member`, `.kftm`) and of an
   exported SavedModel (`FreeTicketsEnsemble.export`, M = 1 and M = 3) at
   S = 0.8 and 0.9 (ERK, exact per-layer counts), each divided by the same
   thing for the dense model: the dense model's member file, the dense
   model's export (M dense members exported the same way), and the dense
   float32 weight bytes (4 bytes per weight). Target: at most (1 - S) + 0.1.
2. "Ensemble inference": Keras `predict` throughput of an M = 3 ensemble
   divided by one member's, same batch (1024), same process, interleaved
   repeats (A B, B A, ...), medians. Target: the ensemble costs at most
   M times one member (issue 11: 1.3x on FMNIST-CNN v1). The ensemble runs
   as `FreeTicketsEnsemble` does by default (eligible Conv2D layers through
   the compiled sparse convolution where `keras_freetickets.native` built
   it), and also with TensorFlow's convolution (`conv_kernels="dense"`),
   batched, and, for the per-member cost, as one member through the op;
   and against M separate `predict` calls whose softmax is averaged in
   NumPy (issue 11: the batched program "against M separate calls").
3. Serving: the exported `serving_default` signature (loaded with
   `tf.saved_model.load`) of the M = 3 ensemble against a single-member
   export, and, for one member at S = 0.8, what the storage choice costs:
   dense storage (`compact=False`), compact constants rebuilt in the graph
   and folded at load (the default), compact variables rebuilt on every call,
   and compact constants run as sparse matmuls (`tf.sparse`, Dense layers
   only). Batch 1024 (throughput) and batch 1 (latency).

The models are randomly initialised (Keras default initialisers, biases
N(0, 0.1)) with exact-sparsity ERK masks: the figures are about bytes and
time, not accuracy. The inputs are random arrays of the protocol's shape.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/storage_and_inference.py \
    --out=benchmarks/results
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/storage_and_inference.py --quick
```
"""

import os
import pathlib
import shutil
import statistics
import tempfile
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
SPARSITIES = (0.8, 0.9)
NUM_MEMBERS = 3
# Issue 11's target: M = 3 predict at most 1.3x one member (FMNIST-CNN v1,
# batch 1024).
ISSUE_11_PREDICT_TARGET = 1.3
BATCH_SIZE = 1024
# Examples per timed predict call: a few batches, so that `predict`'s own
# per-call overhead is part of both sides as it is in use.
PREDICT_EXAMPLES = {"mlp": 4 * BATCH_SIZE, "cnn": 2 * BATCH_SIZE}
# Signature calls per timed block (batch 1024, batch 1).
SERVE_CALLS = {"mlp": (4, 200), "cnn": (1, 100)}
DEFAULT_REPEATS = 15
QUICK = dict(repeats=2, predict_examples={"mlp": 1024, "cnn": 1024},
             serve_calls={"mlp": (1, 10), "cnn": (1, 5)})
STORAGE_VARIANTS = (
    ("dense storage", dict(compact=False)),
    ("compact, rebuilt + folded at load (default)", dict()),
    ("compact variables, rebuilt every call", dict(kernel_mode="rebuild_variables")),
    ("compact, sparse matmul (Dense layers)", dict(kernel_mode="sparse_matmul")),
)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Models: mlp, cnn.")
flags.DEFINE_string("out", str(benchkit.HERE / "results"),
                    "Folder for storage_inference.json and .md.")
flags.DEFINE_integer("repeats", DEFAULT_REPEATS,
                     "Timed rounds per variant (interleaved).")
flags.DEFINE_bool("quick", False, "A fast smoke run; figures not meaningful.")


# ----------------------------------------------------------------- models
def build_model(name, seed):
    """The protocol's model (logits out), random init, biases N(0, 0.1)."""
    import numpy as np

    if name not in MODELS:
        raise ValueError(
            f"Argument `models` must name models in {sorted(MODELS)}. "
            f"Received: {name!r}"
        )
    model = protocols.build_model(name, seed=seed, l2=None)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith("bias"):
            variable.assign(rng.normal(0.0, 0.1, variable.shape).astype("float32"))
    return model


def sparsify(model, sparsity, seed):
    """Zeros all but the ERK number of weights of every prunable kernel."""
    import keras
    import numpy as np

    from keras_freetickets import distributions
    from keras_freetickets import prunable

    kernels = prunable.prunable_variables(model.weights)
    shapes = {v.path: tuple(v.shape) for v in kernels}
    counts = distributions.resolve_counts(
        shapes, distributions.compute_sparsities(shapes, sparsity, "erk"))
    rng = np.random.default_rng(seed)
    for variable in kernels:
        value = keras.ops.convert_to_numpy(variable).reshape(-1).copy()
        value[rng.permutation(value.size)[counts[variable.path]:]] = 0.0
        variable.assign(value.reshape(variable.shape))
    return model


def random_inputs(name, n, seed=0):
    import numpy as np

    shape = (n, 784) if name == "mlp" else (n, 28, 28, 1)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# ----------------------------------------------------------------- storage
def measure_storage(name, work):
    from keras_freetickets import export as export_lib
    from keras_freetickets import members as members_lib
    from keras_freetickets.ensemble import FreeTicketsEnsemble

    def export_bytes(models, tag, **kwargs):
        path = work / tag / "1"
        FreeTicketsEnsemble(models).export(str(path), **kwargs)
        size = export_lib.saved_model_bytes(path)
        shutil.rmtree(work / tag)
        return size

    def member_bytes(model, tag):
        path = members_lib.save_member(model, work / f"{tag}.kftm")
        size = os.path.getsize(path)
        os.remove(path)
        return size

    dense = [build_model(name, seed) for seed in range(NUM_MEMBERS)]
    dense_f32 = 4 * sum(int(v.numpy().size) for v in dense[0].weights)
    dense_member = member_bytes(dense[0], "dense")
    dense_export_1 = export_bytes(dense[:1], "dense1")
    dense_export_m = export_bytes(dense, "densem")
    rows = []
    for sparsity in SPARSITIES:
        sparse = [
            sparsify(build_model(name, seed), sparsity, seed)
            for seed in range(NUM_MEMBERS)
        ]
        member = member_bytes(sparse[0], f"s{sparsity}")
        export_1 = export_bytes(sparse[:1], f"s{sparsity}_1")
        export_m = export_bytes(sparse, f"s{sparsity}_m")
        target = (1 - sparsity) + 0.1
        row = dict(
            protocol=MODELS[name], sparsity=sparsity, target=target,
            bytes=dict(
                member=member, export_1=export_1, export_m=export_m,
                dense_member=dense_member, dense_export_1=dense_export_1,
                dense_export_m=dense_export_m, dense_float32_weights=dense_f32,
            ),
            member_vs_dense_member=member / dense_member,
            member_vs_dense_float32=member / dense_f32,
            export_1_vs_dense_export_1=export_1 / dense_export_1,
            export_1_vs_dense_float32=export_1 / dense_f32,
            export_m_vs_dense_export_m=export_m / dense_export_m,
            export_m_vs_dense_float32=export_m / (NUM_MEMBERS * dense_f32),
        )
        row["met"] = all(
            row[k] <= target for k in (
                "member_vs_dense_member", "member_vs_dense_float32",
                "export_1_vs_dense_export_1", "export_m_vs_dense_export_m")
        )
        rows.append(row)
    return rows


# ----------------------------------------------------------------- timing
def interleaved(fns, repeats, warmup=1):
    """Median seconds of each callable, timed in rounds A B ..., ... B A."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_predict(name, repeats, examples):
    import numpy as np

    from keras_freetickets import native
    from keras_freetickets.ensemble import FreeTicketsEnsemble

    members = [
        sparsify(build_model(name, seed), 0.8, seed) for seed in range(NUM_MEMBERS)
    ]
    # The default: eligible Conv2D layers through the compiled sparse
    # convolution where it is built; and the same with TensorFlow's.
    ensemble = FreeTicketsEnsemble(members)
    tf_conv = FreeTicketsEnsemble(members, conv_kernels="dense")
    batched = FreeTicketsEnsemble(members, batched=True)
    if not batched.batched:
        raise RuntimeError(f"{name}: the members did not give a batched plan")
    compiled_layers = sum(len(names) for names in ensemble.compiled_conv_layers())
    x = random_inputs(name, examples)

    def separate():
        # What a user does without the library: M separate `predict` calls,
        # then the mean of the members' softmax.
        outputs = [m.predict(x, batch_size=BATCH_SIZE, verbose=0) for m in members]
        if ensemble.member_output == "logits":
            outputs = [benchkit.softmax(y) for y in outputs]
        return np.mean(outputs, axis=0)

    # The arms compute the same probabilities (float rounding apart).
    np.testing.assert_allclose(
        separate(), ensemble.predict(x, batch_size=BATCH_SIZE, verbose=0),
        atol=1e-5)
    fns = {
        "member": lambda: members[0].predict(x, batch_size=BATCH_SIZE, verbose=0),
        "separate": separate,
        "ensemble": lambda: ensemble.predict(x, batch_size=BATCH_SIZE, verbose=0),
        "tf_conv": lambda: tf_conv.predict(x, batch_size=BATCH_SIZE, verbose=0),
        "batched": lambda: batched.predict(x, batch_size=BATCH_SIZE, verbose=0),
    }
    if compiled_layers:  # one member through the op too: the per-member cost
        one = FreeTicketsEnsemble(members[:1])
        fns["member_compiled"] = lambda: one.predict(x, batch_size=BATCH_SIZE, verbose=0)
    seconds = interleaved(fns, repeats)
    ratio = seconds["ensemble"] / seconds["member"]
    tf_conv_ratio = seconds["tf_conv"] / seconds["member"]
    batched_ratio = seconds["batched"] / seconds["member"]
    return dict(
        protocol=MODELS[name], batch_size=BATCH_SIZE, examples=examples,
        num_members=NUM_MEMBERS, sparsity=0.8,
        compiled_conv_in_use=bool(compiled_layers),
        compiled_conv_layers=ensemble.compiled_conv_layers(),
        compiled_conv_built=native.conv_available(),
        member_examples_per_s=examples / seconds["member"],
        ensemble_examples_per_s=examples / seconds["ensemble"],
        tf_conv_examples_per_s=examples / seconds["tf_conv"],
        batched_examples_per_s=examples / seconds["batched"],
        cost_ratio=ratio, tf_conv_cost_ratio=tf_conv_ratio,
        batched_cost_ratio=batched_ratio,
        # Against M separate `predict` calls (and the mean of their softmax).
        separate_cost_ratio=seconds["separate"] / seconds["member"],
        ensemble_vs_separate=seconds["ensemble"] / seconds["separate"],
        batched_vs_separate=seconds["batched"] / seconds["separate"],
        # The ensemble over one member that runs through the op as well.
        per_compiled_member_ratio=(
            seconds["ensemble"] / seconds["member_compiled"]
            if "member_compiled" in seconds else None),
        target=NUM_MEMBERS, met=ratio <= NUM_MEMBERS,
        target_issue_11=ISSUE_11_PREDICT_TARGET,
        met_issue_11=min(ratio, batched_ratio) <= ISSUE_11_PREDICT_TARGET,
    )


def measure_serving(name, repeats, calls, work):
    import numpy as np
    import tensorflow as tf

    from keras_freetickets import export as export_lib
    from keras_freetickets.ensemble import FreeTicketsEnsemble

    members = [
        sparsify(build_model(name, seed), 0.8, seed) for seed in range(NUM_MEMBERS)
    ]
    ensemble = FreeTicketsEnsemble(members)
    single = FreeTicketsEnsemble(members[:1])
    x_check = random_inputs(name, 64, seed=1)
    expected = {
        "ensemble": ensemble.predict(x_check, verbose=0),
        "single": single.predict(x_check, verbose=0),
    }
    signatures, sizes = {}, {}
    variants = [("M = 3 ensemble (default)", ensemble, "ensemble", {})] + [
        (f"1 member, {label}", single, "single", kwargs)
        for label, kwargs in STORAGE_VARIANTS
    ]
    for index, (label, model, kind, kwargs) in enumerate(variants):
        path = work / f"{name}_serve_{index}" / "1"
        export_lib.export_ensemble(model, str(path), **kwargs)
        sizes[label] = export_lib.saved_model_bytes(path)
        fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        got = fn(inputs=tf.constant(x_check))["probabilities"].numpy()
        error = float(np.abs(got - expected[kind]).max())
        if error > 1e-5:
            raise AssertionError(f"{label}: export differs from predict by {error}")
        signatures[label] = fn
    results = []
    for batch, n_calls in zip((BATCH_SIZE, 1), calls):
        x = tf.constant(random_inputs(name, batch))

        def timed(fn, n_calls=n_calls, x=x):
            def run():
                for _ in range(n_calls):
                    fn(inputs=x)["probabilities"].numpy()
            return run

        seconds = interleaved(
            {label: timed(fn) for label, fn in signatures.items()}, repeats, warmup=2
        )
        base_label = "1 member, " + STORAGE_VARIANTS[1][0]
        base = seconds[base_label]
        dense = seconds["1 member, dense storage"]
        for label in signatures:
            results.append(dict(
                protocol=MODELS[name], batch_size=batch, variant=label,
                bytes=sizes[label],
                ms_per_call=1e3 * seconds[label] / n_calls,
                examples_per_s=batch * n_calls / seconds[label],
                vs_single_member_export=seconds[label] / base,
                vs_dense_storage=seconds[label] / dense,
            ))
    return results


# ----------------------------------------------------------------- report
def _mark(met):
    return "yes" if met else "NO"


def render_markdown(report):
    s = report["settings"]
    lines = [
        "# Storage and ensemble inference (BENCHMARK.md \"Storage\", "
        "\"Ensemble inference\")",
        "",
        f"- Protocols: {', '.join(report['protocols'])} (architectures only).",
        "- Models randomly initialised (Keras defaults, biases N(0, 0.1)) with "
        "exact-sparsity ERK masks; random inputs. The figures are about bytes "
        "and time, not accuracy.",
        f"- Machine: {report['machine']}.",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}"
        f", Keras {report['versions']['keras']}.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s).",
        f"- Times: medians over {s['repeats']} interleaved rounds (order "
        "alternating), one process."
        + (" QUICK SMOKE RUN: figures are not meaningful." if s["quick"] else ""),
        "",
        "## Storage (bytes / dense bytes; target <= (1 - S) + 0.1)",
        "",
        "Member = `save_member` file (.kftm); export = `ensemble.export` "
        "SavedModel folder. Dense references: the dense model saved the same "
        "way (dense .kftm; M dense members exported), and the dense float32 "
        "weights (4 bytes per weight, M times for M = 3).",
        "",
        "| model | S | member / dense member | member / dense f32 | export M=1 / "
        "dense export | export M=1 / dense f32 | export M=3 / dense export M=3 "
        "| export M=3 / (3 x dense f32) | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["storage"]:
        lines.append(
            f"| {r['protocol']} | {r['sparsity']} "
            f"| {r['member_vs_dense_member']:.3f} | {r['member_vs_dense_float32']:.3f} "
            f"| {r['export_1_vs_dense_export_1']:.3f} "
            f"| {r['export_1_vs_dense_float32']:.3f} "
            f"| {r['export_m_vs_dense_export_m']:.3f} "
            f"| {r['export_m_vs_dense_float32']:.3f} "
            f"| {r['target']:.2f} | {_mark(r['met'])} |"
        )
    lines += [
        "",
        "Bytes: " + "; ".join(
            f"{r['protocol']} S={r['sparsity']}: member {r['bytes']['member']}, "
            f"dense member {r['bytes']['dense_member']}, export M=1 "
            f"{r['bytes']['export_1']}, dense export M=1 "
            f"{r['bytes']['dense_export_1']}, dense f32 "
            f"{r['bytes']['dense_float32_weights']}"
            for r in report["storage"]
        ) + ".",
        "",
        f"## Ensemble inference (Keras predict, batch {BATCH_SIZE}, S = 0.8, "
        f"M = {NUM_MEMBERS}; target: ensemble cost <= M x member)",
        "",
        "Member = one member's own `predict` (TensorFlow's convolution). "
        "Ensemble = `FreeTicketsEnsemble(members)`, the default: the members "
        "run one by one in one traced graph, their eligible Conv2D layers "
        "through the compiled sparse convolution where it is built (column "
        "'compiled conv'); TF conv = the same with `conv_kernels=\"dense\"`; "
        "batched = `FreeTicketsEnsemble(members, batched=True)` (stacked "
        "kernels: one matmul/convolution for the first layer, batched matmuls "
        "after). Last column: the ensemble over one member that runs through "
        "the compiled convolution too.",
        "",
        "| model | examples / call | compiled conv | member ex/s | ensemble ex/s "
        "| ensemble cost / member cost | met (<= M) | TF conv cost / member cost "
        "| batched cost / member cost | issue 11 target <= 1.3 met "
        "| ensemble / one compiled member |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["predict"]:
        per_member = r.get("per_compiled_member_ratio")
        lines.append(
            f"| {r['protocol']} | {r['examples']} "
            f"| {'yes' if r.get('compiled_conv_in_use') else 'no'} "
            f"| {r['member_examples_per_s']:.0f} "
            f"| {r['ensemble_examples_per_s']:.0f} | {r['cost_ratio']:.2f} "
            f"| {_mark(r['met'])} | {r.get('tf_conv_cost_ratio', float('nan')):.2f} "
            f"| {r['batched_cost_ratio']:.2f} | {_mark(r['met_issue_11'])} "
            f"| {'n/a' if per_member is None else f'{per_member:.2f}'} |"
        )
    lines += [
        "",
        f"Against M separate calls: the {NUM_MEMBERS} members' own `predict` "
        "calls one after another, then the mean of their softmax in NumPy "
        "(what one does without the library; checked equal to the "
        "ensemble's probabilities within 1e-5). Below 1: the one traced "
        "program is faster.",
        "",
        "| model | M separate calls / member | ensemble / M separate calls "
        "| batched / M separate calls |",
        "|---|---|---|---|",
    ]
    for r in report["predict"]:
        lines.append(
            f"| {r['protocol']} | {r['separate_cost_ratio']:.2f} "
            f"| {r['ensemble_vs_separate']:.2f} | {r['batched_vs_separate']:.2f} |"
        )
    lines += [
        "",
        "## Serving: the exported `serving_default` signature "
        "(`tf.saved_model.load`, S = 0.8)",
        "",
        "Time relative to the single-member default export (cost ratio; the "
        "M = 3 row is the ensemble's cost in single-member exports) and to "
        "the single member stored dense.",
        "",
        "| model | batch | variant | bytes | ms / call | examples / s | vs 1-member "
        "export | vs dense storage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["serving"]:
        lines.append(
            f"| {r['protocol']} | {r['batch_size']} | {r['variant']} | {r['bytes']} "
            f"| {r['ms_per_call']:.3f} | {r['examples_per_s']:.0f} "
            f"| {r['vs_single_member_export']:.2f} | {r['vs_dense_storage']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def run_benchmark():
    quick = FLAGS.quick
    models = benchkit.parse_models(FLAGS.models)
    if not quick:
        benchkit.require_at_least(FLAGS, ["repeats"])
    repeats = QUICK["repeats"] if quick else FLAGS.repeats
    import keras
    import tensorflow as tf
    from absl import logging

    # SavedModel writes log at INFO through absl; keep the output readable.
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")

    predict_examples = QUICK["predict_examples"] if quick else PREDICT_EXAMPLES
    serve_calls = QUICK["serve_calls"] if quick else SERVE_CALLS
    start = time.time()
    storage, predict, serving = [], [], []
    work = pathlib.Path(tempfile.mkdtemp(prefix="kft_storage_inference_"))
    try:
        for name in models:
            t0 = time.time()
            storage += measure_storage(name, work)
            keras.backend.clear_session()
            print(f"{MODELS[name]}: storage done ({time.time() - t0:.0f} s)", flush=True)
            predict.append(measure_predict(name, repeats, predict_examples[name]))
            keras.backend.clear_session()
            print(f"{MODELS[name]}: predict cost ratio "
                  f"{predict[-1]['cost_ratio']:.2f} ({time.time() - t0:.0f} s)",
                  flush=True)
            serving += measure_serving(name, repeats, serve_calls[name], work)
            keras.backend.clear_session()
            print(f"{MODELS[name]}: serving done ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = dict(
        **benchkit.report_header(
            "storage_and_inference",
            [MODELS[m] for m in models] + ["Storage", "Ensemble inference"]),
        settings=dict(
            sparsities=list(SPARSITIES), distribution="erk", num_members=NUM_MEMBERS,
            batch_size=BATCH_SIZE, repeats=repeats, predict_examples=predict_examples,
            serve_calls=serve_calls, quick=quick,
            weights="random init, exact-sparsity ERK masks (bytes and time only)",
        ),
        storage=storage,
        predict=predict,
        serving=serving,
        wall_seconds=time.time() - start,
    )
    benchkit.write_report(FLAGS.out, "storage_inference", report, render_markdown(report))
    return report


def main(argv):
    benchkit.no_arguments(argv)
    run_benchmark()


if __name__ == "__main__":
    app.run(main)
