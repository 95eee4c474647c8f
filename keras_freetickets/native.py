"""Compiled CPU ops: the selection op (faster mask updates, the same masks),
the masked SGD update (a cheaper ordinary step, the same weights) and a
sparse convolution for ensemble inference.

A mask update's two exact selections per layer (`selection.select_smallest`)
take some seventy small TensorFlow ops each, and on a CPU their per-op cost
is most of an update step. `_native/ft_select.cc` computes the same flags,
bit for bit, in one op of three passes over the keys. It is compiled once
per machine, TensorFlow version and source, with the C++ compiler (`$CXX`,
else `g++`) against the installed TensorFlow's headers:

    python -m keras_freetickets.native build    # scripts/setup.sh runs it
    python -m keras_freetickets.native status

The library is kept in `$KFT_NATIVE_DIR`, else
`$XDG_CACHE_HOME/keras_freetickets` (`~/.cache/keras_freetickets`). Once it
is there, every selection traced outside XLA uses it, unless a GPU is
visible (see `set_enabled`); nothing is compiled while a model trains.
`KFT_NATIVE=off` (or `set_enabled(False)`) keeps the TensorFlow ops; under
XLA and on TPU the static-shape selection is used either way. The op has a CPU kernel only; the selections are a train step's
mask update, never part of an exported model.

The same library holds `masked_sgd_update`: `SparseOptimizer`'s fused SGD
update of a masked kernel (`fused_sgd=True`, the default) selects the
gradient on the mask and applies SGD's update in one op and one pass over
the kernel, where TensorFlow's ops take two, with the same bits. It is used
where the selection op is (not under XLA or a distribution strategy).

`_native/ft_sparse_conv.cc` is a second library, built beside the first
by the same `build` command but for the build machine's instruction set
(`-march=native`; its file name includes the CPU's feature flags): a
convolution that reads only a kernel's nonzeros, with the ReLU and a 2x2
max pooling fused in (`sparse_conv2d`). `FreeTicketsEnsemble(...,
conv_kernels=...)` runs its members' eligible `Conv2D` layers through it
at inference.

Example:

```python
from keras_freetickets import native
native.available()  # True once `build` has run on this machine
```
"""

import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from keras_freetickets._validation import check_bool

__all__ = [
    "BuildError", "available", "build", "build_all", "compile_library",
    "conv_available", "library_path", "machine_flags", "masked_sgd_update",
    "set_enabled", "sparse_conv2d",
]

SOURCE = pathlib.Path(__file__).resolve().parent / "_native" / "ft_select.cc"
CONV_SOURCE = SOURCE.with_name("ft_sparse_conv.cc")
_STATE = {"enabled": None}  # None: the environment decides
_LOADED = {}


class BuildError(RuntimeError):
    """The op could not be compiled here (no compiler, or it failed; its
    message is in the error)."""


def _compile_flags():
    import tensorflow as tf

    return [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def library_path(source=SOURCE):
    """Where `build` puts a compiled library: one file per source,
    TensorFlow version and compile flags (and, for a library built for this
    machine's instruction set, its CPU features), so a new TensorFlow or
    another CPU never loads an old one."""
    folder = os.environ.get("KFT_NATIVE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "keras_freetickets",
    )
    stem = pathlib.Path(source).stem
    return pathlib.Path(folder) / f"{stem}-{_digest(str(source))}.so"


def _extra_flags(source):
    """The flags a source is built with beyond `compile_library`'s: the
    machine's instruction set for the convolution; no fused multiply-add
    for the selection library, whose SGD updates must round as
    TensorFlow's do (compilers contract `a * b - c` where the instruction
    set has one, as aarch64's baseline does)."""
    if pathlib.Path(source).resolve() == CONV_SOURCE:
        return machine_flags()
    return ["-ffp-contract=off"]


def machine_flags():
    """Flags for this machine's instruction set: `-march=native`, less
    AVX512-FP16 where the compiler knows it (TensorFlow's bundled Eigen does
    not compile with GCC's AVX512-FP16 types). An empty list without a
    compiler."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    return [] if cxx is None else list(_machine_flags(cxx))


@functools.lru_cache(maxsize=None)
def _machine_flags(cxx):
    flags = ["-march=native"]
    probe = subprocess.run(
        [cxx, "-march=native", "-mno-avx512fp16", "-x", "c++", "-E", "-",
         "-o", os.devnull],
        input="", capture_output=True, text=True)
    if probe.returncode == 0:
        flags.append("-mno-avx512fp16")
    return tuple(flags)


def _cpu_features():
    """The CPU's feature flags (Linux), else the processor's name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _digest(source):
    """The file name's hash, read once per source and process: every
    selection traced asks for the library's path."""
    import tensorflow as tf

    digest = hashlib.sha256()
    digest.update(pathlib.Path(source).read_bytes())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_compile_flags()).encode())
    digest.update(" ".join(_extra_flags(source)).encode())
    if pathlib.Path(source).resolve() == CONV_SOURCE:
        digest.update(_cpu_features().encode())
    return digest.hexdigest()[:16]


