"""Export a `FreeTicketsEnsemble` as one self-contained SavedModel for serving.

`export_ensemble(ensemble, "serving/fashion/1")` (or
`ensemble.export("serving/fashion/1")`) writes a TensorFlow SavedModel,
through `keras.export.ExportArchive`, that TF Serving, `saved_model_cli` and
`tf.saved_model.load` run without Keras or keras_freetickets installed.

Signatures (all tensors are batch-major, so TF Serving's row format and
request batching work on every output):

- `serving_default`: input `inputs`, float32, shape `[batch] + input_shape`
  (any batch size, the members' input shape otherwise). Outputs:
  `probabilities` (float32 `[batch, C]`: the mean of the members' softmax
  probabilities, as `ensemble.predict`), `classes` (int64 `[batch]`: argmax of
  `probabilities`), `confidence` (float32 `[batch]`: max of `probabilities`),
  `entropy` (float32 `[batch]`: predictive entropy of `probabilities` in nats,
  `-sum p log p`) and `mutual_information` (float32 `[batch]`: `entropy` minus
  the mean of the members' own entropies, in nats, clipped at 0; the part of
  the uncertainty due to members disagreeing, 0 when they all agree).
- `members`: same input; output `member_probabilities`, float32
  `[batch, M, C]`: member `m`'s probabilities for example `n` at `[n, m]`
  (note: `ensemble.member_predictions` returns `(M, batch, C)`).

For members with more output axes (`(batch, ..., C)`), the extra axes are
kept in every output.

Compact storage: the kernels of `Dense` and `Conv1D/2D/3D` layers are stored
the way member files store them (`keras_freetickets.members`): a packed bitmap
of their nonzero positions plus the nonzero values, as constants inside the
graph, about `(1 - S) + 1/32` of the dense bytes. The graph rebuilds the dense
kernel from them (`tf.where`, `tf.tensor_scatter_nd_update`); its inputs
being constants, TensorFlow's graph optimizer (Grappler's constant folding, which
runs when `tf.saved_model.load`, TF Serving or `saved_model_cli` first run the
signature) folds the rebuild into a dense constant once, so serving runs
dense kernels at dense speed. Grappler folds constants below 10 MiB only, so a
larger kernel is cut along its output axis into slices of at most 8 MiB, and
the layer runs once per slice (outputs concatenated). Biases, normalization
statistics and every other weight are ordinary variables of the SavedModel. A
kernel is stored compact only when that is smaller than dense (density below
31/32 at float32). `kernel_mode` chooses how the compact kernels run (see
`export_ensemble`); the measured costs of the default against dense storage,
against rebuilding from variables on every call (`"rebuild_variables"`) and
against sparse matmuls (`"sparse_matmul"`) are in
`benchmarks/storage_and_inference.py`.

An ensemble built with `batched=True` whose members allow it (see
`keras_freetickets.ensemble.BatchedPlan`) is exported as one batched program
instead: its stacked kernels are rebuilt from the same compact constants
and folded the same way (only when each stacked kernel is below the 8 MiB
slice size; otherwise, and for `compact=False`, members run one by one).

Members are Sequential or Functional Keras models, walked layer by layer; a
supported layer runs from its compact kernel, every other layer (pooling,
normalization at inference, dropout, reshapes, activations...) runs as
itself. A subclassed member, or a layer that holds a sparse kernel in a form
that is not supported (for example `DepthwiseConv2D`), is exported with its
Keras call and dense weights, and a warning names it.

Bad input is caught in the graph, before any member runs: a tensor whose
rank or (known) dimensions differ from `[batch] + input_shape` fails with
`InvalidArgumentError: ... inputs must have shape [batch, 784], got [2, 783]`.
The dtype is part of the signature: a non-float32 tensor is refused before
the graph runs (a loaded signature function raises `InvalidArgumentError:
... input #0(zero-based) was expected to be a float tensor but is a double
tensor`; TF Serving answers with a similar "Expects arg[0] to be float"
error). Python floats and numpy arrays of any float dtype passed to a loaded
signature function are converted to float32 first.

Writes are atomic: the SavedModel is written to a temporary folder beside
`path` (a hidden, non-numeric name, which TF Serving's version scanner
ignores) and renamed to `path` once complete; a failure removes it and leaves
no partial version folder. An overwrite swaps the new folder with the old
one in one atomic step (`renameat2(RENAME_EXCHANGE)`; two renames where the
file system cannot), and the next export to the same path removes what a
killed export left behind. TF Serving loads `<base>/<model_name>/<version>/`
with an integer version; another final path component gets a warning.
"""

