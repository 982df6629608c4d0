"""What sparkbridge relies on in Mosaic's internals (see sparkbridge.bridge.mosaic), tested
through real loaders in real processes.

Shared-memory prefixes: every ``StreamingDataset`` registers ``/dev/shm/<N>_locals`` for the first
free ``N``; loaders that start together in separate processes on one host used to pick the same
``N`` (``FileExistsError: '/000920_locals'`` from inside Mosaic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bridge.util import write_numeric

ROOT = Path(__file__).resolve().parents[2]

#: One process: wait for the start time, build a loader over argv[1], read one epoch, keep it open
#: until argv[3] seconds after the start, print its ids' count and sum and its shared-memory prefix.
READER = """
import json, logging, sys, time
start = float(sys.argv[2])
logging.basicConfig(level=logging.WARNING)
logging.getLogger("sparkbridge.bridge.mosaic").setLevel(logging.DEBUG)
from sparkbridge.bridge import StreamingLoader
time.sleep(max(0.0, start - time.time()))
loader = StreamingLoader(sys.argv[1], batch_size=64)
ids = [i for b in loader for i in b["id"].tolist()]
prefix = loader.dataset._shm_prefix_int
time.sleep(max(0.0, start + float(sys.argv[3]) - time.time()))  # the loaders' lives overlap until then
loader.close()
print(json.dumps({"rows": len(ids), "sum": sum(ids), "distinct": len(set(ids)), "prefix": prefix}))
"""

def _start(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _result(proc: subprocess.Popen) -> tuple[dict, str]:
    """The process's result and its log."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return [write_numeric(root / f"ds{k}", 500 + k) for k in range(6)]