def build(source=SOURCE, force=False):
    """Compiles the op into `library_path()` unless it is there already, and
    returns the path (see `compile_library`). Raises `BuildError` when there
    is no compiler or it fails; the library then keeps TensorFlow's ops
    (the same masks, slower)."""
    force = check_bool("force", force)
    target = library_path(source)
    if target.exists() and not force:
        return target
    compile_library(source, target, _extra_flags(source))
    _LOADED.pop(str(target), None)  # found missing earlier: look again
    return target


def build_all(force=False):
    """Builds the selection op and the sparse convolution (see `build`);
    returns {source file name: path or the `BuildError`}."""
    results = {}
    for source in (SOURCE, CONV_SOURCE):
        try:
            results[source.name] = build(source, force=force)
        except BuildError as error:
            results[source.name] = error
    return results


def compile_library(source, target, extra_flags=()):
    """Compiles the C++ file `source` into the TensorFlow op library
    `target` with `$CXX` (else `g++`), `-O3` and the installed TensorFlow's
    compile and link flags, plus `extra_flags`. The file is written under a
    temporary name in `target`'s folder and renamed when complete: a failed
    or interrupted build leaves nothing behind, and two builds at once do
    not see each other's halves. Raises `BuildError` naming the cause.
    (`benchmarks/compiled_kernel.py` builds its sparse kernel with it.)"""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise BuildError(
            f"No C++ compiler found (CXX={os.environ.get('CXX', 'g++')!r}); "
            "install g++ or point CXX at a C++17 compiler."
        )
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(
        prefix=target.name + ".", suffix=".partial", dir=target.parent)
    os.close(handle)
    command = [cxx, "-std=c++17", "-shared", "-fPIC", "-O3",
               "-Wno-deprecated-declarations", *extra_flags, str(source),
               "-o", partial, *_compile_flags()]
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"{cxx} failed (exit {proc.returncode}) on {source}:\n"
                + proc.stderr[-3000:]
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def set_enabled(enabled):
    """Whether selections traced from now on use the compiled op when it is
    built: True or False, or None to follow `KFT_NATIVE` again. A function
    already traced keeps its ops.

    `KFT_NATIVE` is `auto` (the default: on unless a GPU is visible, where
    the op, which has a CPU kernel only, would copy each kernel to the host
    and back; not measured here, so not chosen), `on` (`1`, `true`) or
    `off` (`0`, `false`)."""
    _STATE["enabled"] = check_bool("enabled", enabled, allow_none=True)


def _enabled():
    if _STATE["enabled"] is not None:
        return _STATE["enabled"]
    value = os.environ.get("KFT_NATIVE", "auto").strip().lower()
    if value not in ("auto", "on", "1", "true", "off", "0", "false"):
        raise ValueError(
            "Environment variable `KFT_NATIVE` must be one of auto, on, off "
            f"(or 1, 0, true, false). Received: KFT_NATIVE={value!r}"
        )
    if value == "auto":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return value not in ("off", "0", "false")


def _ops(source=SOURCE):
    """The loaded op module of `source`, or None when it is off or not
    built. A file that does not load (damaged, or built for another
    machine) is reported once and the TensorFlow ops are used."""
    if not _enabled():
        return None
    path = library_path(source)
    if str(path) not in _LOADED:
        ops = None
        if path.exists():
            import tensorflow as tf

            try:
                ops = tf.load_op_library(str(path))
            except Exception as error:  # noqa: BLE001: any load failure
                what = ("sparse convolution" if source == CONV_SOURCE
                        else "selection op")
                print(f"keras_freetickets: the compiled {what} at {path} "
                      f"did not load ({error}); using TensorFlow's ops. Run "
                      "`python -m keras_freetickets.native build --force`.",
                      file=sys.stderr)
        _LOADED[str(path)] = ops
    return _LOADED[str(path)]