import os
import re
import shutil
import tempfile
import uuid
import warnings

import keras
import tensorflow as tf

from keras_freetickets._export_graph import _ConstantWeights
from keras_freetickets._export_graph import _MemberRunner
from keras_freetickets._export_graph import _batched_plan
from keras_freetickets._export_graph import _check_inputs
from keras_freetickets._export_graph import _summaries
from keras_freetickets._export_graph import _warn_dense_fallbacks
from keras_freetickets._member_file import _fsync_dir
from keras_freetickets._validation import check_bool
from keras_freetickets._validation import check_one_of

INPUT_NAME = "inputs"
"""The name of the serving signatures' single input."""

SERVING_SIGNATURE = "serving_default"
MEMBERS_SIGNATURE = "members"
MEMBERS_OUTPUT = "member_probabilities"
OUTPUT_NAMES = ("probabilities", "classes", "confidence", "entropy", "mutual_information")
"""The outputs of the `serving_default` signature, in order."""

KERNEL_MODES = ("rebuild", "rebuild_variables", "sparse_matmul")
"""The values of `export_ensemble`'s `kernel_mode`, the default first."""
# SavedModel protos are limited to 2 GiB; stay well below with the constants.
_MAX_CONSTANT_BYTES = 1 << 30
_VERSION = re.compile(r"^\d+$")


