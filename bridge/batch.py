"""Which columns a batch holds, how they are gathered from decoded shards, and how they become tensors.

A batch travels as one packed byte buffer: every fixed-width output column at a 64-byte aligned
offset, then each ``bytes`` / ``str`` / ragged ``ndarray:<dtype>`` column as ``n + 1`` int64
offsets and its values end to end (see :mod:`sparkbridge.bridge.varwidth`). One buffer means one
shared-memory slot between DataLoader processes, one pinned allocation and one host-to-device copy
per batch; the columns are zero-copy views of it. Only JSON, decimal and number-as-string columns
(and ndarray columns without a dtype, or with rows of more than one dimension) still travel as
Python lists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sparkbridge.bridge.varwidth import Ragged, VarColumn, VarKind, copy_ranges
from sparkbridge.format.manifest import Manifest
from sparkbridge.format.mds import (
    ShardFormatError,
    ShardLayout,
    column_starts,
    decode_ndarray,
    encoding_dtype,
    gather_fixed,
    gather_var,
    is_supported_encoding,
    ndarray_rows,
    ragged_dtype,
)

__all__ = ["BatchPlan", "PackedBatch", "Block", "VarOut", "FEATURES_KEY"]

logger = logging.getLogger(__name__)

FEATURES_KEY = "__features__"
_ALIGN = 64
_NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class Block:
    """Fixed-width outputs of one dtype and per-row shape, stored together in the packed buffer:
    ``(len(names), rows, *shape)`` (so one ``unbind`` makes every column's tensor), or the
    ``(rows, F)`` float32 feature matrix."""

    dtype: np.dtype
    shape: tuple[int, ...]
    names: tuple[str, ...]
    as_bool: bool = False
    features: bool = False

    @cached_property
    def row_bytes(self) -> int:  # one member, one row
        return int(self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def dims(self, n: int) -> tuple[int, ...]:
        return (n,) + self.shape if self.features else (len(self.names), n) + self.shape

    def nbytes(self, n: int) -> int:
        return len(self.names) * n * self.row_bytes


@dataclass(frozen=True)
class VarOut:
    name: str
    encoding: str

    @cached_property
    def kind(self) -> Optional[VarKind]:
        """How it travels in the packed buffer (None: as a Python list)."""
        if self.encoding == "bytes":
            return VarKind.BYTES
        if self.encoding == "str":
            return VarKind.STR
        return VarKind.RAGGED if ragged_dtype(self.encoding) is not None else None

    @cached_property
    def dtype(self) -> np.dtype:
        return ragged_dtype(self.encoding) if self.kind is VarKind.RAGGED else np.dtype(np.uint8)


@dataclass
class PackedBatch:
    """What a worker hands over: ``rows`` samples packed in ``buf`` (numpy uint8 or a torch uint8
    tensor, ``nbytes`` long): fixed-width outputs, then ``var`` columns (name -> byte position of
    their offsets, of their values, values' byte count); ``extras``: the columns that travel as
    Python values. From a DataLoader worker, ``buf`` may instead stay in a shared slot
    ``(worker, slot)`` that the receiving process copies out (see :mod:`bridge.loader`).
    ``ids``: the batch's sample ids (for error messages), when known."""

    rows: int
    buf: Any
    extras: dict[str, Any] = field(default_factory=dict)
    slot: Optional[tuple[int, int]] = None
    var: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    nbytes: int = -1
    ids: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.nbytes < 0 and self.buf is not None:
            self.nbytes = int(self.buf.nbytes) if hasattr(self.buf, "nbytes") else int(self.buf.numel())


def _dtype_for(encoding: str) -> tuple[np.dtype, tuple[int, ...]]:
    dt = encoding_dtype(encoding)
    if dt is None:
        raise ShardFormatError(f"{encoding!r} is not fixed-width")
    return dt.base, tuple(dt.shape)


class BatchPlan:
    """Built once per loader from the index layouts (and manifest.json when present)."""

    def __init__(
        self,
        layouts: Sequence[ShardLayout],
        *,
        shard_names: Sequence[str],
        manifest: Optional[Manifest] = None,
        columns: Optional[Sequence[str]] = None,
        features: Optional[Sequence[str]] = None,
        label: Optional[str] = None,
    ) -> None:
        first = layouts[0]
        encodings = dict(zip(first.column_names, first.column_encodings))
        for layout, name in zip(layouts, shard_names):
            if dict(zip(layout.column_names, layout.column_encodings)) != encodings:
                raise ShardFormatError(
                    f"shard {name!r} has columns {dict(zip(layout.column_names, layout.column_encodings))}, "
                    f"but the first shard has {encodings}: one dataset must keep one schema"
                )
        for name, enc in encodings.items():
            if not is_supported_encoding(enc):
                extra = " (pickle can run arbitrary code and is refused)" if enc == "pkl" else ""
                raise ShardFormatError(f"column {name!r} has encoding {enc!r}, which sparkbridge does not read{extra}")
        self.encodings = encodings
        order = list(first.column_names)
        bool_cols: set[str] = set()
        masks: dict[str, str] = {}
        if manifest is not None:
            listed: list[str] = []
            for c in manifest.columns:
                if c.name in encodings and c.name not in listed:
                    listed.append(c.name)
                    if c.logical == "bool":
                        bool_cols.add(c.name)
                if c.null_mask and c.null_mask in encodings and c.null_mask not in listed:
                    masks[c.name] = c.null_mask
                    bool_cols.add(c.null_mask)
                    listed.append(c.null_mask)
            order = listed + [n for n in order if n not in listed]
        else:
            for n in order:
                if n.endswith("__null") and n[: -len("__null")] in encodings and encodings[n] == "uint8":
                    masks[n[: -len("__null")]] = n
                    bool_cols.add(n)
        self.available = order
        self.features = list(features) if features is not None else None
        self.label = label
        if (features is None) != (label is None):
            raise ValueError("give both `features` and `label` to get (features, label) batches, or neither")
        if features is not None:
            if columns is not None:
                raise ValueError("give either `columns` or `features`/`label`, not both")
            if not features:
                raise ValueError("`features` must name at least one column")
            if len(set(features)) != len(features):
                raise ValueError(f"features are listed twice: {list(features)}")
            wanted = list(dict.fromkeys([*features, label]))
        else:
            wanted = list(order) if columns is None else list(columns)
        unknown = [c for c in wanted if c not in encodings]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the dataset has {order}")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"columns are listed twice: {wanted}")
        if features is None and columns is not None:
            # a selected column brings its null mask along
            with_masks = []
            for c in wanted:
                with_masks.append(c)
                m = masks.get(c)
                if m is not None and m not in wanted:
                    with_masks.append(m)
            wanted = with_masks
        self.columns = wanted
        self.var: list[VarOut] = []
        self.feature_parts: list[tuple[str, int]] = []  # (column, values per row)
        blocks: list[Block] = []
        if features is not None:
            width = 0
            for c in features:
                enc = encodings[c]
                dt = encoding_dtype(enc)
                if dt is None or dt.base.kind not in _NUMERIC_KINDS:
                    raise ValueError(
                        f"feature column {c!r} has encoding {enc!r}; features must be fixed-width numbers"
                    )
                k = int(np.prod(dt.shape, dtype=np.int64))
                self.feature_parts.append((c, k))
                width += k
            blocks.append(Block(np.dtype("<f4"), (width,), (FEATURES_KEY,), features=True))
            out_cols = [label]
        else:
            out_cols = wanted
        groups: dict[tuple, list[str]] = {}
        for c in out_cols:
            enc = encodings[c]
            if encoding_dtype(enc) is not None:
                dt, shape = _dtype_for(enc)
                groups.setdefault((dt.str, shape, c in bool_cols and dt.itemsize == 1), []).append(c)
            else:
                self.var.append(VarOut(c, enc))
        for (dts, shape, as_bool), names in groups.items():
            blocks.append(Block(np.dtype(dts), shape, tuple(names), as_bool=as_bool))
        self.blocks = blocks
        self._layout_cache: dict[int, tuple[list[int], int]] = {}
        self._copy_plans: dict[ShardLayout, tuple] = {}

    # ------------------------------------------------------------------ packing

    def layout(self, n: int) -> tuple[list[int], int]:
        """Byte offset of each block in a packed buffer of ``n`` rows, and the buffer size."""
        got = self._layout_cache.get(n)
        if got is None:
            offs = []
            pos = 0
            for blk in self.blocks:
                offs.append(pos)
                pos += -(-blk.nbytes(n) // _ALIGN) * _ALIGN
            got = (offs, max(pos, _ALIGN))
            if len(self._layout_cache) < 8:
                self._layout_cache[n] = got
        return got

    def slot_bytes(self, n: int, table: Any = None) -> int:
        """A shared slot for a batch of ``n`` rows: the fixed-width part, plus room for the
        buffered variable-width columns at 1.5x the largest shard's mean row size (``table``:
        the dataset's :class:`sparkbridge.bridge.shards.ShardTable`). A batch that does not fit
        travels through torch's shared memory instead, as a whole buffer."""
        fixed = self.layout(n)[1]
        buffered = [v for v in self.var if v.kind is not None]
        if not buffered or table is None or not len(table.samples):
            return fixed
        rows = np.maximum(table.samples, 1)
        mean_row = float((table.raw_bytes / rows).max())
        return fixed + len(buffered) * 2 * _aligned(8 * (n + 1)) + _aligned(int(1.5 * mean_row * n))

    def views(self, buf: np.ndarray, n: int) -> list[np.ndarray]:
        offs, _ = self.layout(n)
        return [buf[o:o + blk.nbytes(n)].view(blk.dtype).reshape(blk.dims(n)) for blk, o in zip(self.blocks, offs)]

    def _copy_plan(self, layout: ShardLayout) -> tuple:
        """For an all-fixed-width row layout: per block, runs of members that sit next to each
        other in the row (copied with one transposing copy each)."""
        plan = self._copy_plans.get(layout)
        if plan is not None:
            return plan
        where: dict[str, int] = {}
        pos = 0
        for name, size in zip(layout.column_names, layout.column_sizes):
            where[name] = pos
            pos += int(size)
        plan_blocks = []
        for blk in self.blocks:
            runs: list[list] = []
            if blk.features:
                k = 0
                for c, width in self.feature_parts:
                    src = encoding_dtype(self.encodings[c]).base
                    off = where[c]
                    last = runs[-1] if runs else None
                    if last is not None and last[3] == src and last[2] + last[1] * src.itemsize == off:
                        last[1] += width
                    else:
                        runs.append([k, width, off, src])
                    k += width
            else:
                rb = blk.row_bytes
                for i, c in enumerate(blk.names):
                    off = where[c]
                    last = runs[-1] if runs else None
                    if last is not None and last[2] + last[1] * rb == off:
                        last[1] += 1
                    else:
                        runs.append([i, 1, off])
            plan_blocks.append(tuple(tuple(r) for r in runs))
        plan = tuple(plan_blocks)
        self._copy_plans[layout] = plan
        return plan

    def _fill_rows(self, views: list[np.ndarray], g: np.ndarray, layout: ShardLayout, sel) -> None:
        """Scatter gathered whole rows ``g`` ((m, row bytes) uint8) into the block views."""
        m = len(g)
        for blk, dst, runs in zip(self.blocks, views, self._copy_plan(layout)):
            if blk.features:
                for k0, width, off, src in runs:
                    dst[sel, k0:k0 + width] = g[:, off:off + width * src.itemsize].view(src)
                continue
            rb = blk.row_bytes
            for r0, k, off in runs:
                src = g[:, off:off + k * rb].view(blk.dtype)
                if blk.shape:
                    src = src.reshape((m, k) + blk.shape)
                dst[r0:r0 + k, sel] = src.swapaxes(0, 1)

    def gather_rows(self, rows: np.ndarray, layout: ShardLayout, alloc: Callable[[int], np.ndarray]) -> PackedBatch:
        """A batch from whole packed rows already gathered (``rows``: ``void`` records of an
        all-fixed-width ``layout``, e.g. one ``take`` from the resident table)."""
        n = len(rows)
        _, total = self.layout(n)
        buf = alloc(total)
        self._fill_rows(self.views(buf, n), rows.view(np.uint8).reshape(n, -1), layout, slice(None))
        return PackedBatch(n, buf, {})

    def gather(
        self,
        groups: Sequence[tuple[Any, np.ndarray, Optional[np.ndarray]]],
        n: int,
        alloc: Callable[[int], np.ndarray],
    ) -> PackedBatch:
        """Gather ``n`` rows: ``groups`` holds (decoded shard, rows in it, their positions in the
        batch or None when one shard fills the whole batch in order)."""
        _, total = self.layout(n)
        first = groups[0][0]
        if first.rows is not None and all(sh.layout == first.layout for sh, _, _ in groups):
            # every row packed and alike: one gather of whole rows, one scatter into columns
            if len(groups) == 1:
                g = first.rows.take(groups[0][1])
            else:
                g = np.empty(n, dtype=first.rows.dtype)
                for shard, rows, pos in groups:
                    g[pos] = shard.rows.take(rows)
            buf = alloc(total)
            self._fill_rows(self.views(buf, n), g.view(np.uint8).reshape(n, -1), first.layout, slice(None))
            return PackedBatch(n, buf, {}, nbytes=total)
        # variable-width columns: each row's start and size first (the buffer's size depends on them)
        located = []
        for shard, rows, pos in groups:
            starts, sizes = column_starts(shard.buf, shard.offsets, shard.layout, rows)
            located.append((starts, sizes, {name: i for i, name in enumerate(shard.layout.column_names)}))
        buffered: dict[str, list] = {}  # column -> per group (value starts, sizes), in bytes
        for v in self.var:
            if v.kind is None:
                continue
            parts = []
            for (shard, rows, pos), (starts, sizes, index) in zip(groups, located):
                c = index[v.name]
                st, sz = starts[:, c], sizes[:, c]
                if v.kind is VarKind.RAGGED:
                    got = ndarray_rows(np.frombuffer(shard.buf, np.uint8), st, sz, v.dtype, shard.name, v.name)
                    if got is None:  # a row that is not 1-d: this batch keeps one tensor per row
                        parts = None
                        break
                    st, sz = got
                parts.append((st, sz))
            if parts is not None:
                buffered[v.name] = parts
        pos_var: dict[str, tuple[int, int, int]] = {}
        offset_arrays: dict[str, np.ndarray] = {}
        end = total
        for name, parts in buffered.items():
            if len(parts) == 1 and groups[0][2] is None:
                sizes = parts[0][1]
            else:
                sizes = np.empty(n, dtype=np.int64)
                for (_, _, pos), (_, sz) in zip(groups, parts):
                    sizes[slice(None) if pos is None else pos] = sz
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(sizes, out=offs[1:])
            offset_arrays[name] = offs
            at_offsets = end
            at_values = at_offsets + _aligned(8 * (n + 1))
            pos_var[name] = (at_offsets, at_values, int(offs[-1]))
            end = at_values + _aligned(int(offs[-1]))
        buf = alloc(end)
        views = self.views(buf, n)
        var_values: dict[str, list] = {v.name: [None] * n for v in self.var
                                       if v.name not in buffered} if len(groups) > 1 else {}
        for name, (at_offsets, at_values, nvalues) in pos_var.items():
            offs = offset_arrays[name]
            buf[at_offsets:at_offsets + 8 * (n + 1)].view(np.int64)[:] = offs
            dst = buf[at_values:at_values + nvalues]
            for (shard, rows, pos), (st, sz) in zip(groups, buffered[name]):
                where = offs[:-1] if pos is None else offs[:-1][pos]
                copy_ranges(dst, where, np.frombuffer(shard.buf, np.uint8), st, sz)
        for (shard, rows, pos), (starts, sizes, index) in zip(groups, located):
            sel = slice(None) if pos is None else pos
            if shard.rows is not None:
                g = shard.rows.take(rows)
                self._fill_rows(views, g.view(np.uint8).reshape(len(rows), -1), shard.layout, sel)
                continue

            def col(c: str) -> np.ndarray:
                return gather_fixed(shard.buf, starts[:, index[c]], self.encodings[c])

            for blk, dst in zip(self.blocks, views):
                if blk.features:
                    self._fill_features(dst, sel, col, len(rows))
                else:
                    for i, c in enumerate(blk.names):
                        dst[i, sel] = col(c)
            for v in self.var:
                if v.name in buffered:
                    continue
                c = index[v.name]
                values = _decode_var(v, *gather_var(shard.buf, starts[:, c], sizes[:, c]), shard.name)
                if pos is None:
                    var_values[v.name] = values
                else:
                    target = var_values[v.name]
                    for p, value in zip(pos.tolist(), values):
                        target[p] = value
        return PackedBatch(n, buf, var_values, var=pos_var, nbytes=end)

    def _fill_features(self, view: np.ndarray, sel, col: Callable[[str], np.ndarray], m: int) -> None:
        k = 0
        for c, width in self.feature_parts:
            values = col(c)
            if width == 1:
                view[sel, k] = values
            else:
                view[sel, k:k + width] = values.reshape(m, width)
            k += width

    # ------------------------------------------------------------------ tensors

    def to_tensors(self, batch: PackedBatch, buf_tensor=None, *, lists: bool = True) -> Any:
        """Zero-copy tensor views of a packed batch (``buf_tensor``: the buffer already as a
        tensor, possibly on a device), as a dict or as ``(features, label)``. Variable-width
        columns are views of the host buffer: ragged ndarray columns a :class:`Ragged`, ``bytes``
        / ``str`` columns a list (``lists``, what the training loop has always received) or a
        :class:`VarColumn` (what a transform receives: no object per row on the way to it)."""
        import torch

        n = batch.rows
        if buf_tensor is None:
            buf_tensor = batch.buf if isinstance(batch.buf, torch.Tensor) else torch.from_numpy(batch.buf)
        offs, _ = self.layout(n)
        out: dict[str, Any] = {}
        for blk, o in zip(self.blocks, offs):
            t = buf_tensor[o:o + blk.nbytes(n)].view(_TORCH_DTYPES[blk.dtype.str]).view(blk.dims(n))
            if blk.features:
                out[FEATURES_KEY] = t
                continue
            if blk.as_bool:
                t = t.view(torch.bool)
            out.update(zip(blk.names, t.unbind(0)))
        host = None
        for v in self.var:
            where = batch.var.get(v.name)
            if where is None:
                out[v.name] = _var_to_torch(v, batch.extras[v.name])
                continue
            if host is None:
                host = batch.buf.numpy() if isinstance(batch.buf, torch.Tensor) else batch.buf
            at_offsets, at_values, nvalues = where
            offsets = host[at_offsets:at_offsets + 8 * (n + 1)].view(np.int64)
            values = host[at_values:at_values + nvalues]
            if v.kind is VarKind.RAGGED:
                size = v.dtype.itemsize
                out[v.name] = Ragged(torch.from_numpy(values.view(v.dtype)),
                                     torch.from_numpy(offsets if size == 1 else offsets // size))
            else:
                col = VarColumn(values, offsets, v.kind)
                out[v.name] = col.tolist() if lists else col
        if self.features is not None:
            return out[FEATURES_KEY], out[self.label]
        return {c: out[c] for c in self.columns}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _decode_var(v: VarOut, offsets: np.ndarray, data: np.ndarray, shard: str) -> list:
    enc = v.encoding
    bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist())
    try:
        if enc.startswith("ndarray"):
            mv = memoryview(data)
            return [decode_ndarray(enc, mv[a:b]) for a, b in bounds]
        raw = data.tobytes()
        if enc == "bytes":
            return [raw[a:b] for a, b in bounds]
        if enc == "str":
            return [raw[a:b].decode("utf-8") for a, b in bounds]
        if enc == "json":
            return [json.loads(raw[a:b]) for a, b in bounds]
        if enc == "str_int":
            return [int(raw[a:b]) for a, b in bounds]
        if enc == "str_float":
            return [float(raw[a:b]) for a, b in bounds]
        if enc == "str_decimal":
            return [Decimal(raw[a:b].decode("utf-8")) for a, b in bounds]
    except (ValueError, UnicodeDecodeError, ShardFormatError, IndexError, InvalidOperation) as exc:
        raise ShardFormatError(f"shard {shard!r}, column {v.name!r} ({enc}): cannot decode a value ({exc})") from None
    raise ShardFormatError(f"column {v.name!r}: encoding {enc!r} is not supported")


def _var_to_torch(v: VarOut, values: list) -> Any:
    import torch

    enc = v.encoding
    if enc.startswith("ndarray"):
        return [torch.from_numpy(a) for a in values]
    if enc == "str_float":
        return torch.tensor(values, dtype=torch.float64)
    if enc == "str_int":
        try:
            return torch.tensor(values, dtype=torch.int64)
        except (OverflowError, RuntimeError):
            return values
    return values


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {
        "|u1": torch.uint8, "|i1": torch.int8, "<u2": torch.uint16, "<i2": torch.int16,
        "<u4": torch.uint32, "<i4": torch.int32, "<u8": torch.uint64, "<i8": torch.int64,
        "<f2": torch.float16, "<f4": torch.float32, "<f8": torch.float64,
    }


class _LazyDtypes(dict):
    def __missing__(self, key):
        if not self:
            self.update(_torch_dtypes())
            if key in self:
                return self[key]
        raise KeyError(f"no torch dtype for numpy dtype {key!r}")


_TORCH_DTYPES = _LazyDtypes()