def available():
    """True when selections (and masked SGD updates) traced now would use
    the compiled ops."""
    return _ops() is not None


def select_smallest(keys, k, after_minimum):
    """The compiled `selection.select_smallest`, or None when unavailable:
    flat int32 `keys`, an int32 scalar `k`, a bool scalar `after_minimum`."""
    ops = _ops()
    if ops is None:
        return None
    return ops.ft_select_smallest(keys, k, after_minimum)


def select_by_keys(values, eligible, k, kind):
    """The compiled `select_smallest(where(eligible, KEYS(values), -2**31),
    k, after_minimum=True)` with the keys of `masking` computed inside the
    op (`kind`: "magnitude" or "descending"), or None when unavailable. The
    keys read `values` as float32, as `masking`'s do."""
    ops = _ops()
    if ops is None:
        return None
    import tensorflow as tf

    return ops.ft_select_by_keys(tf.cast(values, tf.float32), eligible, k,
                                 kind=kind)


def masked_sgd_update(variable, accum, learning_rate, gradient, mask,
                      momentum=0.0, nesterov=False):
    """SGD's update of `variable` with `where(mask, gradient, 0)` as the
    gradient, in one op; returns True, or False, having done nothing, when
    the op is unavailable. `accum` is the momentum slot (a resource variable), or
    None for plain gradient descent; the result is that of TensorFlow's
    `ResourceApplyKerasMomentum` (`ResourceApplyGradientDescent`) given the
    selected gradient, bit for bit. Float32 or float64, CPU only."""
    ops = _ops()
    if ops is None:
        return False
    import tensorflow as tf

    dtype = variable.dtype
    learning_rate = tf.cast(learning_rate, dtype)
    if accum is None:
        ops.ft_masked_apply_gradient_descent(
            variable.handle, learning_rate, gradient, mask)
    else:
        ops.ft_masked_apply_momentum(
            variable.handle, accum.handle, learning_rate, gradient, mask,
            tf.constant(momentum, dtype), use_nesterov=bool(nesterov))
    return True


def conv_available():
    """True when the compiled sparse convolution is built, loads and is
    enabled (`set_enabled`, `KFT_NATIVE`), so `sparse_conv2d` would run."""
    return _ops(CONV_SOURCE) is not None


def sparse_conv2d(inputs, kernel, bias, padding="SAME", relu=False, pool=1):
    """`maxpool(act(conv2d(inputs, kernel) + bias))` reading only the
    kernel's nonzeros, or None when the compiled convolution is unavailable.

    NHWC float32 `inputs` `[N, H, W, C]`, `kernel` `[KH, KW, C, O]`, `bias`
    `[O]`; strides 1, no dilation; `padding` "SAME" or "VALID" as in
    `tf.nn.conv2d`; `relu` applies a ReLU; `pool` 2 applies a 2x2 max
    pooling with stride 2 ("VALID"), 1 none. The sums run in another order
    than TensorFlow's convolution, so results agree within float rounding.
    A CPU kernel only, and not for XLA (`FreeTicketsEnsemble` checks both).
    """
    ops = _ops(CONV_SOURCE)
    if ops is None:
        return None
    return ops.ft_sparse_conv2d(inputs, kernel, bias, padding=padding,
                                relu=relu, pool=pool)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("build", "status") or (
            argv[1:] and argv[1:] != ["--force"]):
        print("usage: python -m keras_freetickets.native build [--force] | status",
              file=sys.stderr)
        return 2
    if argv[0] == "build":
        results = build_all(force=argv[1:] == ["--force"])
        for name, result in results.items():
            if isinstance(result, BuildError):
                print(f"keras_freetickets.native: {result}", file=sys.stderr)
            else:
                print(f"built {result}")
        # The selection op decides: the convolution is for inference only.
        return 1 if isinstance(results[SOURCE.name], BuildError) else 0
    for source, used in ((SOURCE, available), (CONV_SOURCE, conv_available)):
        path = library_path(source)
        print(f"library: {path} ({'present' if path.exists() else 'not built'})")
        print(f"in use: {used()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
