"""The MDS shard format, in one place, for both sides of the bridge.

Byte layout of one shard (what Mosaic Streaming's ``MDSWriter`` writes and ``MDSReader`` reads)::

    uint32 num_samples
    uint32 offsets[num_samples + 1]     absolute byte offset of each sample, then the end
    bytes  config                       the writer config as JSON (readers ignore it)
    sample*                             each: uint32 size per variable-width column, in column
                                        order, then every column's bytes in column order

Only numpy is imported at module level, so ``bridge`` (torch side) and ``etl`` (Spark side) can both
use it. Everything here works on whole shards or whole batches at once: no per-row Python loop on
fixed-width columns, which is the point of the project.

Writers should put fixed-width columns first: a fixed column preceded only by fixed columns sits at
the same offset in every row, so readers gather it with one strided copy.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from sparkbridge.errors import ShardFormatError
from sparkbridge.format.codecs import hash_bytes

__all__ = [
    "INDEX_BASENAME",
    "SCALAR_DTYPES",
    "FixedColumn",
    "VarColumn",
    "ShardLayout",
    "ShardFormatError",
    "encoding_dtype",
    "encoding_size",
    "is_supported_encoding",
    "ndarray_encoding",
    "ndarray_rows",
    "ragged_dtype",
    "shard_config",
    "pack_rows",
    "encode_shard",
    "encode_shard_chunks",
    "sample_offsets",
    "column_starts",
    "gather_fixed",
    "gather_var",
    "decode_ndarray",
    "decode_var_value",
    "index_entry",
]

INDEX_BASENAME = "index.json"
_U32 = np.dtype("<u4")
_U32_MAX = (1 << 32) - 1

#: Fixed-width scalar encodings and their little-endian numpy dtype. ``int`` is Mosaic's int64.
SCALAR_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
        "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "int": "<i8",
        "float16": "<f2", "float32": "<f4", "float64": "<f8",
    }.items()
}

#: Variable-width encodings decoded by :func:`decode_var_value`. ``pkl`` is deliberately absent:
#: unpickling shard bytes would run arbitrary code.
VAR_ENCODINGS = frozenset({"str", "bytes", "json", "str_int", "str_float", "str_decimal"})

# Mosaic's NDArray value-dtype codes (byte 0 of a dynamic-dtype ndarray).
_NDARRAY_CODE_TO_DTYPE = {
    8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
    34: "float32", 64: "uint64", 65: "int64", 66: "float64",
}
_NDARRAY_DTYPE_TO_CODE = {v: k for k, v in _NDARRAY_CODE_TO_DTYPE.items()}
_SHAPE_DTYPES = {0: "<u1", 1: "<u2", 2: "<u4", 3: "<u8"}


# --------------------------------------------------------------------------- encodings


def _parse_ndarray(encoding: str) -> tuple[Optional[str], Optional[tuple[int, ...]]]:
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) > 3:
        raise ShardFormatError(f"not an ndarray encoding: {encoding!r}")
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    if dtype is not None and dtype not in _NDARRAY_DTYPE_TO_CODE:
        raise ShardFormatError(f"unsupported ndarray dtype {dtype!r} in encoding {encoding!r}")
    shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 else None
    return dtype, shape


def ndarray_encoding(dtype: Union[str, np.dtype], shape: Optional[Sequence[int]] = None) -> str:
    """Mosaic's encoding name for an ndarray column: fixed width when ``shape`` is given."""
    name = np.dtype(dtype).name
    if name not in _NDARRAY_DTYPE_TO_CODE:
        raise ShardFormatError(f"ndarray dtype {name!r} is not storable in MDS")
    if shape is None:
        return f"ndarray:{name}"
    if not shape or any(int(d) < 1 for d in shape):
        raise ShardFormatError(f"a fixed ndarray shape needs dimensions >= 1, got {tuple(shape)}")
    return f"ndarray:{name}:{','.join(str(int(d)) for d in shape)}"


def encoding_dtype(encoding: str) -> Optional[np.dtype]:
    """The numpy dtype of one value of a fixed-width encoding (a sub-array dtype for a fixed
    ndarray), or None for variable-width encodings."""
    if encoding in SCALAR_DTYPES:
        return SCALAR_DTYPES[encoding]
    if encoding.startswith("ndarray"):
        dtype, shape = _parse_ndarray(encoding)
        if dtype is not None and shape is not None:
            return np.dtype((np.dtype(dtype).newbyteorder("<"), shape))
    return None


