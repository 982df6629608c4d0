"""Token sequences as dense batches: padded to ``[B, L]`` with a mask, or packed with ``cu_seqlens``.

The loader hands a variable-length ``ndarray`` column (token ids written by Spark as
``array<int>``) over as a :class:`sparkbridge.bridge.varwidth.Ragged`: every token in one tensor
plus row offsets. A model wants one ``[B, L]`` tensor. Two shapes:

* :func:`pad_sequences` — one row per sequence, padded to ``L`` (the longest in the batch, or a
  fixed length), with ``attention_mask``. Lockstep under DDP: one output per loader batch.
* :class:`SequencePacker` — sequences concatenated into ``rows × length`` blocks with no padding
  except in an epoch's last block (``cu_seqlens`` / ``position_ids`` mark where each sequence
  starts, as flash-attention's variable-length kernels and HF's packed attention expect). A sequence
  that does not fit the rest of a block continues in the next one. Its ``state_dict`` holds the
  source's state plus the tokens already read but not yet emitted, so a resumed run emits every
  token exactly once.

Both are vectorized: one copy of the batch's tokens and a few ``numpy`` calls, never a Python loop
over tokens. A :class:`sparkbridge.bridge.varwidth.Ragged` column (what the loader gives for
``ndarray:<int dtype>`` rows) is read as its values and offsets, with no loop over rows either; a
list of tensors still works. The loop over pieces of a block runs ``rows × length / mean length``
times.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from sparkbridge.errors import StateError, UsageError

__all__ = ["Overflow", "pad_sequences", "SequencePacker", "PACKER_STATE_FORMAT"]

PACKER_STATE_FORMAT = "sparkbridge.packer/1"


class Overflow(str, enum.Enum):
    """What :func:`pad_sequences` does with a sequence longer than ``length``."""

    ERROR = "error"  # refuse, naming the row: silently cutting tokens changes what the model learns
    TRUNCATE = "truncate"  # keep the first ``length`` tokens


def _as_arrays(seqs: Sequence[Any], what: str) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(seqs):
        a = s.numpy() if hasattr(s, "numpy") and not isinstance(s, np.ndarray) else np.asarray(s)
        if a.ndim != 1:
            raise UsageError(f"{what}: row {i} is a {a.ndim}-d array of shape {a.shape}; token sequences are 1-d")
        out.append(a)
    return out


def _common_dtype(arrays: Sequence[np.ndarray], what: str) -> np.dtype:
    if not arrays:
        return np.dtype(np.int64)
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        kinds = sorted({str(a.dtype) for a in arrays})
        raise UsageError(f"{what}: rows have different dtypes {kinds}; a column of token ids has one")
    if dtype.kind not in "iu":
        raise UsageError(f"{what}: token ids are integers, got dtype {dtype}")
    return dtype


def _flat(seqs: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's token sequences as (every token end to end, each row's length): straight from a
    :class:`sparkbridge.bridge.varwidth.Ragged` column (no per-row work), else row by row."""
    from sparkbridge.bridge.varwidth import Ragged

    if isinstance(seqs, Ragged):
        values = seqs.values.numpy() if hasattr(seqs.values, "numpy") else np.asarray(seqs.values)
        offsets = seqs.offsets.numpy() if hasattr(seqs.offsets, "numpy") else np.asarray(seqs.offsets)
        if values.ndim != 1:
            raise UsageError(f"{what}: the values are a {values.ndim}-d array; token sequences are 1-d")
        dtype = _common_dtype([values], what)
        lens = np.diff(offsets).astype(np.int64, copy=False)
        return values[int(offsets[0]):int(offsets[-1])].astype(dtype, copy=False), lens
    arrays = _as_arrays(seqs, what)
    dtype = _common_dtype(arrays, what)
    lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    return (np.concatenate(arrays) if arrays else np.empty(0, dtype)), lens


def _torch_ints(a: np.ndarray):
    import torch

    # torch has no uint32/uint64 arithmetic worth having for ids: widen to int64 (ids fit)
    if a.dtype.kind == "u" and a.dtype.itemsize >= 4:
        a = a.astype(np.int64)
    return torch.from_numpy(a)


