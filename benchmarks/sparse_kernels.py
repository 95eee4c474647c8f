"""Sparse kernels against dense ones, layer by layer (BENCHMARK.md, "Speed
figures"; issue 11, "Sparse kernels, honestly evaluated").

For every prunable layer of FMNIST-MLP v1 and FMNIST-CNN v1, at its ERK
density for S = 0.8 and S = 0.9 (`keras_freetickets.distributions`), with
an exact-count random mask (the masks `SparseOptimizer` draws and RigL
rewires are unstructured), the layer's product is timed as:

- `dense`: `tf.matmul` (Dense) or `tf.nn.conv2d` (Conv2D) on the kernel with
  its zeros: what Keras runs;
- `tf.sparse`: `tf.sparse.sparse_dense_matmul` with the kernel as a
  `tf.SparseTensor` (Conv2D: on the `extract_patches` im2col matrix);
- `gather`: padded ELL: per output unit the indices and values of its
  nonzero inputs (padded to the largest count), `tf.gather` of the inputs
  and a weighted sum (Conv2D: on the im2col matrix);
- `compiled` (`--nocompiled` leaves it out): on Dense layers, the
  hand-written C++ kernel of `compiled_kernel.py`, compiled at the start of
  the run (~10 s; needs g++); like the other two it gets its index (of the
  mask, by row and by column) built once, outside the timed calls, and the
  time to build it is reported beside. On Conv2D layers, the library's
  sparse convolution (`keras_freetickets.native.sparse_conv2d`, which
  `FreeTicketsEnsemble` uses at inference; built by `native.build`), which
  indexes the kernel's nonzeros inside every call; forward passes only (it
  has no gradient, so its training cells are n/a);
- `block`: not timed. A block-sparse kernel skips only all-zero blocks; the
  table gives the fraction of 4x4 and 16x16 blocks that hold a nonzero under
  these unstructured masks, which bounds what any block layout could save.

Forward passes at batch 1 and 128 (inference), and forward + backward
(gradients for the inputs and the kernel's nonzeros, `tf.GradientTape`) at
batch 128 (training). Each variant is a `tf.function`; the variants of one
layer are timed in interleaved rounds (order alternating) and the median
per call is reported, with the speed-up over dense (> 1: faster). Every
sparse path is checked against dense first (max abs difference <= 1e-4,
relative to the largest magnitude for gradients).

Then, with `compiled` and FMNIST-MLP v1 in the run, whole `fit`s
(`--fit_pairs`, one epoch each on the real training split): the dense model
against the same model with the layers of `--fit_layers` (default: the
784x300 layer, where a sparse kernel has the most to skip) on the compiled
path, with the table's fixed masks at the protocol's S = 0.8
(`--fit_sparsity=0.9` for the sparser masks) and no
SparseOptimizer: what a sparse fit could gain from this kernel at most.
With FMNIST-CNN v1 in the run, the same for its model with the layers of
`--cnn_fit_layers` (default: both convolutions) on the compiled path:
forward and input gradient through the library's sparse convolution, the
kernel gradient (at the nonzeros) through `FtConvKernelGrad` of
`compiled_kernel.py` (`compiled_kernel.conv2d`).

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/sparse_kernels.py
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/sparse_kernels.py --quick
```
"""

import statistics
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import protocols

MODELS = protocols.PROTOCOL_NAMES
SPARSITIES = (0.8, 0.9)
PATHS = ("dense", "tf.sparse", "gather", "compiled")
ATOL = 1e-4

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn"], "Protocols: mlp, cnn.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds per measurement.")
flags.DEFINE_float("seconds_per_call_group", 0.05,
                   "Aim of each timed group of calls (calls are batched so "
                   "that a group lasts about this long).")
flags.DEFINE_string("out", "benchmarks/results",
                    "Folder for sparse_kernels.json and .md.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 rounds, batch 1 and 8.")
