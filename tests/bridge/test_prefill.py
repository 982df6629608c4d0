"""The resident table fills from the moment a loader is built (bridge/prefill.py): the first epoch
is then the same batches, a damaged shard still fails the pass naming it, and close() stops it.
In Mosaic's order (given: its reference, 1 MiB of budget, does not fit the table; a global order
would map it)."""

from __future__ import annotations

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import CorruptShardError
from tests.bridge.util import write_numeric

N, B = 200_000, 1000  # 16-byte rows: shards of ~1.5 MB, large enough for a prefill thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("prefill") / "ds", N, compression="zstd", size_limit=3 << 19)


def ids(loader):
    return np.concatenate([b["id"].numpy().copy() for b in loader])


def test_the_table_fills_before_iter_and_the_epoch_is_unchanged(data):
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=5)
    prefill = loader.dataset._prefill
    assert prefill is not None and len(loader.dataset.shards) >= 2
    prefill.join(timeout=60)
    assert loader.dataset.reader().resident.complete()  # every shard loaded with no iter() yet
    got = ids(loader)
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=5, decoded_cache_bytes=1 << 20)
    assert reference.dataset._prefill is None  # too large for the table: nothing to prefill
    assert np.array_equal(got, ids(reference))
    assert sorted(got.tolist()) == list(range(N))
    loader.close()
    reference.close()


@pytest.mark.parametrize("parallel", [False, True], ids=["one thread", "a thread per core"])
def test_a_damaged_shard_fails_the_pass_naming_it(data, tmp_path, monkeypatch, parallel):
    from sparkbridge.bridge import prefill
    from tests.bridge.util import copy_with_a_flipped_byte

    if parallel:
        monkeypatch.setattr(prefill, "_PARALLEL_MIN_BYTES", 1 << 20)

    copy, victim = copy_with_a_flipped_byte(data, tmp_path / "ds", 1)
    loader = StreamingLoader(copy, batch_size=B, shuffle=True, shuffle_algo="py1e")
    loader.dataset._prefill.join(timeout=60)  # it skipped the bad shard and left it to the pass
    assert not loader.dataset.reader().resident.complete()
    with pytest.raises(CorruptShardError, match=victim.name):
        ids(loader)
    loader.close()


def test_close_stops_the_prefill(data):
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e")
    prefill = loader.dataset._prefill
    loader.close()
    assert not prefill.is_alive()
    assert loader.dataset._prefill is None


def test_several_threads_fill_disjoint_shards_once_each(data, monkeypatch):
    """Large local shards are filled by one thread per core; each shard is loaded exactly once and
    the epoch is unchanged."""
    import os

    from sparkbridge.bridge import prefill, resident

    monkeypatch.setattr(prefill, "_PARALLEL_MIN_BYTES", 1 << 20)  # these shards are ~1.5 MB
    loads: list[int] = []
    real = resident.ResidentRows.fill

    def counted(self, shard_id, start, rows):
        loads.append(int(shard_id))
        real(self, shard_id, start, rows)

    monkeypatch.setattr(resident.ResidentRows, "fill", counted)
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=5)
    group = loader.dataset._prefill
    count = len(loader.dataset.shards)
    assert len(group.threads) == max(1, min(4, os.cpu_count() or 1, count))
    group.join(timeout=60)
    assert not group.is_alive() and loader.dataset.reader().resident.complete()
    assert sorted(loads) == list(range(count))  # disjoint: no shard loaded twice
    got = ids(loader)
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=5, decoded_cache_bytes=1 << 20)
    assert np.array_equal(got, ids(reference))
    loader.close()
    reference.close()
