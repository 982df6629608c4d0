"""The spill decision counts what a decoded shard really costs (issue 23 item 13): a shard of
variable-width columns holds its int64 sample offsets (8 bytes a row) besides its bytes, and both
count against ``decoded_cache_bytes``. Judged by how many times shards are loaded, not by time."""

from __future__ import annotations

import numpy as np

from sparkbridge.bridge import StreamingLoader

ROWS, SHARDS = 20_000, 20


def write_short_strings(out):
    """20 zstd shards of (id int64, s str of 1-2 chars): ~17 raw bytes a row, +8 of decoded offsets."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"id": "int64", "s": "str"}, compression="zstd", hashes=["xxh64"],
                   size_limit=ROWS // SHARDS * 17 + 200) as w:
        for k in range(ROWS):
            w.write({"id": np.int64(k), "s": str(k % 50)})
    return out


def test_offsets_count_in_the_spill_decision(tmp_path):
    data = write_short_strings(tmp_path / "ds")
    probe = StreamingLoader(data, batch_size=100)
    table = probe.dataset.table
    assert table.count >= SHARDS
    raw = int(table.raw_bytes.sum())
    offsets = int((8 * (table.samples + 1)).sum())
    probe.close()
    # the bytes alone fit, the bytes and their offsets do not
    budget = raw + offsets // 2
    loader = StreamingLoader(data, batch_size=100, shuffle=True, seed=1, decoded_cache_bytes=budget)
    got = sorted(i for b in loader for i in b["id"].tolist())
    assert got == list(range(ROWS))
    loads = loader.dataset.reader().cache.loads
    loader.close()
    assert loads == table.count  # each shard once (it was loaded again and again)
