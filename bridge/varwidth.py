"""Variable-width columns as one values buffer plus int64 offsets, never one Python object per row.

A batch's ``bytes``, ``str`` and ragged ``ndarray:<dtype>`` columns are gathered straight into the
batch's packed buffer (see :mod:`sparkbridge.bridge.batch`): per column, ``n + 1`` offsets and the
values end to end. So they cross process boundaries (DataLoader workers, transform workers) as
part of one shared-memory buffer, whatever the number of rows, and a consumer that wants a dense
tensor (:func:`sparkbridge.bridge.sequences.pad_sequences`, the packer, a JPEG batch decoder)
reads the values in one piece. Two faces:

* :class:`VarColumn` (``bytes`` / ``str``): a read-only sequence whose items are ``bytes`` /
  ``str`` (made when asked for), with ``values`` (uint8) and ``offsets`` (int64). A transform
  receives this; the training loop receives a plain ``list`` (``VarColumn.tolist()``), as before.
* :class:`Ragged` (1-d ``ndarray:<dtype>`` rows of any length, e.g. token ids): a sequence of
  tensors (views of ``values``), with ``values`` (a 1-d tensor of every element) and ``offsets``
  (int64 tensor, ``n + 1``), as ``torch.nested``'s jagged layout and flash-attention's
  ``cu_seqlens`` use them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Iterator, Optional

import numpy as np

from sparkbridge.format.mds import ShardFormatError, _NDARRAY_CODE_TO_DTYPE, _SHAPE_DTYPES

__all__ = ["VarKind", "VarColumn", "Ragged", "ragged_dtype", "copy_ranges", "ndarray_rows"]

# per-row copies in a Python loop beat one fancy-indexed gather (whose index array is 8 bytes per
# byte moved) once values are this long on average: 256 JPEGs of 3 KB, 2.7 ms -> 0.3 ms
_LOOP_MIN_MEAN_BYTES = 256


class VarKind(str, enum.Enum):
    """How a variable-width column travels in a packed batch."""

    BYTES = "bytes"
    STR = "str"
    RAGGED = "ragged"  # 1-d ndarray rows of one dtype: elements end to end


def ragged_dtype(encoding: str) -> Optional[np.dtype]:
    """The element dtype of an ``ndarray:<dtype>`` encoding without a fixed shape (the rows
    travel as values + offsets); None for any other encoding."""
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) != 2 or parts[1] not in _NDARRAY_CODE_TO_DTYPE.values():
        return None
    return np.dtype(parts[1]).newbyteorder("<")


def copy_ranges(dst: np.ndarray, dst_starts: np.ndarray, src: np.ndarray, src_starts: np.ndarray,
                sizes: np.ndarray) -> None:
    """``dst[dst_starts[i]:+sizes[i]] = src[src_starts[i]:+sizes[i]]`` for every i (uint8 arrays)."""
    m = len(sizes)
    total = int(sizes.sum())
    if m == 0 or total == 0:
        return
    if total >= _LOOP_MIN_MEAN_BYTES * m:
        for d, s, n in zip(dst_starts.tolist(), src_starts.tolist(), sizes.tolist()):
            dst[d:d + n] = src[s:s + n]
        return
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    dst[np.repeat(dst_starts, sizes) + within] = src[np.repeat(src_starts, sizes) + within]


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


def _bounds(offsets: np.ndarray) -> Iterator[tuple[int, int]]:
    o = offsets.tolist()
    return zip(o[:-1], o[1:])


class VarColumn(Sequence):
    """``n`` byte strings (or UTF-8 strings) as ``values`` (uint8) and ``offsets`` (int64, n + 1).

    Items (``bytes`` / ``str``) are made when indexed or iterated; ``values``/``offsets`` give the
    whole column without them. Pickles as its two arrays (protocol 5: out of band), so a batch
    handed to another process carries two buffers per column, not one object per row."""

    __slots__ = ("values", "offsets", "kind")

    def __init__(self, values: np.ndarray, offsets: np.ndarray, kind: VarKind | str = VarKind.BYTES) -> None:
        self.values = values
        self.offsets = offsets
        self.kind = VarKind(kind)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tolist()[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of a column of {n}")
        raw = self.values[int(self.offsets[i]):int(self.offsets[i + 1])].tobytes()
        return raw.decode("utf-8") if self.kind is VarKind.STR else raw

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> list:
        """The items as a list (one ``bytes``/``str`` per row), made from one copy of the values."""
        raw = self.values.tobytes()
        if self.kind is VarKind.STR:
            return [raw[a:b].decode("utf-8") for a, b in _bounds(self.offsets)]
        return [raw[a:b] for a, b in _bounds(self.offsets)]

    def lengths(self) -> np.ndarray:
        """Each row's size in bytes (int64)."""
        return np.diff(self.offsets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VarColumn):
            return (self.kind is other.kind and np.array_equal(self.offsets, other.offsets)
                    and np.array_equal(self.values, other.values))
        if isinstance(other, (list, tuple)):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # mutable buffers

    def __reduce__(self):
        return (VarColumn, (self.values, self.offsets, self.kind.value))

    def __repr__(self) -> str:
        return f"VarColumn({self.kind.value}, rows={len(self)}, bytes={int(self.offsets[-1]) if len(self.offsets) else 0})"


class Ragged(Sequence):
    """``n`` 1-d tensors of one dtype as ``values`` (every element, end to end) and ``offsets``
    (int64 tensor, ``n + 1``); item ``i`` is the view ``values[offsets[i]:offsets[i + 1]]``."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: Any, offsets: Any) -> None:
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of a column of {n}")
        return self.values[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __iter__(self) -> Iterator[Any]:
        values = self.values
        return (values[a:b] for a, b in _bounds(self.offsets.numpy() if hasattr(self.offsets, "numpy")
                                                else np.asarray(self.offsets)))

    def lengths(self):
        """Each row's number of elements (an int64 tensor)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def dtype(self):
        return self.values.dtype

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ragged):
            import torch

            return bool(torch.equal(self.offsets, other.offsets) and torch.equal(self.values, other.values))
        return NotImplemented

    __hash__ = None

    def __reduce__(self):
        return (_ragged_from_numpy, (self.values.numpy(), self.offsets.numpy()))

    def __repr__(self) -> str:
        return f"Ragged({self.values.dtype}, rows={len(self)}, elements={self.values.numel()})"


def _ragged_from_numpy(values: np.ndarray, offsets: np.ndarray) -> Ragged:
    import torch

    return Ragged(torch.from_numpy(values), torch.from_numpy(offsets))
