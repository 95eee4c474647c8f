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
import re
import uuid
import zipfile

import keras
import numpy as np

from keras_freetickets import _codec
from keras_freetickets import prunable

FORMAT_NAME = "keras_freetickets.member"
FORMAT_VERSION = 1
MEMBER_EXTENSION = ".kftm"

_MANIFEST = "kftm.json"
_CONFIG = "config.json"
_METADATA = "metadata.json"
_MEMBER_NAME = re.compile(r"^member_(\d+)" + re.escape(MEMBER_EXTENSION) + r"$")


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
        folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
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


def _remove_stale_temporaries(folder, name):
    """Removes the temporary files that a killed write of `name` left (one
    writer per member file at a time, so none of them is in use)."""
    prefix = f".{name}."
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


# Entries carry a fixed timestamp, so that the same model and metadata give
# the same file, byte for byte (zip would otherwise store the write time).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _write_entry(zf, name, data):
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def read_member_weights(path, prunable_only=False):
    """Reads a member file's weights as numpy arrays, without building a model.

    Args:
        path: str or path-like. A member file.
        prunable_only: bool. If True, only the weights that were prunable in
            the saved model (see `keras_freetickets.prunable`).

    Returns:
        A dict from the saved variable paths to numpy arrays, in the order of
        the saved model's `model.weights`.
    """
    path = os.fspath(path)
    with _open_member(path) as zf:
        manifest = _read_manifest(zf, path)
        arrays = _read_weights(zf, manifest, path)
    result = {}
    for record, array in arrays:
        if prunable_only and not record.get("prunable", False):
            continue
        key = record["path"]
        if key in result:
            key = f"{key}#{len(result)}"
        result[key] = array
    return result


def member_path(member_dir, index):
    """Returns the path of member `index` in `member_dir`: `member_<index>.kftm`."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(
            f"Argument `index` must be an integer >= 0. Received: index={index!r}"
        )
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


def mask_overlap(a, b):
    """Overlap of the active (nonzero) prunable weights of two sparse models.

    With `A` and `B` the sets of positions of nonzero entries over all
    prunable kernels (taken in order, see `keras_freetickets.prunable`), the
    overlap is `|A & B| / |A|`: the fraction of `a`'s active weights that are
    also active in `b`. Members trained at the same exact per-layer counts
    have `|A| == |B|`, so the value is then symmetric. 1.0 means identical
    masks; two independent random masks at density d overlap by about d.

    Args:
        a: A `keras.Model`, a member file path, or a dict from variable paths
            to arrays (only rank >= 2 entries named `kernel`,
            `depthwise_kernel` or `pointwise_kernel` are used).
        b: The same kinds as `a`, with prunable kernels of the same shapes.

    Returns:
        A float in [0, 1].
    """
    kernels_a = _prunable_arrays(a, "a")
    kernels_b = _prunable_arrays(b, "b")
    if len(kernels_a) != len(kernels_b) or any(
        x.shape != y.shape for x, y in zip(kernels_a, kernels_b)
    ):
        raise ValueError(
            "Arguments `a` and `b` must have prunable kernels of the same "
            f"shapes. Received: a={[x.shape for x in kernels_a]}, "
            f"b={[y.shape for y in kernels_b]}"
        )
    active_a = 0
    both = 0
    for x, y in zip(kernels_a, kernels_b):
        nz_x = x != 0
        active_a += int(np.count_nonzero(nz_x))
        both += int(np.count_nonzero(nz_x & (y != 0)))
    if active_a == 0:
        raise ValueError("Argument `a` has no active (nonzero) prunable weights.")
    return both / active_a


def pairwise_mask_overlap(members):
    """Matrix of `mask_overlap(members[i], members[j])` for all pairs.

    Args:
        members: A list of models, member file paths or weight dicts (see
            `mask_overlap`).

    Returns:
        A float64 numpy array of shape (M, M), ones on the diagonal.
    """
    members = list(members)
    count = len(members)
    result = np.ones((count, count))
    arrays = [_prunable_arrays(m, f"members[{i}]") for i, m in enumerate(members)]
    for i in range(count):
        for j in range(count):
            if i != j:
                result[i, j] = mask_overlap(_as_dict(arrays[i]), _as_dict(arrays[j]))
    return result


def _as_dict(arrays):
    return {f"w{i}/kernel": array for i, array in enumerate(arrays)}


def _prunable_arrays(obj, name):
    if isinstance(obj, keras.Model):
        return [
            np.asarray(keras.ops.convert_to_numpy(v))
            for v in prunable.prunable_variables(obj.weights)
        ]
    if isinstance(obj, (str, os.PathLike)):
        return list(read_member_weights(obj, prunable_only=True).values())
    if isinstance(obj, dict):
        arrays = []
        for key, value in obj.items():
            value = np.asarray(value)
            weight_name = str(key).split("/")[-1].split(":")[0].split("#")[0]
            if value.ndim >= 2 and weight_name in prunable._PRUNABLE_NAMES:
                arrays.append(value)
        return arrays
    raise ValueError(
        f"Argument `{name}` must be a keras.Model, a member file path or a "
        f"dict of weights. Received: {name}={obj!r} of type {type(obj).__name__}"
    )


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _open_member:
    """Opens a member file as a zip archive, with clear errors."""

    def __init__(self, path):
        self.path = path
        self.zf = None

    def __enter__(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Member file not found: {self.path}")
        try:
            self.zf = zipfile.ZipFile(self.path, "r")
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"{self.path} is not a valid member file (not a zip archive: {e})."
            ) from e
        return self.zf

    def __exit__(self, *exc):
        self.zf.close()
        return False


def _read_json(zf, name, path):
    try:
        return json.loads(zf.read(name).decode("utf-8"))
    except KeyError as e:
        raise ValueError(
            f"{path} is not a valid member file (entry '{name}' is missing)."
        ) from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"{path} is not a valid member file (entry '{name}' is corrupt: {e})."
        ) from e


def _read_manifest(zf, path):
    manifest = _read_json(zf, _MANIFEST, path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a keras_freetickets member file (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Member file {path} has format version {version!r}; this version "
            f"of keras_freetickets reads version {FORMAT_VERSION} only."
        )
    return manifest


def _read_weights(zf, manifest, path):
    arrays = []
    for index, record in enumerate(manifest.get("weights", [])):
        try:
            arrays.append((record, _codec.decode_weight(zf, index, record, path)))
        except Exception as e:
            raise ValueError(
                f"{path} is not a valid member file (weight {index} "
                f"'{record.get('path') if isinstance(record, dict) else record}' "
                f"is corrupt: {e})."
            ) from e
    return arrays
