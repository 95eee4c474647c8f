"""The member file container: its zip entries, written and read.

See `keras_freetickets.members` for the format; the weights' encoding is
`keras_freetickets._codec`.
"""

import json
import os
import re
import socket
import uuid
import zipfile

import numpy as np

from keras_freetickets import _codec

FORMAT_NAME = "keras_freetickets.member"
FORMAT_VERSION = 1
MEMBER_EXTENSION = ".kftm"

_MANIFEST = "kftm.json"
_CONFIG = "config.json"
_METADATA = "metadata.json"
_MEMBER_NAME = re.compile(r"^member_(\d+)" + re.escape(MEMBER_EXTENSION) + r"$")


def temporary_name(name):
    """The name a write of `name` goes to first: it names this host and
    process, so a cleanup can tell a dead writer's leftovers from a live
    writer's file (two workers may write the same member at once)."""
    host = socket.gethostname().replace(".", "_")
    return f".{name}.{host}.{os.getpid()}.{uuid.uuid4().hex}.tmp"


def _remove_stale_temporaries(folder, name):
    """Removes the temporary files that killed writes of `name` on this host
    left; a live process's file is left alone."""
    prefix = f".{name}."
    host = socket.gethostname().replace(".", "_")
    for entry in os.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        parts = entry[len(prefix):].split(".")
        if len(parts) == 4 and (parts[0] != host or _alive(parts[1])):
            continue
        try:
            os.remove(os.path.join(folder, entry))
        except OSError:
            pass


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


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
