"""The bitmap encoding of sparse arrays, shared by member files and exports.

A sparse array is stored as `np.packbits` of its nonzero positions (C order)
plus the nonzero values. "Nonzero" means any nonzero bit, so `-0.0` and NaN
count as values and an array comes back bit for bit. `keras_freetickets.members`
writes weights this way into member files; `keras_freetickets.export` embeds
kernels this way as graph constants.
"""

import numpy as np


def nonzero_positions(flat):
    """True where an entry has any nonzero bit (so -0.0 and NaN count)."""
    raw = flat.view(np.uint8).reshape(flat.size, flat.dtype.itemsize)
    return raw.any(axis=1)


def count_nonzeros(value):
    """The number of entries of `value` with any nonzero bit."""
    return int(np.count_nonzero(nonzero_positions(value.reshape(-1))))


def bitmap_is_smaller(value):
    """Whether the bitmap encoding of `value` is smaller than its dense bytes."""
    size = value.size
    nonzeros = count_nonzeros(value)
    return nonzeros * value.dtype.itemsize + (size + 7) // 8 < size * value.dtype.itemsize


def encode_weight(index, value):
    """The manifest record and the zip entries `(name, bytes)` of weight `index`."""
    value = np.ascontiguousarray(value)
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    flat = value.reshape(-1)
    nonzero = nonzero_positions(flat)
    count = int(np.count_nonzero(nonzero))
    itemsize = value.dtype.itemsize
    record = {
        "shape": list(value.shape),
        "dtype": value.dtype.name,
        "nonzeros": count,
    }
    bitmap_bytes = count * itemsize + (flat.size + 7) // 8
    if bitmap_bytes < flat.size * itemsize:
        record["encoding"] = "bitmap"
        blobs = [
            (f"weights/{index}.bitmap", np.packbits(nonzero).tobytes()),
            (f"weights/{index}.values", flat[nonzero].tobytes()),
        ]
    else:
        record["encoding"] = "dense"
        blobs = [(f"weights/{index}.values", flat.tobytes())]
    return record, blobs


def decode_weight(zf, index, record, path):
    """Weight `index` of an open member zip `zf`, as described by `record`."""
    dtype = dtype_from_name(record["dtype"])
    shape = tuple(int(d) for d in record["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(zf.read(f"weights/{index}.values"), dtype=dtype)
    encoding = record["encoding"]
    if encoding == "dense":
        if values.size != size:
            raise ValueError(f"size {values.size} != {size}")
        return values.reshape(shape).copy()
    if encoding == "bitmap":
        bits = np.frombuffer(zf.read(f"weights/{index}.bitmap"), dtype=np.uint8)
        nonzero = np.unpackbits(bits, count=size).astype(bool)
        if int(np.count_nonzero(nonzero)) != values.size:
            raise ValueError("bitmap and values disagree")
        flat = np.zeros(size, dtype=dtype)
        flat[nonzero] = values
        return flat.reshape(shape)
    raise ValueError(f"unknown encoding {encoding!r}")


def dtype_from_name(name):
    """A numpy dtype by name, including the ml_dtypes ones (bfloat16...)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