flags.DEFINE_bool("compiled", True,
                  "Also time the compiled C++ kernels: the benchmark's on Dense "
                  "layers, the library's sparse convolution on Conv2D layers "
                  "(needs g++).")
flags.DEFINE_integer("fit_pairs", 5,
                     "Pairs of one-epoch FMNIST-MLP v1 fits, dense against the "
                     "compiled path (0: none; needs --compiled and mlp).")
flags.DEFINE_list("fit_layers", ["0"],
                  "Places (0, 1, 2) of the FMNIST-MLP v1 layers the fit puts on "
                  "the compiled path; 0 is the 784x300 layer.")
flags.DEFINE_list("cnn_fit_layers", ["0", "1"],
                  "Places (0-3) of the FMNIST-CNN v1 layers its fit puts on the "
                  "compiled path; 0 and 1 are the two convolutions.")
flags.DEFINE_float("fit_sparsity", 0.8,
                   "S of the fit's masks: 0.8 (FMNIST-MLP v1's) or 0.9.")


def _validate_flags():
    models = benchkit.parse_models(FLAGS.models)
    benchkit.require_at_least(FLAGS, ["rounds"])
    benchkit.require_at_least(FLAGS, ["fit_pairs"], minimum=0)
    places = _places("fit_layers", 3)
    cnn_places = _places("cnn_fit_layers", 4)
    if FLAGS.fit_sparsity not in SPARSITIES:
        raise app.UsageError(
            f"Flag --fit_sparsity must be one of {list(SPARSITIES)}. "
            f"Received: {FLAGS.fit_sparsity}"
        )
    return models, places, cnn_places


def _places(name, count):
    """The sorted places of a `--fit_layers`-style flag, each below `count`;
    a usage error names the flag and what it received."""
    values = [v.strip() for v in FLAGS[name].value if v.strip()]
    allowed = [str(i) for i in range(count)]
    if not values or any(v not in allowed for v in values):
        raise app.UsageError(
            f"Flag --{name} must list places among {', '.join(allowed)}. "
            f"Received: {','.join(FLAGS[name].value)!r}"
        )
    return sorted({int(v) for v in values})


# ------------------------------------------------------------------ layers
def layer_specs(name):
    """[(label, kind, kernel shape, input shape per example)] of the protocol."""
    model = protocols.build_model(name, seed=0)
    from keras_freetickets import prunable

    specs = []
    for variable in prunable.prunable_variables(model.weights):
        layer = next(
            lyr for lyr in model.layers if getattr(lyr, "kernel", None) is variable
        )
        kind = "conv" if len(variable.shape) == 4 else "dense"
        in_shape = tuple(layer.input.shape[1:])
        specs.append((variable.path, kind, tuple(variable.shape), in_shape))
    return specs


def densities(specs, sparsity):
    from keras_freetickets import distributions

    shapes = {path: shape for path, _, shape, _ in specs}
    sparsities = distributions.compute_sparsities(shapes, sparsity, "erk")
    return {path: 1.0 - s for path, s in sparsities.items()}


def random_kernel(shape, density, seed):
    import numpy as np

    from keras_freetickets import distributions

    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    active = distributions.active_count(size, 1.0 - density)
    flat = np.zeros(size, np.float32)
    flat[rng.permutation(size)[:active]] = rng.standard_normal(active).astype(np.float32)
    return flat.reshape(shape), active