def _expect(result: dict, rows: int) -> None:
    assert (result["rows"], result["distinct"], result["sum"]) == (rows, rows, rows * (rows - 1) // 2)


def test_loaders_that_start_together_in_separate_processes_each_register_their_own_prefix(datasets):
    """Six processes build their loaders at the same instant, twice over: each reads its
    own dataset exactly, and the live ones never share a prefix."""
    for _ in range(2):
        start = time.time() + 8.0  # after every process has imported torch and Mosaic
        procs = [_start(READER, ds, start, 0) for ds in datasets]
        results = [_result(p)[0] for p in procs]
        for k, r in enumerate(results):
            _expect(r, 500 + k)


def test_a_loader_that_starts_while_another_registers_waits_and_takes_the_next_prefix(datasets):
    """Loader A stalls between choosing prefix N and creating it (fault point
    ``shm-prefix-chosen``); loader B starts meanwhile: B waits for A's registration and takes a
    different prefix; both read their rows."""
    start = time.time() + 6.0
    a = _start(READER, datasets[0], start, 15, env={"SPARKBRIDGE_FAULTS": "shm-prefix-chosen@1=sleep3"})
    b = _start(READER, datasets[1], start + 1.0, 15)
    (ra, _), (rb, _) = _result(a), _result(b)
    _expect(ra, 500)
    _expect(rb, 501)
    assert ra["prefix"] != rb["prefix"]


def _held_for(path: str, seconds: float) -> bool:
    """Whether another process holds the flock on ``path`` for ``seconds`` on end."""
    import fcntl

    deadline = time.monotonic() + seconds
    fd = os.open(path, os.O_RDONLY)
    try:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def test_a_stock_mosaic_registration_that_takes_the_chosen_prefix_first_makes_the_loader_choose_again(datasets):
    """Stock Mosaic takes no lock: while our loader stalls between choosing prefix N and creating
    it (inside the lock), Mosaic's own registration (run here, in the test's process) takes N;
    the loader registers another prefix instead of failing with FileExistsError."""
    from streaming.base.shared.prefix import get_shm_prefix
    from streaming.base.world import World

    from sparkbridge.bridge.mosaic import PREFIX_LOCK

    ours = _start(READER, datasets[0], time.time(), 0, env={"SPARKBRIDGE_FAULTS": "shm-prefix-chosen@1=sleep6"})
    deadline = time.monotonic() + 120
    while not (os.path.exists(PREFIX_LOCK) and _held_for(PREFIX_LOCK, 1.0)):  # ours has chosen, and sleeps
        assert time.monotonic() < deadline and ours.poll() is None, "the loader never stalled in the lock"
    prefix, shm = get_shm_prefix([str(datasets[2])], [None], World.detect())
    try:
        result, log = _result(ours)
    finally:
        shm.cleanup()
    _expect(result, 500)
    assert f"prefix {prefix} was taken meanwhile; choosing again" in log  # the race happened
    assert result["prefix"] != prefix


def test_a_leader_whose_registration_fails_fails_every_rank_of_its_job(datasets, tmp_path):
    """The node leader's registration raises (fault point ``shm-prefix-chosen``): the other rank
    raises the same error within seconds instead of waiting in Mosaic's barrier until the process
    group's timeout."""
    from tests.bridge.util import torchrun

    proc = torchrun(Path(__file__).parent / "prefix_ranks.py", tmp_path, datasets[3],
                    env={"SPARKBRIDGE_FAULTS": "shm-prefix-chosen=raise"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["raised"] == r1["raised"] == {"type": "InjectedFault",
                                            "message": "injected fault at shm-prefix-chosen"}
    assert max(r0["seconds"], r1["seconds"]) < 30  # not the process group's 60 s timeout


def test_readers_built_from_a_template_equal_mosaics_own(tmp_path):
    """``SnapshotStream.get_shards`` builds most readers from a template per layout: each must
    hold exactly what Mosaic's constructor gives it (files, sample count, lists, compression)."""
    from sparkbridge.bridge.mosaic import _reader, _Readers
    from sparkbridge.format.index import check_index_entries

    def entry(k, names=("id", "x"), compression="zstd", hashes=("xxh64",), zipped=True, size_limit=1 << 20):
        e = {"column_names": list(names), "column_encodings": ["int64", "float32"], "column_sizes": [8, 4],
             "compression": compression if zipped else None, "format": "mds", "hashes": list(hashes),
             "samples": 10 + k, "size_limit": size_limit, "version": 2,
             "raw_data": {"basename": f"w/shard.{k:05d}.mds", "bytes": 1000 + k, "hashes": {"xxh64": f"{k:x}"}},
             "zip_data": {"basename": f"w/shard.{k:05d}.mds.zstd", "bytes": 100 + k, "hashes": {}} if zipped
             else None}
        return e

    entries = [entry(0), entry(1), entry(2, names=("id", "y")), entry(3, hashes=()), entry(4, zipped=False),
               entry(5), entry(6, size_limit="1mb"), entry(7, names=("id", "y")), entry(8)]
    del entries[4]["zip_data"]  # an entry without the key at all
    check_index_entries(entries, where="x")  # as a snapshot's are: one layout's entries share their lists
    readers = _Readers(str(tmp_path), None)
    built = [readers.reader(e) for e in entries]
    own = [_reader(str(tmp_path), None, e) for e in entries]
    assert [type(b) for b in built] == [type(o) for o in own]
    assert [vars(b) for b in built] == [vars(o) for o in own]
    assert [b.samples for b in built] == [10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert built[1].file_pairs[0][0].basename == "w/shard.00001.mds" and built[1].file_pairs is not built[5].file_pairs


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_the_per_shard_shared_arrays_are_set_in_bulk_and_every_segment_is_released(tmp_path, compression):
    """Mosaic's construction sets its per-shard states and access times a shard at a time; while a
    sparkbridge dataset is built those writes share one view of each segment (one per write was
    ~0.3 s at 100,000 shards). The values are Mosaic's (a shard with a file in the cache folder is
    LOCAL, else REMOTE; every access time set), and no view outlives the construction: every
    segment is released."""
    import numpy as np

    from sparkbridge.bridge import StreamingLoader, mosaic

    data = write_numeric(tmp_path / "ds", 3000, compression=compression, size_limit=1 << 12)
    loader = StreamingLoader(data, batch_size=100)
    ds = loader.dataset
    n = ds.table.count
    assert n >= 10
    # uncompressed: the dataset root is the cache folder (every shard LOCAL); compressed: read in
    # place through an empty spill folder (every shard REMOTE)
    want = mosaic.ShardState.LOCAL if compression is None else mosaic.ShardState.REMOTE
    assert mosaic.shard_states(ds).tolist() == [int(want)] * n
    times = ds._shard_access_times.numpy()
    assert len(times) == n and bool(np.all(times > 0))
    assert mosaic._building.views is None  # nothing kept past the construction
    names = [ds._shard_states.name, ds._shard_access_times.name]
    assert all(os.path.exists(f"/dev/shm/{name.lstrip('/')}") for name in names)
    del times
    loader.close()
    assert not any(os.path.exists(f"/dev/shm/{name.lstrip('/')}") for name in names)


def test_an_unweighted_stream_is_resampled_without_the_per_shard_loop_to_mosaics_arrays(tmp_path):
    """Every epoch's order starts with Mosaic's ``resample_streams`` (0.4 s of a Python loop over
    100,000 shards). For one stream read whole, :func:`sparkbridge.bridge.mosaic.resample_whole`
    gives exactly Mosaic's arrays (no random number is drawn there), and so the same orders."""
    import numpy as np

    from sparkbridge.bridge import StreamingLoader, mosaic

    data = write_numeric(tmp_path / "ds", 3001, size_limit=1 << 12)
    loader = StreamingLoader(data, batch_size=100, shuffle=True, seed=5)
    ds = loader.dataset
    for epoch in range(3):
        quick = mosaic.resample_whole(ds, epoch)
        assert quick is not None
        own = mosaic.StreamingDataset.resample_streams(ds, epoch)
        for a, b in zip(quick, own):
            assert a.dtype == b.dtype == np.int64 and a.tolist() == b.tolist()
        assert [x.tolist() for x in ds.resample_streams(epoch)] == [x.tolist() for x in own]
    work = ds.compute_work(1, 0, 1)
    ds.resample_streams = lambda epoch, stream_id=None: mosaic.StreamingDataset.resample_streams(ds, epoch)
    assert np.array_equal(work, ds.compute_work(1, 0, 1))
    ds.streams[0].choose = 2 * ds.num_samples  # a repeat: Mosaic's own loop
    assert mosaic.resample_whole(ds, 0) is None
    loader.close()


def test_the_py1e_shuffle_is_mosaics_order_exactly():
    """Mosaic's default shuffle is replaced by :mod:`sparkbridge.bridge.py1e` (1.1 s of Python
    over 100,000 shards before a first batch): the same ids, for shards of any sizes, canonical
    nodes, block sizes (the warning when a block is smaller than a shard included), seeds and
    epochs, and Mosaic's error for a canonical node without samples."""
    import warnings

    import numpy as np
    import streaming.base.shuffle as mosaic_shuffle
    from streaming.base.shuffle.py1e import get_shuffle_py1e as mosaics

    import sparkbridge.bridge.mosaic  # noqa: F401 - installs it
    from sparkbridge.bridge.py1e import get_shuffle_py1e

    assert mosaic_shuffle.algos["py1e"] is get_shuffle_py1e
    rng = np.random.default_rng(7)
    seen = {"error": 0, "warning": 0}
    for trial in range(60):
        n = int(rng.integers(1, 4 if trial % 10 == 9 else 300))  # every 10th: fewer samples than nodes
        sizes = rng.integers(0 if trial % 5 == 0 else 1, 2 if trial % 10 == 9 else 60, size=n).astype(np.int64)
        args = (sizes, int(rng.integers(1, 6)) if trial % 10 != 9 else 6, int(rng.integers(0, 10_000)), int(rng.integers(0, 4)),
                int(rng.choice([8, 100, 1000, 1 << 18])))
        got, want = [], []
        for fn, out in ((get_shuffle_py1e, got), (mosaics, want)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out.append(fn(*args))
                except ValueError as exc:
                    out.append(str(exc))
            out.append([str(w.message) for w in caught])
        if isinstance(want[0], str):
            assert got == want, trial
            seen["error"] += 1
            continue
        seen["warning"] += bool(want[1])
        assert got[0].dtype == want[0].dtype == np.int64 and np.array_equal(got[0], want[0]), trial
        assert got[1] == want[1], trial
    assert seen["error"] >= 3 and seen["warning"] >= 3, seen
    sizes = np.full(20_000, 16, dtype=np.int64)  # the bench's shards, 64 canonical nodes
    assert np.array_equal(get_shuffle_py1e(sizes, 64, 3, 1, 1 << 18), mosaics(sizes, 64, 3, 1, 1 << 18))