def export_ensemble(ensemble, path, overwrite=False, compact=True, verbose=False,
                    kernel_mode="rebuild"):
    """Writes an ensemble as a self-contained SavedModel for TF Serving.

    The SavedModel has a `serving_default` signature (input `inputs`, float32,
    any batch size; outputs `probabilities`, `classes`, `confidence`,
    `entropy`, `mutual_information`) and a `members` signature (output
    `member_probabilities`, `[batch, M, C]`); see the module docstring for
    their exact meaning. It loads with `tf.saved_model.load` in a process that
    has neither Keras nor keras_freetickets, and serves with TF Serving when
    `path` is `<base>/<model_name>/<version>`. With `compact=True` sparse
    `Dense`/`Conv` kernels are stored as a bitmap of nonzeros plus their
    values (folded back into dense kernels when the graph is first run), so
    the export costs about `(1 - S) + 1/32` of a dense one; `compact=False`
    exports the members' own Keras calls with dense variables. The write is
    atomic (temporary folder beside `path`, then a rename).

    Args:
        ensemble: A `FreeTicketsEnsemble`.
        path: str or path-like. The SavedModel folder to create, by
            convention `<base>/<model_name>/<version>` with an integer
            version (another name gets a warning). Parent folders are created.
        overwrite: bool. Whether an existing `path` may be replaced. The old
            folder is moved aside, the new one renamed into place, then the
            old one deleted; if the rename fails the old folder is restored.
        compact: bool. Whether sparse kernels are stored compact (default) or
            dense.
        verbose: bool. Whether to print the endpoints written (as
            `keras.export.ExportArchive.write_out` does).
        kernel_mode: str, one of `KERNEL_MODES`. How the compact kernels
            run in the graph (ignored with `compact=False`). `"rebuild"`
            (default): stored as constants, rebuilt into dense kernels that
            TensorFlow folds once at load, so serving runs dense kernels at
            dense speed; choose it unless you have measured otherwise.
            `"rebuild_variables"`: stored as variables and rebuilt on every
            call; for ensembles whose compact kernels are too large to embed
            as graph constants (over 1 GiB), at a per-call cost.
            `"sparse_matmul"`: `Dense` kernels run as
            `tf.sparse.sparse_dense_matmul` on the stored nonzeros (Conv
            kernels as in `"rebuild"`). On the FMNIST layers it beat dense
            only at batch 1 on the large `Dense` layers at S = 0.9
            (`benchmarks/sparse_kernels.py`), and a whole M = 3 export
            served no faster than `"rebuild"` there and slower elsewhere
            (`benchmarks/serving_latency.py --kernel_modes=sparse_matmul`),
            so it is worth measuring only for much sparser or larger layers.

    Returns:
        The absolute path written, as a string.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.

    Example:

    ```python
    ensemble.export("serving/fashion/1")
    loaded = tf.saved_model.load("serving/fashion/1")
    outputs = loaded.signatures["serving_default"](inputs=tf.zeros([2, 784]))
    outputs["probabilities"], outputs["entropy"]
    ```
    """
    # Checked by what the export reads (export does not import `ensemble`,
    # which imports it): a Keras model with the ensemble's accessors.
    if not (
        isinstance(ensemble, keras.Model)
        and hasattr(type(ensemble), "member_input_shape")
        and callable(getattr(ensemble, "batched_plan", None))
    ):
        raise ValueError(
            "Argument `ensemble` must be a `FreeTicketsEnsemble`. Received: "
            f"ensemble={ensemble!r} of type {type(ensemble).__name__}"
        )
    check_bool("overwrite", overwrite)
    check_bool("compact", compact)
    check_bool("verbose", verbose)
    check_one_of("kernel_mode", kernel_mode, KERNEL_MODES)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(
            f"Argument `path` must be a non-empty path. Received: path={path!r}"
        )
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(
            "Argument `path` must be a folder for the SavedModel, but a file "
            f"is there (it is never replaced, even with overwrite=True). "
            f"Received: path={path!r}"
        )
    parent = os.path.dirname(path)
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(
            f"Argument `path` must be inside a folder, but {parent} is a "
            f"file. Received: path={path!r}"
        )
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass `overwrite=True` to replace it, or "
            "export to a new version folder."
        )
    version = os.path.basename(path)
    if not _VERSION.match(version):
        warnings.warn(
            f"The export folder name '{version}' is not an integer version: "
            "TF Serving only loads <base>/<model_name>/<version>/ folders with "
            "integer versions (for example 'serving/fashion/1'). "
            "`tf.saved_model.load` and `saved_model_cli` work either way.",
            stacklevel=2,
        )

    archive = _build_archive(ensemble, compact, kernel_mode)
    _write_atomically(archive, path, overwrite, verbose)
    return path