def encoding_size(encoding: str) -> Optional[int]:
    """Bytes per value of a fixed-width encoding, None when variable (as in Mosaic's index)."""
    dtype = encoding_dtype(encoding)
    return None if dtype is None else int(dtype.itemsize)


def is_supported_encoding(encoding: str) -> bool:
    """Whether this module can decode the encoding without running untrusted code."""
    if encoding in SCALAR_DTYPES or encoding in VAR_ENCODINGS:
        return True
    if encoding.startswith("ndarray"):
        try:
            _parse_ndarray(encoding)
        except (ShardFormatError, ValueError):
            return False
        return True
    return False


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FixedColumn:
    """``values``: one row per sample, any fixed-width dtype (its bytes are copied as they are)."""

    values: np.ndarray

    @property
    def width(self) -> int:
        return int(self.values.dtype.itemsize * int(np.prod(self.values.shape[1:], dtype=np.int64)))

    def as_bytes(self) -> np.ndarray:
        arr = np.ascontiguousarray(self.values)
        return arr.view(np.uint8).reshape(len(arr), self.width)


@dataclass(frozen=True)
class VarColumn:
    """Variable-width values in Arrow's layout: sample ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray
    data: np.ndarray

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64, copy=False))


def pack_rows(columns: Sequence[Union[FixedColumn, VarColumn]]) -> tuple[np.ndarray, np.ndarray]:
    """Pack a batch of samples into MDS sample bytes, column by column.

    Returns ``(data, sizes)``: ``data`` is every sample's bytes back to back (uint8) and
    ``sizes[i]`` the byte length of sample ``i``. Cost: one vectorized scatter per column.
    """
    if not columns:
        raise ShardFormatError("a sample needs at least one column")
    n = len(columns[0].values) if isinstance(columns[0], FixedColumn) else len(columns[0].offsets) - 1
    var_lengths = []
    fixed_total = 0
    for col in columns:
        rows = len(col.values) if isinstance(col, FixedColumn) else len(col.offsets) - 1
        if rows != n:
            raise ShardFormatError(f"columns disagree on the number of samples: {rows} != {n}")
        if isinstance(col, VarColumn):
            lengths = col.lengths()
            if n and int(lengths.max(initial=0)) > _U32_MAX:
                raise ShardFormatError("a variable-width value is larger than 4 GiB")
            var_lengths.append(lengths)
        else:
            fixed_total += col.width
    head = 4 * len(var_lengths)
    sizes = np.full(n, head + fixed_total, dtype=np.int64)
    for lengths in var_lengths:
        sizes += lengths
    if not var_lengths:  # every row has the same size: one strided copy per column
        return _pack_fixed(columns, n, fixed_total), sizes
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    within = np.full(n, head, dtype=np.int64)  # position of the current column inside each row
    header = np.stack(var_lengths, axis=1).astype(_U32)  # (n, nvar)
    _scatter_fixed(out, starts, header.view(np.uint8).reshape(n, head))
    var_i = 0
    for col in columns:
        if isinstance(col, FixedColumn):
            _scatter_fixed(out, starts + within, col.as_bytes())
            within += col.width
        else:
            lengths = var_lengths[var_i]
            var_i += 1
            src = col.offsets.astype(np.int64, copy=False)
            total = int(src[-1] - src[0])
            if total:
                dest = np.repeat(starts + within - (src[:-1] - src[0]), lengths)
                dest += np.arange(total, dtype=np.int64)
                out[dest] = col.data[src[0]:src[-1]]
            within += lengths
    return out, sizes


def _pack_fixed(columns: Sequence[FixedColumn], n: int, width: int) -> np.ndarray:
    """Rows of fixed-width columns only: each column is copied into its slot of every row through
    a strided view typed as the column (whole-element copies, not byte-wise ones)."""
    out = np.empty(n * width, dtype=np.uint8)
    if n == 0:
        return out
    pos = 0
    for col in columns:
        values = col.values
        inner = values.shape[1:]  # a fixed ndarray column's value shape, C order inside the row
        strides = (width,) + tuple(values.itemsize * int(np.prod(inner[k + 1:], dtype=np.int64))
                                   for k in range(len(inner)))
        dest = np.ndarray(values.shape, dtype=values.dtype, buffer=out, offset=pos, strides=strides)
        dest[...] = values  # same dtype: the bytes are copied as they are
        pos += col.width
    return out


def _scatter_fixed(out: np.ndarray, dest_starts: np.ndarray, values: np.ndarray) -> None:
    w = values.shape[1]
    if w == 0 or len(dest_starts) == 0:
        return
    out[dest_starts[:, None] + np.arange(w, dtype=np.int64)] = values


def shard_config(
    *,
    column_names: Sequence[str],
    column_encodings: Sequence[str],
    compression: Optional[str],
    hashes: Sequence[str],
    size_limit: Optional[int],
) -> dict[str, Any]:
    """The writer config Mosaic's ``MDSWriter`` embeds in each shard and repeats in the index."""
    return {
        "column_encodings": list(column_encodings),
        "column_names": list(column_names),
        "column_sizes": [encoding_size(e) for e in column_encodings],
        "compression": compression,
        "format": "mds",
        "hashes": list(hashes),
        "size_limit": size_limit,
        "version": 2,
    }


