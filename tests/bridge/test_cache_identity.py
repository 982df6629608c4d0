"""A ``local=`` cache folder left by another dataset is never read as this one's (issue 23 item 8).

Two stock Mosaic datasets with the same layout and shard names: a loader for A given the cache
folder that B's loader filled must return A's rows, with hashes (where a cached copy of B used to
be blamed on A's file) and without (where B's rows used to come back silently)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from tests.bridge.util import write_numeric

ROWS = 1000


def write_other(out, rows, *, hashes):
    """Like ``write_numeric`` (same columns, shard size and names), but ids start at 10,000."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"id": "int64", "x": "float32", "y": "int32"}, compression="zstd",
                   hashes=list(hashes), size_limit=1 << 14) as w:
        for k in range(rows):
            w.write({"id": np.int64(10_000 + k), "x": np.float32(k) / 4, "y": np.int32(k % 7)})
    return out


def ids_of(root, cache) -> list[int]:
    loader = StreamingLoader(str(root), local=str(cache), batch_size=100)
    try:
        return sorted(i for b in loader for i in b["id"].tolist())
    finally:
        loader.close()


@pytest.mark.parametrize("hashes", [(), ("xxh64",)], ids=["without-hashes", "with-hashes"])
def test_a_cache_left_by_another_dataset_is_not_read_as_this_one(tmp_path, hashes):
    a = write_numeric(tmp_path / "a", ROWS, compression="zstd", hashes=hashes)
    b = write_other(tmp_path / "b", ROWS, hashes=hashes)
    cache = tmp_path / "cache"
    assert ids_of(b, cache) == list(range(10_000, 10_000 + ROWS))
    assert ids_of(a, cache) == list(range(ROWS))
    assert ids_of(b, cache) == list(range(10_000, 10_000 + ROWS))  # and back


def test_a_cache_without_a_marker_is_not_trusted(tmp_path):
    """A folder stock Mosaic filled (no sparkbridge marker): its copies of the shard names are replaced."""
    from streaming import StreamingDataset

    a = write_numeric(tmp_path / "a", ROWS, compression="zstd", hashes=())
    b = write_other(tmp_path / "b", ROWS, hashes=())
    cache = tmp_path / "cache"
    stock = StreamingDataset(remote=str(b), local=str(cache), batch_size=100)
    assert len([stock[i] for i in range(ROWS)]) == ROWS
    del stock
    assert ids_of(a, cache) == list(range(ROWS))
