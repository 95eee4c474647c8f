"""The compiled sparse kernel of the sparse-kernel benchmark
(`benchmarks/compiled_kernel.py`): its products equal the dense ones on the
mask within float tolerance, its kernel gradient is exactly zero off the mask,
it refuses a wrong index, and a failed build leaves nothing behind. Skipped
where no C++ compiler is installed (the benchmark then runs --nocompiled)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import compiled_kernel  # noqa: E402

# Slow: building the benchmark's kernel takes ~12 s and the module ~26 s; it
# is the benchmark's, not the library's (`scripts/test.sh -m slow` runs it).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        compiled_kernel.compiler() is None,
        reason="no C++ compiler (g++) here",
    ),
]
RTOL = 1e-5  # relative to the largest magnitude of the dense result


@pytest.fixture(scope="module")
def ops():
    return compiled_kernel.load()


def _case(batch, rows, cols, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) < density
    kernel = np.where(mask, rng.standard_normal((rows, cols)), 0).astype(np.float32)
    x = rng.standard_normal((batch, rows)).astype(np.float32)
    return mask, kernel, x


def _close(actual, expected):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(np.asarray(actual) - expected).max(initial=0.0)) <= RTOL * scale


@pytest.mark.parametrize("batch, rows, cols, density", [
    (128, 784, 300, 0.162),   # FMNIST-MLP v1's first layer at S = 0.8
    (1, 784, 300, 0.08),      # batch 1: one padded vector
    (17, 300, 100, 0.469),    # a batch that is not a multiple of 16
    (130, 100, 10, 1.0),      # more than one 128-wide batch block
    (5, 20, 8, 0.0),          # an empty mask
    (0, 10, 5, 0.5),          # an empty batch
])
def test_products_match_dense_on_the_mask(ops, batch, rows, cols, density):
    import tensorflow as tf

    mask, kernel, x = _case(batch, rows, cols, density, seed=batch + rows)
    index = compiled_kernel.mask_index(tf.constant(mask))
    assert [int(t.shape[0]) for t in index] == [rows + 1, mask.sum(), cols + 1, mask.sum()]
    w = tf.Variable(kernel)
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        sparse = compiled_kernel.matmul(xt, w, index)
        dense = tf.matmul(xt, w)
        sparse_loss = tf.reduce_sum(sparse * sparse)
        dense_loss = tf.reduce_sum(dense * dense)
    dx, dw = tape.gradient(sparse_loss, [xt, w])
    dx_dense, dw_dense = tape.gradient(dense_loss, [xt, w])
    assert sparse.shape == dense.shape
    assert _close(sparse, dense.numpy())
    assert _close(dx, dx_dense.numpy())
    assert _close(dw, np.where(mask, dw_dense.numpy(), 0))
    assert np.all(dw.numpy()[~mask] == 0)  # off the mask: exactly zero


@pytest.mark.parametrize("batch, size, channels, out, kernel_size, density", [
    (37, 14, 32, 64, 3, 0.136),   # FMNIST-CNN v1's second convolution, S = 0.8
    (16, 28, 1, 32, 3, 1.0),      # its first, one full block of 16 samples
    (5, 7, 3, 4, 5, 0.4),         # a 5x5 kernel, a part-filled block
    (3, 6, 2, 3, 1, 0.0),         # an empty kernel
])
def test_conv_gradients_match_dense_on_the_mask(ops, batch, size, channels, out,
                                                 kernel_size, density):
    import tensorflow as tf

    from keras_freetickets import native

    native.build(native.CONV_SOURCE)
    rng = np.random.default_rng(batch + size)
    shape = (kernel_size, kernel_size, channels, out)
    mask = rng.random(shape) < density
    w = tf.Variable(np.where(mask, rng.standard_normal(shape), 0).astype(np.float32))
    x = tf.constant(rng.standard_normal((batch, size, size, channels)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        sparse = compiled_kernel.conv2d(x, w)
        dense = tf.nn.conv2d(x, w, 1, "SAME")
        sparse_loss = tf.reduce_sum(sparse * sparse)
        dense_loss = tf.reduce_sum(dense * dense)
    dx, dw = tape.gradient(sparse_loss, [x, w])
    dx_dense, dw_dense = tape.gradient(dense_loss, [x, w])
    assert _close(sparse, dense.numpy())
    assert _close(dx, dx_dense.numpy())
    assert _close(dw, np.where(mask, dw_dense.numpy(), 0))
    assert np.all(dw.numpy()[~mask] == 0)  # off the mask: exactly zero


def test_index_lists_each_active_entry_once_in_order(ops):
    import tensorflow as tf

    mask = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]], bool)
    row_ptr, row_cols, col_ptr, col_rows = (
        t.numpy().tolist() for t in compiled_kernel.mask_index(tf.constant(mask)))
    assert (row_ptr, row_cols) == ([0, 2, 2, 4], [0, 2, 0, 1])
    assert (col_ptr, col_rows) == ([0, 2, 3, 4], [0, 2, 2, 0])


def test_a_wrong_index_is_refused(ops):
    import tensorflow as tf

    mask, kernel, x = _case(4, 6, 5, 0.5, seed=0)
    row_ptr, row_cols, col_ptr, col_rows = compiled_kernel.mask_index(tf.constant(mask))
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of"):
        ops.ft_spmm(x, kernel, col_ptr, col_rows + 6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="wrong shape"):
        ops.ft_spmm(x, kernel, row_ptr, col_rows)  # a row index for columns
    with pytest.raises(tf.errors.InvalidArgumentError, match="x .* do not multiply"):
        ops.ft_spmm(x[:, :5], kernel, col_ptr, col_rows)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy .* do not multiply"):
        ops.ft_spmm_input_grad(x, kernel, row_ptr, row_cols)  # dy must be [4, 5]
    with pytest.raises(tf.errors.InvalidArgumentError, match="wrong shape"):
        ops.ft_spmm_input_grad(x[:, :5], kernel, col_ptr, col_rows)  # columns for rows
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 2-D"):
        ops.ft_mask_index(tf.constant(mask.ravel()))


def test_a_failed_build_names_the_cause_and_leaves_nothing(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(compiled_kernel.BuildError, match="broken.cc"):
        compiled_kernel.compile_library(out, source=broken)
    assert list(out.iterdir()) == []
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(compiled_kernel.BuildError, match="no-such-compiler-here"):
        compiled_kernel.compile_library(out)
    assert list(out.iterdir()) == []


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """The same products, bit for bit, with 1 and with 2 intra-op threads
    (the thread pool binds a process, so each runs in a child)."""
    library = compiled_kernel.compile_library(tmp_path)
    child = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
        ops = tf.load_op_library({str(library)!r})
        rng = np.random.default_rng(0)
        mask = rng.random((784, 300)) < 0.162
        w = np.where(mask, rng.standard_normal((784, 300)), 0).astype(np.float32)
        x = rng.standard_normal((128, 784)).astype(np.float32)
        dy = rng.standard_normal((128, 300)).astype(np.float32)
        rp, rc, cp, cr = ops.ft_mask_index(mask)
        out = [ops.ft_spmm(x, w, cp, cr), ops.ft_spmm_input_grad(dy, w, rp, rc),
               ops.ft_sddmm(x, dy, rp, rc)]
        np.savez(sys.argv[2], *[t.numpy() for t in out])
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    files = []
    for threads in (1, 2):
        target = tmp_path / f"threads{threads}.npz"
        subprocess.run([sys.executable, "-c", child, str(threads), str(target)],
                       check=True, env=env, timeout=300)
        files.append(np.load(target))
    for name in files[0].files:
        assert np.array_equal(files[0][name], files[1][name])


def test_benchmark_refuses_a_negative_fit_pairs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sparse_kernels.py"), "--fit_pairs=-1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode != 0
    assert "Flag --fit_pairs must be >= 0. Received: -1" in proc.stderr
