"""A checked shard, ready for gathers: its bytes, sample offsets and, when every column is
fixed-width, one opaque record per sample.

The byte-level checks (hash, bounded decompression, size, sample count, offsets) are
:func:`sparkbridge.format.check.check_shard`, shared with ``sparkbridge validate``; this adds what
only a gather needs: that every row of an all-fixed-width layout has the row size, and that
variable-width size headers add up to each sample (without hashes, a damaged header would read a
neighbour's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from sparkbridge.errors import CorruptShardError
from sparkbridge.format.mds import ShardLayout, column_starts

__all__ = ["CorruptShardError", "DecodedShard", "decode_shard"]


@dataclass
class DecodedShard:
    """A shard's bytes plus what a gather needs: sample ``offsets`` and, when every column is
    fixed-width, ``rows``: one opaque record (``void`` of the row size) per sample. ``mapped``:
    the bytes are a file-backed map (page cache, shared by processes), not anonymous memory."""

    name: str
    buf: np.ndarray
    offsets: np.ndarray
    layout: ShardLayout
    rows: Optional[np.ndarray]
    mapped: bool = False

    @property
    def nbytes(self) -> int:
        """Anonymous memory this shard holds (a mapped shard's pages belong to the page cache)."""
        own = 0 if self.mapped else int(self.buf.nbytes)
        return own + (int(self.offsets.nbytes) if self.offsets.base is None else 0)


def decode_shard(name: str, layout: ShardLayout, buf: np.ndarray, offsets: np.ndarray, *,
                 mapped: bool = False) -> DecodedShard:
    """The gather views of a shard whose bytes passed ``check_shard`` (``offsets``: its header's
    ``num_samples + 1`` sample offsets, any integer dtype)."""
    n = len(offsets) - 1
    rows = None
    row_dtype = layout.row_dtype()
    if row_dtype is not None:
        if n and not np.all(np.diff(offsets) == row_dtype.itemsize):
            raise CorruptShardError(
                f"shard {name!r}: samples are not all {row_dtype.itemsize} bytes although every column is "
                "fixed-width: the file is corrupt")
        # opaque fixed-size records: numpy's take() copies them with one memcpy each
        rows = np.frombuffer(buf, dtype=np.dtype((np.void, row_dtype.itemsize)), count=n, offset=int(offsets[0]))
    else:
        offsets = offsets.astype(np.int64)  # gathers add to them
        if n:
            nvar = len(layout.var_columns)
            if int(np.diff(offsets).min()) < 4 * nvar:
                raise CorruptShardError(f"shard {name!r}: a sample is shorter than its size header: the file is corrupt")
            starts, sizes = column_starts(buf, offsets, layout)
            if not np.array_equal(starts[:, -1] + sizes[:, -1], offsets[1:]):
                raise CorruptShardError(
                    f"shard {name!r}: the column sizes of some samples do not add up to the sample: the file is corrupt")
    return DecodedShard(name, buf, offsets, layout, rows, mapped)