def encode_shard(config: dict[str, Any], data: np.ndarray, sizes: np.ndarray) -> bytes:
    """Assemble one uncompressed shard from packed samples (see :func:`pack_rows`)."""
    config_bytes = json.dumps(config, sort_keys=True).encode("utf-8")
    n = len(sizes)
    header = 4 + 4 * (n + 1) + len(config_bytes)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = header
    np.cumsum(sizes, out=offsets[1:])
    offsets[1:] += header
    if offsets[-1] > _U32_MAX:
        raise ShardFormatError(f"a shard cannot exceed 4 GiB; this one would be {offsets[-1]} bytes")
    return b"".join(
        (np.uint32(n).tobytes(), offsets.astype(_U32).tobytes(), config_bytes, memoryview(data))
    )


def encode_shard_chunks(config: dict[str, Any], chunks: Sequence[np.ndarray], sizes: np.ndarray) -> bytes:
    """:func:`encode_shard` for packed samples that arrive in several chunks (one per batch): the
    shard is joined once, without concatenating the chunks first."""
    if sum(int(c.nbytes) for c in chunks) != int(np.sum(sizes, dtype=np.int64)):
        raise ShardFormatError("the chunks' total length does not match the sample sizes")
    header = encode_shard(config, np.empty(0, dtype=np.uint8), sizes)  # header + config only
    return b"".join([header, *(memoryview(c) for c in chunks)])


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardLayout:
    """Column order and encodings of a shard, as listed in its index entry."""

    column_names: tuple[str, ...]
    column_encodings: tuple[str, ...]
    column_sizes: tuple[Optional[int], ...]

    @classmethod
    def from_index_entry(cls, entry: dict[str, Any]) -> "ShardLayout":
        names = tuple(entry["column_names"])
        encodings = tuple(entry["column_encodings"])
        sizes = tuple(entry["column_sizes"])
        if not (len(names) == len(encodings) == len(sizes)):
            raise ShardFormatError("index entry lists different numbers of names/encodings/sizes")
        for name, enc, size in zip(names, encodings, sizes):
            if size is not None and type(size) is not int:  # 8.0 and True equal 8 and 1, and are not sizes
                raise ShardFormatError(f"column {name!r}: size {size!r} is not an int (or null)")
            if encoding_size(enc) != size:
                raise ShardFormatError(f"column {name!r}: encoding {enc!r} does not have size {size}")
        return cls(names, encodings, sizes)

    @property
    def var_columns(self) -> tuple[str, ...]:
        return tuple(n for n, s in zip(self.column_names, self.column_sizes) if s is None)

    def row_dtype(self) -> Optional[np.dtype]:
        """A packed structured dtype for one sample when every column is fixed-width, else None."""
        return _row_dtype(self.column_names, self.column_encodings, self.column_sizes)


@functools.lru_cache(maxsize=256)
def _row_dtype(names: tuple[str, ...], encodings: tuple[str, ...],
               sizes: tuple[Optional[int], ...]) -> Optional[np.dtype]:
    """Built once per layout: asked for every shard read (10,000 times in a 10,000-shard epoch)."""
    if any(s is None for s in sizes):
        return None
    return np.dtype({"names": list(names), "formats": [encoding_dtype(e) for e in encodings]}, align=False)


