"""A hand-written sparse kernel for the sparse-kernel benchmark (issue 11,
"Sparse kernels, honestly evaluated"): the path "compiled" of
`sparse_kernels.py`, and its whole-fit comparison.

`compiled_kernel/ft_spmm.cc` holds four TensorFlow CPU ops for a `Dense`
layer whose kernel has zeros outside a mask: the mask's index (by row and by
column), the forward product, the input gradient, and the kernel gradient at
the active entries only (zero elsewhere, so no mask is applied afterwards).
They work on batch-transposed copies with the batch as the vectorized
dimension, and each output element is summed by one thread, so results do not
depend on the thread count. `load()` compiles the file with the C++ compiler
(`$CXX`, else `g++`) against the installed TensorFlow's headers, for this
machine's instruction set (`native.machine_flags()`), into a temporary folder, loads
it and deletes the folder; this takes ~10 s once per process. It is
benchmark code, not part of the library: the library's layers stay dense
(see the README's sparse-kernel table for why).

No flags here, so the tests and other scripts may import it.
"""

import os
import pathlib
import shutil
import sys
import tempfile

from keras_freetickets import native

SOURCE = pathlib.Path(__file__).resolve().parent / "compiled_kernel" / "ft_spmm.cc"
_LOADED = {}


# The build itself is the library's (`keras_freetickets.native`, which
# compiles its selection op the same way); its error is this module's.
BuildError = native.BuildError


def compiler():
    """The C++ compiler `load` uses ($CXX or g++), or None when absent."""
    return shutil.which(os.environ.get("CXX", "g++"))


def compile_library(out_dir, source=SOURCE):
    """Compiles `source` into `out_dir`/ft_spmm.so for this machine's
    instruction set and returns its path; a failed build leaves nothing
    behind (`native.compile_library`)."""
    return native.compile_library(
        source, pathlib.Path(out_dir) / "ft_spmm.so", native.machine_flags())