def pad_sequences(seqs: Sequence[Any], *, length: Optional[int] = None, pad_value: int = 0,
                  overflow: Overflow | str = Overflow.ERROR) -> dict[str, Any]:
    """``{"input_ids": [B, L], "attention_mask": [B, L] bool, "lengths": [B] int64}`` (torch).

    ``length=None`` pads to the batch's longest sequence; a fixed ``length`` gives every batch one
    shape (no recompilation under ``torch.compile``)."""
    import torch

    overflow = Overflow(overflow)
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise UsageError(f"pad_sequences: length must be an int >= 1 or None, got {length!r}")
    tokens, lens = _flat(seqs, "pad_sequences")
    dtype = tokens.dtype
    width = int(lens.max(initial=0)) if length is None else length
    starts = np.cumsum(lens) - lens  # each row's first token in ``tokens``
    if length is not None and lens.size and int(lens.max()) > length:
        if overflow is Overflow.ERROR:
            row = int(np.argmax(lens > length))
            raise UsageError(f"pad_sequences: row {row} has {int(lens[row])} tokens, more than length={length} "
                             "(pass overflow='truncate' to keep the first tokens)")
        lens = np.minimum(lens, length)
    b = len(lens)
    flat = np.full(b * width, pad_value, dtype=dtype)
    total = int(lens.sum())
    if b and width and total:
        # token j of row i goes to slot i * width + j: one index per token, not per slot
        kept = np.cumsum(lens) - lens  # each row's first token among the kept ones
        within = np.arange(total, dtype=np.int64) - np.repeat(kept, lens)
        dest = np.repeat(np.arange(b, dtype=np.int64) * width, lens) + within
        flat[dest] = tokens if total == tokens.size else tokens[np.repeat(starts, lens) + within]
    mask = np.arange(width)[None, :] < lens[:, None]
    return {"input_ids": _torch_ints(flat.reshape(b, width)), "attention_mask": torch.from_numpy(mask),
            "lengths": torch.from_numpy(lens)}


@dataclass
class _Pending:
    """Tokens read from the source and not yet emitted, as one flat array plus row bounds.

    ``done[i]`` tokens of row ``i`` were emitted already (a row cut at a block's end)."""

    tokens: np.ndarray
    lengths: np.ndarray
    done: np.ndarray
    ids: Optional[np.ndarray]
    head: int = 0  # first row not fully emitted
    offset: int = 0  # its first token's index into ``tokens``

    def tokens_left(self) -> int:
        return int(self.tokens.size - self.offset)