def saved_model_bytes(path):
    """Total size in bytes of the files under a SavedModel folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No SavedModel folder at {path}")
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


# ---------------------------------------------------------------------------
# The graph.


def _build_archive(ensemble, compact, kernel_mode):
    input_shape = tuple(ensemble.member_input_shape[1:])
    member_output = ensemble.member_output
    runners = [
        _MemberRunner(member, index, compact, kernel_mode)
        for index, member in enumerate(ensemble.members)
    ]
    constant_bytes = sum(r.constant_bytes for r in runners)
    if kernel_mode != "rebuild_variables" and constant_bytes > _MAX_CONSTANT_BYTES:
        raise ValueError(
            f"The compact kernels of this ensemble take {constant_bytes} bytes, "
            "too many to embed in a SavedModel graph (protos are limited to 2 "
            "GiB). Export with `compact=False`."
        )
    _warn_dense_fallbacks(runners)

    member_spec = tf.TensorSpec((None,) + input_shape, tf.float32, name=INPUT_NAME)
    plan = _batched_plan(ensemble, runners, compact, kernel_mode)
    weights = _ConstantWeights(plan, runners) if plan is not None else None

    def member_probabilities(inputs):
        if plan is not None:
            return plan.probabilities(inputs, member_output, weights, axis=1)
        outputs = []
        for runner in runners:
            y = tf.cast(runner(inputs), tf.float32)
            if member_output == "logits":
                y = tf.nn.softmax(y, axis=-1)
            outputs.append(y)
        return tf.stack(outputs, axis=1)

    # One traced function shared by both signatures: its constants are stored
    # once in the SavedModel's function library.
    shared = tf.function(
        member_probabilities, input_signature=[member_spec], autograph=False
    )

    def checked(inputs):
        return _check_inputs(inputs, input_shape, INPUT_NAME)

    def serving_default(inputs):
        stacked = shared(checked(inputs))
        return _summaries(stacked)

    def members(inputs):
        return {MEMBERS_OUTPUT: shared(checked(inputs))}

    # Loose spec: any rank and size, so that the in-graph check (not the
    # signature binding) reports wrong shapes, with a readable message.
    loose_spec = tf.TensorSpec(None, tf.float32, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.add_endpoint(SERVING_SIGNATURE, serving_default, input_signature=[loose_spec])
    archive.add_endpoint(MEMBERS_SIGNATURE, members, input_signature=[loose_spec])
    # Keep the compact variables (if any) alive with the archive.
    archive._kft_runners = runners
    return archive


# ---------------------------------------------------------------------------
# Atomic write.


def _write_atomically(archive, path, overwrite, verbose):
    """Writes `archive` to `path` through a temporary folder and a rename.

    A failure at any stage (a full disk, an I/O error) removes the
    temporary folder, leaves an existing export at `path` as it was, and
    raises an error of the same type whose message names the stage and
    `path`.
    """
    parent, name = os.path.split(path)
    tmp = None
    old = None
    stage = "creating the temporary folder"
    try:
        os.makedirs(parent, exist_ok=True)
        _recover_killed_export(parent, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        # mkdtemp makes the folder private (0700); a server running as
        # another user must be able to read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        stage = "writing the SavedModel"
        archive.write_out(tmp, verbose=verbose)
        stage = "flushing the SavedModel to disk"
        _fsync_tree(tmp)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(
                    f"{path} was created while exporting; pass `overwrite=True` "
                    "to replace it."
                )
            stage = "swapping the new export into place"
            if _exchange(tmp, path):
                # One atomic step: `path` is the new export, `tmp` the old.
                _fsync_dir(parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            stage = "moving the old export aside"
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
        stage = "renaming the new export into place"
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
                old = None
            raise
        tmp = None
        _fsync_dir(parent)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, FileExistsError) or not isinstance(
            e, (OSError, tf.errors.OpError)
        ):
            raise
        unchanged = (
            f"the existing export at {path} is unchanged"
            if os.path.lexists(path) else f"nothing was left at {path}"
        )
        message = (
            f"Could not export the ensemble to {path}: {stage} failed "
            f"({getattr(e, 'strerror', None) or getattr(e, 'message', None) or e}); "
            f"{unchanged}."
        )
        if isinstance(e, OSError):
            raise type(e)(e.errno, message) from e
        raise type(e)(e.node_def, e.op, message) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            warnings.warn(
                f"The export at {path} was replaced, but its old copy could "
                f"not be deleted: remove {old} by hand.",
                stacklevel=3,
            )


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a, b):
    """Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False where the system or the file system cannot (the caller
    then renames in two steps); raises OSError for any other failure.
    """
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                          ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                 _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _recover_killed_export(parent, name):
    """Cleans up after an export to `parent/name` that was killed: removes
    its temporary folders, and puts back the old export if the kill came
    between moving it aside and renaming the new one into place (the
    two-step fallback of `_exchange`). One export to a path at a time."""
    path = os.path.join(parent, name)
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-"):
            if not os.path.lexists(path):
                os.rename(full, path)
            else:
                shutil.rmtree(full, ignore_errors=True)
        elif entry.startswith(f".{name}.tmp-"):
            shutil.rmtree(full, ignore_errors=True)


def _fsync_tree(root):
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)