def load():
    """The compiled ops module (built once per process)."""
    if "ops" not in _LOADED:
        import tensorflow as tf

        folder = tempfile.mkdtemp(prefix="ft_spmm_")
        try:  # once loaded, the library stays mapped: its file can go
            _LOADED["ops"] = tf.load_op_library(str(compile_library(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return _LOADED["ops"]


def mask_index(mask):
    """(row_ptr, row_cols, col_ptr, col_rows) of a 2-D boolean mask."""
    return load().ft_mask_index(mask)


def matmul(x, kernel, index):
    """`x @ kernel` over the entries in `index` (from `mask_index`), with
    gradients for `x` and for the indexed entries of `kernel` (zero at the
    others)."""
    import tensorflow as tf

    ops = load()
    row_ptr, row_cols, col_ptr, col_rows = index

    @tf.custom_gradient
    def product(x, kernel):
        def grad(dy):
            return (ops.ft_spmm_input_grad(dy, kernel, row_ptr, row_cols),
                    ops.ft_sddmm(x, dy, row_ptr, row_cols))

        return ops.ft_spmm(x, kernel, col_ptr, col_rows), grad

    return product(x, kernel)


def conv2d(x, kernel):
    """A stride-1 "SAME" convolution (odd kernel sizes) that reads only the
    kernel's nonzeros: forward and input gradient through the library's
    sparse convolution (`native.sparse_conv2d`; the input gradient is the
    same convolution of `dy` with the kernel flipped and its channels
    swapped), kernel gradient through `FtConvKernelGrad` (zero off the
    nonzeros)."""
    import tensorflow as tf

    from keras_freetickets import native

    ops = load()

    @tf.custom_gradient
    def product(x, kernel):
        out_channels, in_channels = tf.shape(kernel)[3], tf.shape(kernel)[2]

        def grad(dy):
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            dx = native.sparse_conv2d(dy, flipped, tf.zeros([in_channels]))
            return dx, ops.ft_conv_kernel_grad(x, dy, kernel)

        return native.sparse_conv2d(x, kernel, tf.zeros([out_channels])), grad

    return product(x, kernel)


def compiled_conv(conv, mask):
    """A Keras `Conv2D` like the built `conv` (strides 1, "same" padding),
    its kernel restricted to the boolean `mask`, computed by `conv2d`."""
    import keras
    import numpy as np

    class CompiledConv2D(keras.layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            return conv2d(inputs, kernel)

    config = conv.get_config()
    config["name"] = f"compiled_{conv.name}"
    layer = CompiledConv2D.from_config(config)
    layer.build((None, None, None, conv.kernel.shape[2]))
    layer.kernel.assign(np.where(mask, conv.kernel.numpy(), 0).astype(np.float32))
    layer.bias.assign(conv.bias.numpy())
    return layer


def compiled_dense(dense, mask):
    """A layer computing what the built Keras `Dense` layer `dense` computes
    with its kernel restricted to the boolean `mask` (numpy, kernel-shaped),
    through the compiled ops. The mask is fixed, so it is indexed once, when
    the layer is built (a layer whose mask a sparse optimizer rewires would
    index it again at each mask update: `index_ms` in the layer table)."""
    import keras
    import numpy as np
    import tensorflow as tf

    class CompiledDense(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(
                shape=dense.kernel.shape, name="kernel",
                initializer=lambda shape, dtype=None: tf.constant(
                    np.where(mask, dense.kernel.numpy(), 0).astype(np.float32)),
            )
            self.bias = self.add_weight(
                shape=dense.bias.shape, name="bias",
                initializer=lambda shape, dtype=None: tf.constant(dense.bias.numpy()),
            )
            self.index = [t.numpy() for t in mask_index(tf.constant(mask))]

        def call(self, inputs):
            y = matmul(inputs, self.kernel, self.index) + self.bias
            return dense.activation(y)

    return CompiledDense(name=f"compiled_{dense.name}")


def fit_comparison(x, y, masks, pairs, epochs=1, seed=0, log=None,
                   protocol="mlp"):
    """Whole `fit`s of a protocol's model ("mlp": FMNIST-MLP v1, "cnn":
    FMNIST-CNN v1), dense against the same model with the layers in `masks`
    ({layer index: boolean mask}; `Dense` or `Conv2D`) on the compiled
    path, alternating (A B B A ...), each arm `pairs` times; plain SGD
    (momentum 0.9, lr 0.05), batch 128, the protocol's L2 left out (a
    kernel regularizer would be a dense op on the compiled kernels too).
    Returns the seconds of each fit and the median per-pair ratio."""
    import statistics
    import time

    import keras

    import protocols

    def make(compiled):
        model = protocols.build_model(protocol, seed=seed, l2=None)
        if compiled:
            def swap(layer, mask):
                if isinstance(layer, keras.layers.Conv2D):
                    return compiled_conv(layer, mask)
                return compiled_dense(layer, mask)

            layers = [
                swap(layer, masks[i]) if i in masks else layer
                for i, layer in enumerate(model.layers)
            ]
            model = keras.Sequential([keras.Input(model.input_shape[1:]), *layers])
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        model.fit(x[:1280], y[:1280], batch_size=128, epochs=1, verbose=0)
        return model

    models = {"dense": make(False), "compiled": make(True)}
    seconds = {arm: [] for arm in models}
    for p in range(pairs):
        for arm in (("dense", "compiled") if p % 2 == 0 else ("compiled", "dense")):
            start = time.perf_counter()
            models[arm].fit(x, y, batch_size=128, epochs=epochs, verbose=0)
            seconds[arm].append(time.perf_counter() - start)
            if log:
                print(f"[sparse_kernels] fit pair {p} {arm}: "
                      f"{seconds[arm][-1]:.2f} s", file=sys.stderr, flush=True)
    ratios = [c / d for c, d in zip(seconds["compiled"], seconds["dense"])]
    return dict(seconds=seconds, ratios=ratios, ratio=statistics.median(ratios),
                layers=sorted(masks), epochs=epochs, pairs=pairs)