class SequencePacker:
    """Packs a token column of a batch stream into ``[rows, length]`` blocks (see the module doc).

    ``source`` is any iterable of batches (dicts) — usually a
    :class:`sparkbridge.bridge.StreamingLoader`; when it has ``state_dict``/``load_state_dict``, so
    does the packer. One pass over the packer is one pass (epoch) over the source. Each block is a
    dict of torch tensors:

    * ``input_ids`` ``[rows, length]``, ``position_ids`` ``[rows, length]`` (each sequence counts
      from 0; a continued sequence from where it stopped);
    * ``cu_seqlens`` int32 ``[pieces + 1]``: piece boundaries in the flattened ``rows × length``
      tokens (a piece is one sequence, or the part of it in this block), ``max_seqlen`` an int;
    * ``attention_mask`` bool ``[rows, length]``: False only on the last block's padding;
    * ``rows_completed``: how many sequences end in this block; with ``id_column``, ``ids`` the
      source ids of the pieces (a continued row's id appears in both blocks).

    An empty sequence has no token to place and is skipped.

    Under DDP each rank packs its own rows, so ranks can emit different numbers of blocks: take the
    same number of steps on every rank (e.g. stop when any rank runs out) or use
    :func:`pad_sequences`, which keeps one output per loader batch.
    """

    def __init__(self, source: Iterable[Mapping[str, Any]], *, column: str, length: int, rows: int = 1,
                 pad_value: int = 0, id_column: Optional[str] = None) -> None:
        for name, value in (("length", length), ("rows", rows)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"SequencePacker: {name} must be an int >= 1, got {value!r}")
        if not isinstance(column, str) or not column:
            raise UsageError(f"SequencePacker: column must be a column name, got {column!r}")
        self.source, self.column, self.length, self.rows = source, column, length, rows
        self.pad_value, self.id_column = pad_value, id_column
        self._pending: Optional[_Pending] = None
        self._source_done = False  # the source's pass ended; only the pending tokens are left
        self._resumed = False

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self._resumed:
            self._pending, self._source_done = None, False
        self._resumed = False
        batches = None if self._source_done else iter(self.source)
        cap = self.rows * self.length
        while True:
            while batches is not None and (self._pending is None or self._pending.tokens_left() < cap):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = None
                    self._source_done = True
                    break
                self._add(batch)
            if self._pending is None or self._pending.tokens_left() == 0:
                break
            yield self._block(cap)
        self._pending, self._source_done = None, False

    def _add(self, batch: Mapping[str, Any]) -> None:
        if self.column not in batch:
            raise UsageError(f"SequencePacker: the batch has no column {self.column!r} (it has {sorted(batch)})")
        what = f"SequencePacker column {self.column!r}"
        new, lens = _flat(batch[self.column], what)
        keep = lens > 0  # an empty sequence has no token to place: it is skipped (documented)
        ids = None
        if self.id_column is not None:
            if self.id_column not in batch:
                raise UsageError(f"SequencePacker: the batch has no id column {self.id_column!r}")
            raw = batch[self.id_column]
            ids = np.asarray(raw.numpy() if hasattr(raw, "numpy") else raw)
            if ids.shape != (len(lens),):
                raise UsageError(f"SequencePacker: id column {self.id_column!r} has shape {ids.shape}, "
                                 f"expected ({len(lens)},)")
            ids = ids[keep]
        if not keep.all():
            lens = lens[keep]
        p = self._pending
        if p is not None and p.tokens.size and new.size and p.tokens.dtype != new.dtype:
            raise UsageError(f"{what}: rows have different dtypes {sorted({str(p.tokens.dtype), str(new.dtype)})}; "
                             "a column of token ids has one")
        if p is None or p.head >= p.lengths.size:
            self._pending = _Pending(new, lens, np.zeros(lens.size, np.int64), ids)
            return
        # keep only what is left of the pending rows, then append the new ones
        self._pending = _Pending(
            np.concatenate((p.tokens[p.offset:], new)),
            np.concatenate((p.lengths[p.head:], lens)),
            np.concatenate((p.done[p.head:], np.zeros(lens.size, np.int64))),
            None if ids is None or p.ids is None else np.concatenate((p.ids[p.head:], ids)),
        )

    def _block(self, cap: int) -> dict[str, Any]:
        import torch

        p = self._pending
        pieces, starts, piece_ids = [], [], []
        filled, completed = 0, 0
        while filled < cap and p.head < p.lengths.size:
            left = int(p.lengths[p.head] - p.done[p.head])
            take = min(left, cap - filled)
            pieces.append(take)
            starts.append(int(p.done[p.head]))
            if p.ids is not None:
                piece_ids.append(p.ids[p.head])
            filled += take
            p.offset += take
            if take == left:
                p.head += 1
                completed += 1
            else:
                p.done[p.head] += take
        tokens = p.tokens[p.offset - filled:p.offset]
        lens = np.asarray(pieces, np.int64)
        flat = np.full(cap, self.pad_value, dtype=p.tokens.dtype)
        flat[:filled] = tokens
        pos = np.zeros(cap, np.int64)
        if filled:
            first = np.concatenate(([0], np.cumsum(lens)[:-1]))
            pos[:filled] = np.arange(filled) - np.repeat(first - np.asarray(starts, np.int64), lens)
        cu = np.zeros(lens.size + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        out = {
            "input_ids": _torch_ints(flat.reshape(self.rows, self.length)),
            "position_ids": torch.from_numpy(pos.reshape(self.rows, self.length)),
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": int(lens.max(initial=0)),
            "attention_mask": torch.from_numpy((np.arange(cap) < filled).reshape(self.rows, self.length)),
            "rows_completed": completed,
        }
        if p.ids is not None:
            out["ids"] = torch.from_numpy(np.asarray(piece_ids, dtype=p.ids.dtype))
        return out

    # ------------------------------------------------------------------ resumption

    def state_dict(self) -> dict[str, Any]:
        """The source's state after the last batch read, plus the tokens read and not yet emitted
        (at most one source batch and one block of tokens): resuming emits each token once."""
        import torch

        if not hasattr(self.source, "state_dict"):
            raise UsageError("SequencePacker.state_dict: its source has no state_dict()")
        # the packer reads its source synchronously, so the source's own state is the one after
        # the last batch the packer took (its tokens are either emitted or in ``pending``)
        source_state = self.source.state_dict()
        p = self._pending
        pending = None
        if p is not None and p.head < p.lengths.size:
            pending = {
                "tokens": _torch_ints(p.tokens[p.offset:].copy()),
                "lengths": torch.from_numpy(p.lengths[p.head:].copy()),
                "done": torch.from_numpy(p.done[p.head:].copy()),
                "ids": None if p.ids is None else torch.from_numpy(np.asarray(p.ids[p.head:]).copy()),
            }
        return {"format": PACKER_STATE_FORMAT, "source": source_state, "source_done": self._source_done,
                "pending": pending, "column": self.column, "length": self.length, "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fmt = state.get("format") if isinstance(state, Mapping) else None
        if fmt != PACKER_STATE_FORMAT:
            raise StateError(f"not a SequencePacker state (format={fmt!r}, expected {PACKER_STATE_FORMAT!r})")
        for name in ("column", "length", "rows"):
            if state.get(name) != getattr(self, name):
                raise StateError(f"the packer state was saved with {name}={state.get(name)!r} but this packer has "
                                 f"{name}={getattr(self, name)!r}: the remaining blocks would differ")
        if not hasattr(self.source, "load_state_dict"):
            raise UsageError("SequencePacker.load_state_dict: its source has no load_state_dict()")
        self.source.load_state_dict(state["source"])
        pending = state.get("pending")
        if pending is None:
            self._pending = None
        else:
            lengths = np.asarray(pending["lengths"], np.int64)
            done = np.asarray(pending["done"], np.int64)
            tokens = np.asarray(pending["tokens"])
            if (lengths.shape != done.shape or tokens.size != int((lengths - done).sum())
                    or (done < 0).any() or (done >= lengths).any()):
                raise StateError("the packer state's pending tokens do not match its row lengths")
            ids = pending.get("ids")
            self._pending = _Pending(tokens, lengths, done, None if ids is None else np.asarray(ids))
        self._source_done = bool(state.get("source_done"))
        self._resumed = True