def sample_offsets(buf: Union[bytes, memoryview, np.ndarray], *, name: str = "shard") -> np.ndarray:
    """The ``num_samples + 1`` absolute sample offsets of a shard, checked against its length."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size < 8:
        raise ShardFormatError(f"{name}: {raw.size} bytes is too short to be an MDS shard")
    n = int(raw[:4].view(_U32)[0])
    end = 4 + 4 * (n + 1)
    if end > raw.size:
        raise ShardFormatError(f"{name}: header claims {n} samples but the file has {raw.size} bytes")
    offsets = raw[4:end].view(_U32).astype(np.int64)
    if offsets[0] < end or offsets[-1] != raw.size or np.any(np.diff(offsets) < 0):
        raise ShardFormatError(
            f"{name}: sample offsets are inconsistent (first {offsets[0]}, last {offsets[-1]}, "
            f"file size {raw.size}): the shard is truncated or corrupt"
        )
    return offsets


def column_starts(
    buf: Union[bytes, memoryview, np.ndarray],
    offsets: np.ndarray,
    layout: ShardLayout,
    rows: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute start and size of every column of the chosen samples: two ``(rows, columns)``
    int64 arrays. Fixed-width columns after variable-width ones need each row's size header."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    row_start = offsets[:-1] if rows is None else offsets[:-1][rows]
    n = len(row_start)
    nvar = len(layout.var_columns)
    sizes = np.empty((n, len(layout.column_names)), dtype=np.int64)
    if nvar:
        idx = row_start[:, None] + np.arange(4 * nvar, dtype=np.int64)
        header = raw[idx].view(_U32).reshape(n, nvar).astype(np.int64)
    v = 0
    for c, size in enumerate(layout.column_sizes):
        if size is None:
            sizes[:, c] = header[:, v]
            v += 1
        else:
            sizes[:, c] = size
    starts = np.empty_like(sizes)
    starts[:, 0] = row_start + 4 * nvar
    np.cumsum(sizes[:, :-1], axis=1, out=starts[:, 1:])
    starts[:, 1:] += starts[:, :1]
    return starts, sizes


def gather_fixed(buf: Union[bytes, memoryview, np.ndarray], starts: np.ndarray, encoding: str) -> np.ndarray:
    """Values of one fixed-width column, given each chosen sample's column start."""
    dtype = encoding_dtype(encoding)
    if dtype is None:
        raise ShardFormatError(f"{encoding!r} is not a fixed-width encoding")
    raw = np.frombuffer(buf, dtype=np.uint8)
    idx = starts[:, None] + np.arange(dtype.itemsize, dtype=np.int64)
    flat = raw[idx]  # (n, itemsize) copy
    return flat.view(dtype.base).reshape((len(starts),) + dtype.shape)


def gather_var(
    buf: Union[bytes, memoryview, np.ndarray], starts: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of one variable-width column in Arrow's layout: ``(offsets int64, data uint8)``."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return offsets, np.empty(0, dtype=np.uint8)
    src = np.repeat(starts - offsets[:-1], sizes) + np.arange(total, dtype=np.int64)
    return offsets, raw[src]


def decode_ndarray(encoding: str, data: Union[bytes, memoryview]) -> np.ndarray:
    """One value of an ``ndarray[:dtype[:shape]]`` column, exactly as Mosaic's NDArray decodes it
    (a zero-length dimension is accepted here, since our writer stores empty arrays)."""
    dtype, shape = _parse_ndarray(encoding)
    mv = memoryview(data)
    i = 0
    if dtype is None:
        code = mv[0]
        if code not in _NDARRAY_CODE_TO_DTYPE:
            raise ShardFormatError(f"unknown ndarray dtype code {code}")
        dtype = _NDARRAY_CODE_TO_DTYPE[code]
        i = 1
    if shape is None:
        byte = mv[i]
        ndim, width_code = byte >> 2, byte & 3
        shape_dtype = np.dtype(_SHAPE_DTYPES[width_code])
        shape = tuple(int(d) for d in np.frombuffer(mv[i + 1:i + 1 + ndim * shape_dtype.itemsize], shape_dtype))
        i += 1 + ndim * shape_dtype.itemsize
    values = np.frombuffer(mv[i:], dtype=np.dtype(dtype).newbyteorder("<"))
    if values.size != int(np.prod(shape, dtype=np.int64)):
        raise ShardFormatError(f"ndarray value has {values.size} elements, shape says {shape}")
    return values.reshape(shape)


def ragged_dtype(encoding: str) -> Optional[np.dtype]:
    """The element dtype of an ``ndarray:<dtype>`` encoding without a fixed shape (the rows
    travel as values + offsets); None for any other encoding."""
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) != 2 or parts[1] not in _NDARRAY_CODE_TO_DTYPE.values():
        return None
    return np.dtype(parts[1]).newbyteorder("<")