def block_fraction(matrix, block):
    """Fraction of `block` x `block` tiles of a 2-D matrix with a nonzero."""
    import numpy as np

    rows = -(-matrix.shape[0] // block) * block
    cols = -(-matrix.shape[1] // block) * block
    padded = np.zeros((rows, cols), bool)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix != 0
    tiles = padded.reshape(rows // block, block, cols // block, block)
    return float(tiles.any(axis=(1, 3)).mean())


# ------------------------------------------------------------------ paths
class _Product:
    """The three ways to compute `inputs @ kernel2d` for one layer."""

    def __init__(self, kind, kernel, in_shape):
        import numpy as np
        import tensorflow as tf

        self.kind = kind
        self.kernel = tf.constant(kernel)
        self.in_shape = in_shape
        matrix = kernel.reshape(-1, kernel.shape[-1])  # [K, out]
        self.rows, self.cols = matrix.shape
        nz = np.nonzero(matrix)
        # tf.sparse: the kernel transposed, [out, K], so that
        # y^T = W^T x^T needs no adjoint of the sparse operand.
        order = np.lexsort((nz[0], nz[1]))
        self.sparse_t = tf.sparse.SparseTensor(
            np.stack([nz[1][order], nz[0][order]], 1).astype(np.int64),
            matrix[nz][order], [self.cols, self.rows],
        )
        self.values = tf.Variable(matrix[nz][order])
        # gather (padded ELL): per output unit, its nonzero input rows.
        counts = np.bincount(nz[1], minlength=self.cols)
        width = max(1, int(counts.max()))
        idx = np.zeros((self.cols, width), np.int32)
        val = np.zeros((self.cols, width), np.float32)
        for j in range(self.cols):
            rows = nz[0][nz[1] == j]
            idx[j, : len(rows)] = rows
            val[j, : len(rows)] = matrix[rows, j]
        self.ell_idx = tf.constant(idx)
        self.ell_val = tf.Variable(val)
        self.ell_width = width
        self.dense_var = tf.Variable(kernel)
        self.mask = tf.constant(kernel != 0)  # the compiled path's mask

    def patches(self, x):
        import tensorflow as tf

        kh, kw = self.kernel.shape[0], self.kernel.shape[1]
        p = tf.image.extract_patches(
            x, [1, kh, kw, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME"
        )
        return p, tf.shape(p)

    def dense(self, x, kernel=None):
        import tensorflow as tf

        kernel = self.kernel if kernel is None else kernel
        if self.kind == "conv":
            return tf.nn.conv2d(x, kernel, 1, "SAME")
        return tf.matmul(x, kernel)

    def _as_matrix(self, x):
        import tensorflow as tf

        if self.kind == "conv":
            p, shape = self.patches(x)
            return tf.reshape(p, [-1, self.rows]), shape
        return x, None

    def _restore(self, y2d, shape):
        import tensorflow as tf

        if shape is None:
            return y2d
        return tf.reshape(y2d, tf.concat([shape[:-1], [self.cols]], 0))

    def tf_sparse(self, x, values=None):
        import tensorflow as tf

        matrix, shape = self._as_matrix(x)
        sp = self.sparse_t if values is None else tf.sparse.SparseTensor(
            self.sparse_t.indices, values, self.sparse_t.dense_shape
        )
        yt = tf.sparse.sparse_dense_matmul(sp, matrix, adjoint_b=True)
        return self._restore(tf.transpose(yt), shape)

    def compiled(self, x, kernel=None):
        import compiled_kernel

        kernel = self.kernel if kernel is None else kernel
        return compiled_kernel.matmul(x, kernel, self.index)

    def compiled_conv(self, x):
        import tensorflow as tf
        from keras_freetickets import native

        return native.sparse_conv2d(x, self.kernel, tf.zeros([self.cols]),
                                    padding="SAME")

    def gather(self, x, values=None):
        import tensorflow as tf

        matrix, shape = self._as_matrix(x)
        values = self.ell_val if values is None else values
        picked = tf.gather(matrix, self.ell_idx, axis=1)  # [B, out, width]
        y = tf.einsum("bow,ow->bo", picked, values)
        return self._restore(y, shape)


def _time(fns, rounds, group_seconds):
    """Median seconds per call of each zero-argument function, interleaved."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(1, min(200, int(group_seconds / once)))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def measure_layer(name, path, kind, shape, in_shape, density, batches, rounds,
                  group_seconds, seed, use_compiled=False):
    import numpy as np
    import tensorflow as tf

    kernel, active = random_kernel(shape, density, seed)
    product = _Product(kind, kernel, in_shape)
    rng = np.random.default_rng(seed + 1)
    matrix = kernel.reshape(-1, shape[-1])
    row = dict(
        protocol=MODELS[name], layer=path, kind=kind, shape=list(shape),
        density=density, active=active, ell_width=product.ell_width,
        blocks_4=block_fraction(matrix, 4), blocks_16=block_fraction(matrix, 16),
        forward={}, training={},
    )
    forward_fns = {
        "dense": tf.function(product.dense),
        "tf.sparse": tf.function(product.tf_sparse),
        "gather": tf.function(product.gather),
    }
    if use_compiled and kind == "dense":
        import compiled_kernel

        product.index = compiled_kernel.mask_index(product.mask)
        forward_fns["compiled"] = tf.function(product.compiled)
        index_fn = tf.function(compiled_kernel.mask_index)
        row["index_ms"] = 1e3 * _time(
            {"index": lambda: index_fn(product.mask)[0].numpy()},
            rounds, group_seconds)["index"]
    if use_compiled and kind == "conv":
        forward_fns["compiled"] = tf.function(product.compiled_conv)
    sparse_labels = [label for label in forward_fns if label != "dense"]
    for batch in batches:
        x = tf.constant(rng.random((batch,) + in_shape, dtype=np.float32))
        reference = forward_fns["dense"](x).numpy()
        for label in sparse_labels:
            error = float(np.abs(forward_fns[label](x).numpy() - reference).max())
            if error > ATOL:
                raise AssertionError(f"{path} {label}: differs from dense by {error}")
        seconds = _time(
            {label: (lambda fn=fn: fn(x).numpy()) for label, fn in forward_fns.items()},
            rounds, group_seconds,
        )
        row["forward"][str(batch)] = _with_speedups(seconds)

    # Training: gradients for the inputs and for the kernel's nonzeros.
    def train_step(path_fn, weights):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = path_fn(x, weights)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, weights])
        return tf.function(step)

    train_fns = {
        "dense": train_step(product.dense, product.dense_var),
        "tf.sparse": train_step(product.tf_sparse, product.values),
        "gather": train_step(product.gather, product.ell_val),
    }
    if "compiled" in forward_fns and kind == "dense":  # the conv op has no gradient
        train_fns["compiled"] = train_step(product.compiled, product.dense_var)
    batch = batches[-1]
    x = tf.constant(rng.random((batch,) + in_shape, dtype=np.float32))
    dx_reference = train_fns["dense"](x)[0].numpy()
    for label in [label for label in sparse_labels if label in train_fns]:
        dx = train_fns[label](x)[0].numpy()
        error = float(np.abs(dx - dx_reference).max() / max(1.0, np.abs(dx_reference).max()))
        if error > ATOL:
            raise AssertionError(f"{path} {label}: input gradient differs by {error}")
    seconds = _time(
        {label: (lambda fn=fn: [g.numpy() for g in fn(x)])
         for label, fn in train_fns.items()},
        rounds, group_seconds,
    )
    row["training"][str(batch)] = _with_speedups(seconds)
    return row


def _with_speedups(seconds):
    dense = seconds["dense"]
    return {
        label: dict(ms=1e3 * s, speedup=dense / s) for label, s in seconds.items()
    }


# ----------------------------------------------------------------- report
def render_markdown(report):
    lines = [
        "# Sparse kernels, layer by layer (BENCHMARK.md \"Speed figures\")",
        "",
        f"- Protocols: {', '.join(report['protocols'])} (their prunable layers "
        "at the ERK densities for S = 0.8 and 0.9; exact-count random masks).",
        "- Paths: dense = `tf.matmul` / `tf.nn.conv2d` with the zeros; "
        "tf.sparse = `tf.sparse.sparse_dense_matmul` (convolutions through an "
        "`extract_patches` im2col); gather = padded ELL (`tf.gather` of each "
        "output's nonzero inputs + weighted sum); compiled = the C++ kernel of "
        "`compiled_kernel.py` on Dense layers (its mask index, built once per "
        "mask, timed apart) and the library's sparse convolution "
        "(`native.sparse_conv2d`, index built inside every call; forward "
        "only) on Conv2D layers. Speed-up = dense time / "
        "path time (> 1 is faster than dense). Training = forward + backward "
        "(gradients for the inputs and the nonzero weights).",
        f"- Machine: {report['machine']}.",
        f"- Date: {report['date']}; TensorFlow {report['versions']['tensorflow']}.",
        f"- Command: `{report['command']}` ({report['wall_seconds']:.0f} s); "
        f"medians of {report['settings']['rounds']} interleaved rounds."
        + (" QUICK SMOKE RUN: figures are not meaningful."
           if report["settings"]["quick"] else ""),
        "",
    ]
    batches = report["settings"]["batches"]
    header = ["model", "layer", "S", "density", "blocks with a nonzero (4x4 / 16x16)",
              "compiled: index ms"]
    labels = [label for label in PATHS[1:]
              if any(label in r["forward"][str(batches[0])] for r in report["rows"])]
    for part in [f"forward b={b}" for b in batches] + [f"training b={batches[-1]}"]:
        header += [f"{part}: dense ms", *labels]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    faster = []
    for r in report["rows"]:
        cells = [
            r["protocol"], f"`{r['layer']}` {'x'.join(map(str, r['shape']))}",
            str(r["sparsity"]), f"{r['density']:.3f}",
            f"{r['blocks_4']:.2f} / {r['blocks_16']:.2f}",
            f"{r['index_ms']:.3f}" if "index_ms" in r else "n/a",
        ]
        groups = [("forward", str(b)) for b in batches]
        groups.append(("training", str(batches[-1])))
        for part, b in groups:
            t = r[part][b]
            cells.append(f"{t['dense']['ms']:.3f}")
            cells += [f"{t[label]['speedup']:.2f}x" if label in t else "n/a"
                      for label in labels]
            for label in labels:
                if label in t and t[label]["speedup"] > 1.0:
                    faster.append(
                        f"{r['protocol']} `{r['layer']}` S={r['sparsity']} "
                        f"{part} b={b}: {label} {t[label]['speedup']:.2f}x"
                    )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Where a sparse path beat dense", ""]
    if faster:
        lines += [f"- {item}" for item in faster]
    else:
        lines.append("- Nowhere: on every layer, batch and pass, dense was faster.")
    lines += _fit_markdown(report.get("fit"))
    lines += _fit_markdown(report.get("fit_cnn"), "cnn")
    lines.append("")
    return "\n".join(lines)


def _fit_markdown(fit, protocol="mlp"):
    if not fit:
        return []
    head = ["", "## Whole fits: dense against the compiled path"
            + ("" if protocol == "mlp" else f" ({MODELS[protocol]})"), ""]
    s = fit["seconds"]
    return head + [
        f"{MODELS[protocol]}'s model, {fit['epochs']} epoch(s) per fit on the "
        "training split, batch 128, plain SGD (no SparseOptimizer, no L2), "
        f"alternating; compiled layers: {', '.join(fit['layer_names'])} "
        f"(the table's fixed masks at S = {fit['sparsity']}).",
        "",
        "| pair | dense s | compiled s | compiled / dense |",
        "|---|---|---|---|",
        *[f"| {p} | {d:.2f} | {c:.2f} | {c / d:.3f} |"
          for p, (d, c) in enumerate(zip(s["dense"], s["compiled"]))],
        "",
        f"Median ratio: {fit['ratio']:.3f} (< 1: the compiled fit is faster).",
    ]


def run_fit(rows, places, pairs, quick, protocol="mlp"):
    """The whole-fit comparison with the prunable layers at `places` (their
    order among the protocol's prunable kernels) compiled."""
    import numpy as np

    from keras_freetickets.contrib.datasets import load_fashion_mnist

    import compiled_kernel

    chosen = [r for r in rows if r["protocol"] == MODELS[protocol]
              and r["sparsity"] == FLAGS.fit_sparsity and r["position"] in places]
    # Where each prunable kernel sits among the model's layers.
    model = protocols.build_model(protocol, seed=0)
    with_kernel = [i for i, layer in enumerate(model.layers)
                   if getattr(layer, "kernel", None) is not None]
    masks = {}
    for r in chosen:  # the masks the layer table timed
        kernel, _ = random_kernel(tuple(r["shape"]), r["density"], seed=r["position"])
        masks[with_kernel[r["position"]]] = kernel != 0
    x, y = load_fashion_mnist("train", flatten=(protocol == "mlp"))
    x = np.asarray(x)
    if protocol == "cnn":
        x = x.reshape(-1, 28, 28, 1)
    if quick:
        x, y = x[:2560], y[:2560]
    result = compiled_kernel.fit_comparison(x, np.asarray(y), masks, pairs,
                                            log=True, protocol=protocol)
    result["layer_names"] = [
        f"`{r['layer']}` {'x'.join(map(str, r['shape']))}" for r in chosen]
    result["sparsity"] = FLAGS.fit_sparsity
    return result


def main(argv):
    benchkit.no_arguments(argv)
    models, fit_layers, cnn_fit_layers = _validate_flags()
    start = time.time()
    batches = (1, 8) if FLAGS.quick else (1, 128)
    rounds = 2 if FLAGS.quick else FLAGS.rounds
    group = 0.005 if FLAGS.quick else FLAGS.seconds_per_call_group
    rows = []
    if FLAGS.compiled:
        import compiled_kernel

        compiled_kernel.load()  # a missing compiler fails here, not mid-run
        from keras_freetickets import native

        native.build(native.CONV_SOURCE)
        if not native.conv_available():
            raise SystemExit("The compiled sparse convolution is built but not "
                             "enabled here (KFT_NATIVE, or a visible GPU).")
    for name in models:
        specs = layer_specs(name)
        for sparsity in SPARSITIES:
            dens = densities(specs, sparsity)
            for index, (path, kind, shape, in_shape) in enumerate(specs):
                row = measure_layer(name, path, kind, shape, in_shape, dens[path],
                                    batches, rounds, group, seed=index,
                                    use_compiled=FLAGS.compiled)
                row["sparsity"] = sparsity
                row["position"] = index  # the layer's place in the model
                rows.append(row)
                f = row["forward"][str(batches[-1])]
                print(f"[sparse_kernels] {MODELS[name]} {path} S={sparsity}: "
                      f"tf.sparse {f['tf.sparse']['speedup']:.2f}x, gather "
                      f"{f['gather']['speedup']:.2f}x", flush=True)
    report = dict(
        **benchkit.report_header("sparse_kernels", [MODELS[m] for m in models]),
        settings=dict(sparsities=list(SPARSITIES), distribution="erk",
                      batches=list(batches), rounds=rounds, quick=FLAGS.quick,
                      compiled=FLAGS.compiled),
        rows=rows,
    )
    if FLAGS.compiled and "mlp" in models and FLAGS.fit_pairs:
        report["fit"] = run_fit(rows, fit_layers, FLAGS.fit_pairs, FLAGS.quick)
    if FLAGS.compiled and "cnn" in models and FLAGS.fit_pairs:
        # By default both convolutions (most of the CNN's time).
        report["fit_cnn"] = run_fit(rows, cnn_fit_layers, FLAGS.fit_pairs, FLAGS.quick,
                                    protocol="cnn")
    report["wall_seconds"] = time.time() - start
    benchkit.write_report(FLAGS.out, "sparse_kernels", report, render_markdown(report))


if __name__ == "__main__":
    app.run(main)
