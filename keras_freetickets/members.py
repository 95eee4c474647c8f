"""Compact member files: one sparse Keras model per file, written atomically.

A `.keras` file stores every weight dense and uncompressed, so an ensemble of
M members at sparsity S costs M times a dense model on disk. A member file
stores only what a sparse model needs: a bitmap of its nonzero entries and
their values, compressed, about `(1 - S) + 1/32` of the dense bytes at
float32.

The container is a zip archive (deflate) with these entries:

- `kftm.json`: `{"format": "keras_freetickets.member", "format_version": 1,
  "keras_version": ..., "weights": [...]}`. `weights` lists every weight of
  `model.weights`, in order, as `{"path", "shape", "dtype", "encoding",
  "nonzeros", "prunable"}`.
- `config.json`: `keras.saving.serialize_keras_object(model)` (its compile
  config removed), so Sequential, Functional and registered subclassed models
  are rebuilt by `keras.saving.deserialize_keras_object`.
- `metadata.json`: the caller's JSON-able dictionary (seed, member index,
  phase, metrics...).
- `weights/<i>.values` and, for `"bitmap"` weights, `weights/<i>.bitmap`: the
  raw little-endian bytes of weight `i`. A `"dense"` weight stores all of its
  entries; a `"bitmap"` weight stores `np.packbits` of its nonzero positions
  (C order) and the nonzero values only. The bitmap encoding is chosen
  whenever it is smaller before compression (`nonzeros * itemsize + size / 8 <
  size * itemsize`, that is a density below `1 - 1 / (8 * itemsize)`; biases
  initialized at zero are tiny bitmaps). Zero means all bits zero, so `-0.0`
  and NaN are kept as values and every weight comes back bit for bit.

Weights are restored by position in `model.weights` (as Keras' own weight
files are), because variable paths depend on the name scope a model was built
in: the same Sequential model reads `sequential/dense/kernel` when built from
its constructor and `dense/kernel` when built from its config. Shapes and
dtypes are checked on load. Layer assets (lookup tables) are not stored.

A file is written to a temporary file in the destination folder, flushed to
disk and moved into place with `os.replace`, so a crash never leaves a
partial file at the destination; the temporary file of a killed write is
removed by the next write of the same member. Entries carry a fixed
timestamp, so the same model and metadata give the same bytes. Members of an ensemble are named
`member_<index>.kftm` (`member_path`, `list_members`).
"""

import json
import os
import time
import zipfile

import keras
import numpy as np

from keras_freetickets import _codec
from keras_freetickets import prunable
from keras_freetickets._validation import check_int
from keras_freetickets._validation import check_number
from keras_freetickets._mask_overlap import mask_overlap
from keras_freetickets._mask_overlap import pairwise_mask_overlap
from keras_freetickets._member_file import _CONFIG
from keras_freetickets._member_file import _MANIFEST
from keras_freetickets._member_file import _MEMBER_NAME
from keras_freetickets._member_file import _METADATA
from keras_freetickets._member_file import FORMAT_NAME
from keras_freetickets._member_file import FORMAT_VERSION
from keras_freetickets._member_file import MEMBER_EXTENSION
from keras_freetickets._member_file import _fsync_dir
from keras_freetickets._member_file import _json_default
from keras_freetickets._member_file import _open_member
from keras_freetickets._member_file import temporary_name
from keras_freetickets._member_file import _read_json
from keras_freetickets._member_file import _read_manifest
from keras_freetickets._member_file import _read_weights
from keras_freetickets._member_file import _remove_stale_temporaries
from keras_freetickets._member_file import _write_entry
from keras_freetickets._member_file import read_member_weights

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MEMBER_EXTENSION", "save_member",
    "load_member", "read_member_metadata", "read_member_weights",
    "member_path", "list_members", "mask_overlap", "pairwise_mask_overlap",
    "wait_for_members",
]