def ndarray_rows(raw: np.ndarray, starts: np.ndarray, sizes: np.ndarray, dtype: np.dtype,
                 shard: str, column: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Where the elements of ``ndarray:<dtype>`` values start and how many bytes they take (their
    shape header skipped), when every value is a 1-d array; None when some value is not (those
    batches keep one tensor per row). Checks each header against its value's size."""
    m = len(starts)
    if m == 0:
        return starts, sizes
    if int(sizes.min()) < 1:
        raise ShardFormatError(f"shard {shard!r}, column {column!r}: an ndarray value has no shape header")
    first = raw[starts]
    if not np.all((first >> 2) == 1):
        return None
    code = first & 3
    width = np.left_shift(1, code.astype(np.int64))  # 1, 2, 4 or 8 bytes per dimension
    head = 1 + width
    data = sizes - head
    if int(data.min()) < 0 or np.any(data % dtype.itemsize):
        raise ShardFormatError(f"shard {shard!r}, column {column!r} (ndarray:{dtype.name}): a value's size does "
                               "not match its shape header")
    c0 = int(code[0])
    if np.all(code == c0):  # the usual case: one shape width for the whole group
        idx = (starts + 1)[:, None] + np.arange(1 << c0, dtype=np.int64)
        length = raw[idx].view(np.dtype(_SHAPE_DTYPES[c0])).reshape(-1).astype(np.int64)
    else:
        length = np.empty(m, dtype=np.int64)
        for c in np.unique(code).tolist():
            sel = np.flatnonzero(code == c)
            idx = (starts[sel] + 1)[:, None] + np.arange(1 << c, dtype=np.int64)
            length[sel] = raw[idx].view(np.dtype(_SHAPE_DTYPES[c])).reshape(-1).astype(np.int64)
    if not np.array_equal(length * dtype.itemsize, data):
        raise ShardFormatError(f"shard {shard!r}, column {column!r} (ndarray:{dtype.name}): a value's size does "
                               "not match its shape header")
    return starts + head, data


def decode_var_value(encoding: str, data: Union[bytes, memoryview]) -> Any:
    """One value of a variable-width (or ndarray) column. Refuses ``pkl``."""
    if encoding == "bytes":
        return bytes(data)
    if encoding == "str":
        return bytes(data).decode("utf-8")
    if encoding == "json":
        return json.loads(bytes(data).decode("utf-8"))
    if encoding == "str_int":
        return int(bytes(data).decode("utf-8"))
    if encoding == "str_float":
        return float(bytes(data).decode("utf-8"))
    if encoding == "str_decimal":
        from decimal import Decimal

        return Decimal(bytes(data).decode("utf-8"))
    if encoding.startswith("ndarray"):
        return decode_ndarray(encoding, data)
    if encoding in SCALAR_DTYPES:
        return np.frombuffer(data, SCALAR_DTYPES[encoding])[0]
    raise ShardFormatError(
        f"column encoding {encoding!r} is not supported"
        + (" (pickle can run arbitrary code and is refused)" if encoding == "pkl" else "")
    )


def index_entry(
    config: dict[str, Any],
    *,
    samples: int,
    raw_basename: str,
    raw: Union[bytes, memoryview],
    zip_basename: Optional[str] = None,
    zipped: Optional[Union[bytes, memoryview]] = None,
) -> dict[str, Any]:
    """One shard's entry in ``index.json`` (Mosaic version 2). Basenames may contain ``/``: they
    are relative to the dataset root, which lets each task attempt write into its own folder."""
    hashes = config["hashes"]

    def info(basename: str, data: Union[bytes, memoryview]) -> dict[str, Any]:
        return {
            "basename": basename,
            "bytes": len(data),
            "hashes": {h: hash_bytes(h, data) for h in hashes},
        }

    entry = dict(config)
    entry["samples"] = int(samples)
    entry["raw_data"] = info(raw_basename, raw)
    entry["zip_data"] = info(zip_basename, zipped) if zip_basename is not None else None
    return entry
