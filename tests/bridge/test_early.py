"""A local dataset's resident table starts filling before Mosaic is imported (bridge/early.py).

The interleavings: the fill starts before Mosaic's import and its threads load while Mosaic builds
its dataset; the dataset's construction fails after the fill started (the fill is stopped, no
thread is left); a named hash some shard lacks (refused before any shard is read); a fill made for
another cache folder than the one Mosaic chose (dropped, not adopted); a rebuild on another
version (no early fill: the old dataset still holds its table).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from tests.bridge.util import write_numeric

N, B = 200_000, 1000  # 16-byte rows, shards of ~1.5 MB: a prefill thread per core


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("early") / "ds", N, compression="zstd", size_limit=3 << 19)


def ids(loader):
    return np.concatenate([b["id"].numpy().copy() for b in loader])


def prefill_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("sparkbridge-prefill")}


CHILD = r"""
import json, sys
from sparkbridge.bridge import StreamingLoader
import sparkbridge.bridge.early as early
seen = {"mosaic_at_import": "streaming" in sys.modules}
real = early.start_early_fill
def spy(*args, **kwargs):
    fill = real(*args, **kwargs)
    seen["mosaic_at_fill"] = "streaming.base.dataset" in sys.modules
    seen["threads"] = len(fill.prefill.threads) if fill is not None and fill.prefill is not None else 0
    return fill
early.start_early_fill = spy
loader = StreamingLoader(sys.argv[1], batch_size=1000, shuffle=True, seed=5)
seen["mosaic_after_build"] = "streaming.base.dataset" in sys.modules
got = sorted(int(i) for b in loader for i in b["id"].tolist())
loader.close()
seen.update(rows=len(got), distinct=len(set(got)), first=got[0], last=got[-1])
print(json.dumps(seen))
"""


def test_the_fill_starts_before_mosaic_is_imported(data):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["mosaic_at_import"] is False  # importing the loader does not import Mosaic
    assert seen["mosaic_at_fill"] is False and seen["threads"] >= 1  # loading before Mosaic's import
    assert seen["mosaic_after_build"] is True
    assert (seen["rows"], seen["distinct"], seen["first"], seen["last"]) == (N, N, 0, N - 1)


def _spy_fills(monkeypatch, **override):
    """Record every early fill the loader starts (``override``: options to start it with instead)."""
    from sparkbridge.bridge import early

    fills = []
    real = early.start_early_fill

    def spy(snapshot, **kwargs):
        fill = real(snapshot, **{**kwargs, **override})
        fills.append(fill)
        return fill

    monkeypatch.setattr(early, "start_early_fill", spy)
    return fills


def test_a_construction_that_fails_after_the_fill_started_stops_it(data, monkeypatch):
    fills = _spy_fills(monkeypatch)
    before = prefill_threads()
    with pytest.raises(Exception, match="nope"):
        StreamingLoader(data, batch_size=B, columns=["id", "nope"])
    assert len(fills) == 1 and fills[0] is not None  # the fill had started: the test can fail
    assert fills[0].prefill is None
    assert not (prefill_threads() - before)  # stopped and joined, none left running


def test_a_missing_hash_is_refused_before_any_shard_is_read(data, monkeypatch):
    fills = _spy_fills(monkeypatch)
    before = prefill_threads()
    with pytest.raises(ValueError, match=r"validate_hash='sha1' but \d+ shard\(s\) .* have no such hash"):
        StreamingLoader(data, batch_size=B, validate_hash="sha1")
    assert fills == []  # raised inside start_early_fill, before a thread started
    assert not (prefill_threads() - before)


def test_a_fill_for_another_cache_folder_is_dropped_not_adopted(data, tmp_path, monkeypatch):
    fills = _spy_fills(monkeypatch, local=str(tmp_path / "elsewhere"))
    loader = StreamingLoader(data, batch_size=B, shuffle=True, seed=5)
    fill = fills[0]
    assert fill is not None and loader.dataset.table is not fill.table
    assert fill.prefill is None  # stopped by the dataset
    assert loader.dataset.reader() is not fill.reader
    got = ids(loader)
    monkeypatch.undo()
    reference = StreamingLoader(data, batch_size=B, shuffle=True, seed=5, decoded_cache_bytes=1 << 20)
    assert np.array_equal(got, ids(reference))
    loader.close()
    reference.close()


def test_the_first_epoch_is_unchanged_and_a_rebuild_fills_nothing_early(data):
    loader = StreamingLoader(data, batch_size=B, shuffle=True, seed=5)
    assert loader.dataset._prefill is not None  # adopted from the early fill
    got = ids(loader)
    reference = StreamingLoader(data, batch_size=B, shuffle=True, seed=5, decoded_cache_bytes=1 << 20)
    assert np.array_equal(got, ids(reference))
    rebuilt = loader._build_dataset(None)  # what load_state_dict does to resume on another version
    assert rebuilt._prefill is None and rebuilt._reader is None  # no table until it is read
    loader._release(rebuilt)
    loader.close()
    reference.close()