def save_member(model, path, metadata=None, overwrite=False):
    """Saves a (sparse) Keras model as one compact member file.

    The file holds the model's config, every weight of `model.weights` (as a
    bitmap of nonzeros plus the nonzero values when that is smaller, else
    dense) and `metadata`, in a deflate-compressed zip archive (see the module
    docstring). The write is atomic: a temporary file in the same folder is
    moved into place only once complete, and removed if anything fails.
    Missing parent folders are created.

    Args:
        model: A built `keras.Model` whose config serializes (Sequential,
            Functional, or a registered subclassed model with `get_config`).
        path: str or path-like. Destination file, by convention
            `member_path(member_dir, index)`.
        metadata: Optional JSON-able dict stored with the member (numpy
            scalars and arrays are converted).
        overwrite: bool. Whether an existing file at `path` may be replaced.

    Returns:
        The path written, as a string.

    Example:

    ```python
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(3)])
    save_member(model, "members/member_0.kftm", metadata={"seed": 0})
    restored = load_member("members/member_0.kftm")
    ```
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Argument `model` must be a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' must be built before it can be saved: call "
            "it on data or call `model.build(input_shape)` first."
        )
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(
            "Argument `metadata` must be a dict. "
            f"Received: metadata={metadata!r} of type {type(metadata).__name__}"
        )
    try:
        metadata_json = json.dumps(metadata, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Argument `metadata` must be JSON-serializable. Received: "
            f"metadata={metadata!r} ({e})"
        ) from e
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            "Argument `path` must be a file path, but a folder is there. "
            f"Received: path={path!r}"
        )
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"A file already exists at {path}; pass `overwrite=True` to replace it."
        )

    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    config_json = json.dumps(config)

    entries = []
    manifest_weights = []
    for index, variable in enumerate(model.weights):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        record, blobs = _codec.encode_weight(index, value)
        record["path"] = variable.path
        record["prunable"] = bool(prunable.is_prunable(variable))
        manifest_weights.append(record)
        entries.extend(blobs)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_version": keras.__version__,
        "weights": manifest_weights,
    }

    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(
        folder, temporary_name(os.path.basename(path))
    )
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder, os.path.basename(path))
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                _write_entry(zf, _MANIFEST, json.dumps(manifest))
                _write_entry(zf, _CONFIG, config_json)
                _write_entry(zf, _METADATA, metadata_json)
                for name, data in entries:
                    _write_entry(zf, name, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(folder)
    except BaseException as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(e, OSError):
            raise OSError(
                e.errno,
                f"Could not write member file {path} ({e.strerror or e}); "
                "nothing was written there"
                + (" and the existing file is unchanged"
                   if os.path.exists(path) else ""),
            ) from e
        raise
    return path


def load_member(path, custom_objects=None, compile=False, safe_mode=True):
    """Loads a Keras model from a member file written by `save_member`.

    The model is rebuilt from its config and every weight is restored bit for
    bit, zeros included (weights are matched by position, see the module
    docstring).

    Args:
        path: str or path-like. A member file.
        custom_objects: Optional dict of custom classes or functions needed
            to deserialize the model (registered classes need none).
        compile: bool. Members are stored without their compile config, so
            this only exists for symmetry with `keras.models.load_model`; it
            must be False.
        safe_mode: bool. Passed to `keras.saving.deserialize_keras_object`
            (False allows `Lambda` layers' code to be loaded).

    Returns:
        A built `keras.Model`.

    Example:

    ```python
    model = load_member("members/member_0.kftm")
    probs = keras.ops.softmax(model.predict(x))
    ```
    """
    if compile:
        raise ValueError(
            "Member files store no compile config; load with `compile=False` "
            "and call `model.compile(...)`. Received: compile=True"
        )
    path = os.fspath(path)
    with _open_member(path) as zf:
        manifest = _read_manifest(zf, path)
        config = _read_json(zf, _CONFIG, path)
        arrays = _read_weights(zf, manifest, path)
    try:
        model = keras.saving.deserialize_keras_object(
            config, custom_objects=custom_objects, safe_mode=safe_mode
        )
    except Exception as e:
        raise ValueError(
            f"Could not rebuild the model stored in member file {path}: {e}. "
            "Pass its custom classes with `custom_objects` or register them "
            "with `keras.saving.register_keras_serializable`."
        ) from e
    if not model.built:
        raise ValueError(
            f"The model stored in member file {path} could not be built from "
            "its config (it has no build config)."
        )
    variables = model.weights
    if len(variables) != len(arrays):
        raise ValueError(
            f"Member file {path} stores {len(arrays)} weights, but the model "
            f"rebuilt from its config has {len(variables)}."
        )
    for variable, (record, array) in zip(variables, arrays):
        if tuple(variable.shape) != array.shape:
            raise ValueError(
                f"Member file {path}: weight '{record['path']}' has shape "
                f"{array.shape}, but the rebuilt model's weight "
                f"'{variable.path}' has shape {tuple(variable.shape)}."
            )
        variable.assign(array)
    return model


def read_member_metadata(path):
    """Returns the metadata dict stored in a member file (without loading it)."""
    path = os.fspath(path)
    with _open_member(path) as zf:
        _read_manifest(zf, path)
        return _read_json(zf, _METADATA, path)


def member_path(member_dir, index):
    """Returns the path of member `index` in `member_dir`: `member_<index>.kftm`."""
    check_int("index", index, 0)
    return os.path.join(os.fspath(member_dir), f"member_{int(index)}{MEMBER_EXTENSION}")


def list_members(member_dir, allow_gaps=False):
    """Lists the member files of `member_dir`, sorted by member index.

    Only files named `member_<index>.kftm` are listed (temporary files of
    writes in progress are not). Members must be numbered 0..M-1 without a
    gap unless `allow_gaps`: a missing member (for example one that another
    process is still training or writing) is an error naming it, never an
    ensemble that silently lacks it.

    Args:
        member_dir: str or path-like. A folder of member files.
        allow_gaps: bool. Whether indices may skip numbers.

    Returns:
        A list of paths (strings), member 0 first.

    Raises:
        FileNotFoundError: `member_dir` does not exist or is not a folder.
        PermissionError: `member_dir` cannot be read.
        ValueError: `member_dir` holds no member file, or a member below the
            highest index is missing ("waiting for member i").

    Example:

    ```python
    paths = list_members("members")  # ['members/member_0.kftm', ...]
    ```
    """
    member_dir = os.fspath(member_dir)
    if not os.path.isdir(member_dir):
        raise FileNotFoundError(
            f"Member directory not found: {member_dir}"
            + (" (a file is there, not a folder)"
               if os.path.exists(member_dir) else "")
        )
    try:
        names = os.listdir(member_dir)
    except OSError as e:
        raise type(e)(
            e.errno, f"Member directory {member_dir} cannot be read "
            f"({e.strerror or e})"
        ) from e
    found = []
    for name in names:
        match = _MEMBER_NAME.match(name)
        if match and os.path.isfile(os.path.join(member_dir, name)):
            found.append((int(match.group(1)), name))
    if not found:
        raise ValueError(
            f"No members found in {member_dir} (expected files named "
            f"member_<index>{MEMBER_EXTENSION})."
        )
    found.sort()
    missing = sorted(set(range(found[-1][0] + 1)) - {i for i, _ in found})
    if missing and not allow_gaps:
        writing = [i for i in missing if any(
            n.startswith(f".member_{i}{MEMBER_EXTENSION}.") and n.endswith(".tmp")
            for n in names
        )]
        state = (
            f"member {writing[0]} is being written now" if writing
            else f"member {missing[0]} has not been written (yet)"
        )
        raise ValueError(
            f"Member directory {member_dir} holds members "
            f"{[i for i, _ in found]} but not {missing}: waiting for member "
            f"{missing[0]} ({state}). Load once every member is there "
            "(`kft.distributed.wait_for_members`), or pass "
            "`allow_gaps=True` to list what is there."
        )
    return [os.path.join(member_dir, name) for _, name in found]


def wait_for_members(member_dir, num_members, timeout_s=3600.0, poll_s=5.0):
    """Waits until every member file of a DST ensemble is in `member_dir`.

    With `train_dst_ensemble(..., member_index=i)` running in separate
    processes (for example worker i of a cluster, see
    `member_index_from_cluster`), each process writes its member atomically
    when it finishes; the process that assembles the ensemble calls this
    first.

    Args:
        member_dir: str or path-like. Folder of `member_<i>.kftm` files.
        num_members: int >= 1. Members expected (indices 0..M-1).
        timeout_s: float >= 0. Seconds to wait at most.
        poll_s: float > 0. Seconds between checks.

    Returns:
        The member paths, in index order.

    Raises:
        TimeoutError: members are still missing after `timeout_s`; the
            message lists them.

    Example:

    ```python
    paths = kft.members.wait_for_members("members", 3, timeout_s=600)
    ensemble = kft.FreeTicketsEnsemble.from_directory("members")
    ```
    """
    check_int("num_members", num_members, 1)
    check_number("timeout_s", timeout_s, 0)
    check_number("poll_s", poll_s, 0, strict=True)
    deadline = time.monotonic() + float(timeout_s)
    while True:
        missing = (
            missing_members(member_dir, num_members)
            if os.path.isdir(member_dir) else list(range(num_members))
        )
        if not missing:
            return [member_path(member_dir, i)
                    for i in range(num_members)]
        left = deadline - time.monotonic()
        if left <= 0:
            names = [os.path.basename(member_path(member_dir, i))
                     for i in missing]
            raise TimeoutError(
                f"{len(missing)} of {num_members} ensemble members are still "
                f"missing from {os.fspath(member_dir)} after {timeout_s} s: "
                f"members {missing} (files {names}). Check that the "
                "processes training them are running, each with its own "
                "`member_index`."
            )
        time.sleep(min(float(poll_s), left))


def missing_members(member_dir, num_members):
    """Indices of members whose files are not (yet) in `member_dir`."""
    return [
        i for i in range(num_members)
        if not os.path.exists(member_path(member_dir, i))
    ]

