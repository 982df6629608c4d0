"""A crash at every step of the commit, on a local folder and on S3 (SeaweedFS).

Each case writes version 0 (ids 0..99), then runs an overwrite (ids 1000..1149) in a child process
armed with a fault hook (``SPARKBRIDGE_FAULTS``) that kills it — ``os._exit``, no cleanup — at one
step. Afterwards the dataset must be at version 0 or at version 1, never between: the log, our
loader and stock Mosaic (through ``index.json``) each see exactly one of the two row sets; the next
vacuum repairs the derived files and removes every leftover; a later write commits normally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.jobs.datasets import validate_dataset
from sparkbridge.log import LogReader, open_dataset, vacuum
from sparkbridge.storage import open_storage

from tests.etl.helpers import leftovers, log_versions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = list(range(100)), list(range(1000, 1150))

#: crash point → the version the dataset must be at afterwards
POINTS = {
    "etl.commit.before_log": 0,  # shards published, no entry
    "log.commit.before_put": 0,
    "storage.put_if_absent.before_link": 0,  # local only: the entry's temp file is written, not linked
    "log.commit.after_put": 1,  # entry committed, derived files still at version 0
    "etl.commit.after_log": 1,
    "log.derived.between_manifest_and_index": 1,  # manifest.json at 1, index.json at 0
    "etl.commit.after_derived": 1,  # staging not removed, no vacuum
}


def _drive(root: str, mode: str, lo: int, hi: int, *, faults: str = "", check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SPARKBRIDGE_FAULTS", None)
    if faults:
        env["SPARKBRIDGE_FAULTS"] = faults
    proc = subprocess.run([sys.executable, "-m", "tests.etl.commit_driver", root, mode, str(lo), str(hi)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _loader_ids(root: str, local=None) -> list[int]:
    loader = StreamingLoader(root, local=local, batch_size=64)
    try:
        return sorted(int(i) for batch in loader for i in batch["id"])
    finally:
        loader.close()


def _stock_ids(root: str, cache: Path) -> list[int]:
    """What stock Mosaic reads through index.json (a copy for S3: it downloads)."""
    from streaming import StreamingDataset

    if root.startswith("s3://"):
        ds = StreamingDataset(remote=root, local=str(cache), batch_size=1, shuffle=False)
    else:
        ds = StreamingDataset(local=root, batch_size=1, shuffle=False)
    try:
        return sorted(int(ds[i]["id"]) for i in range(len(ds)))
    finally:
        del ds


def _root(kind: str, tmp_path: Path, request) -> str:
    if kind == "local":
        return str(tmp_path / "ds")
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.url("ds")


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("point", sorted(POINTS))
def test_crash_at_each_commit_step(kind, point, tmp_path, request):
    if kind == "s3" and point == "storage.put_if_absent.before_link":
        pytest.skip("a local-file-system step (S3 creates the entry in one conditional PUT)")
    root = _root(kind, tmp_path, request)
    _drive(root, "error", 0, 100)
    crashed = _drive(root, "overwrite", 1000, 1150, faults=f"{point}=kill", check=False)
    assert crashed.returncode == 137, crashed.stderr[-3000:]

    expected = POINTS[point]
    rows = NEW if expected == 1 else OLD
    snap = open_dataset(root)
    assert snap.version == expected and snap.rows == len(rows)
    assert _loader_ids(root, local=str(tmp_path / "cache-ours") if kind == "s3" else None) == rows
    stock = _stock_ids(root, tmp_path / "cache-stock")
    assert stock in (OLD, NEW)  # index.json may lag a committed version, never show half of one

    if kind == "s3":
        time.sleep(1.1)  # S3 times have one-second resolution: "older than 0 s" needs the next second
    report = validate_dataset(root, progress=False, retention_seconds=0)
    assert report.rows == len(rows)
    plan = vacuum(root, retention_seconds=0)  # no writer is alive: everything unreferenced goes
    assert leftovers(root) == []
    after = validate_dataset(root, progress=False)
    assert after.ok, after.problems
    assert _stock_ids(root, tmp_path / "cache-stock-2") == rows  # derived files repaired
    if expected == 0:
        assert plan.fence, "the dead write must be fenced before its files are deleted"

    _drive(root, "append", 5000, 5010)
    assert _loader_ids(root, local=str(tmp_path / "cache-ours-2") if kind == "s3" else None) == rows + list(range(5000, 5010))


def test_s3_put_applied_while_the_client_saw_an_error_commits_exactly_once(s3_bucket, tmp_path):
    root = s3_bucket.url("ds")
    _drive(root, "error", 0, 100)
    # the conditional PUT of the entry lands, then the client sees a timeout: it must read the
    # entry back, find its own commit id, and count the commit as done — once
    _drive(root, "append", 1000, 1150, faults="storage.put_if_absent.after_put=ambiguous")
    assert log_versions(root)[:2] == ["create", "append"]
    assert _loader_ids(root, local=str(tmp_path / "c")) == OLD + NEW
    assert leftovers(root) == []


def test_an_error_after_the_entry_landed_never_deletes_committed_shards(s3_bucket, tmp_path):
    """The first protocol's abort() deleted the shards of an index.json the server had applied
    while the client saw an error. Now the write fails loudly, and its files stay: they are
    referenced by the committed version."""
    root = s3_bucket.url("ds")
    _drive(root, "error", 0, 100)
    failed = _drive(root, "append", 1000, 1150, faults="log.commit.after_put=raise", check=False)
    assert failed.returncode != 0 and "injected fault at log.commit.after_put" in failed.stderr
    assert open_dataset(root).version == 1
    assert _loader_ids(root, local=str(tmp_path / "c")) == OLD + NEW
    assert validate_dataset(root, progress=False).rows == 250


def test_two_processes_racing_appends_lose_nothing(tmp_path):
    """Eight writers in eight processes append at once: every commit lands at its own version."""
    root = str(tmp_path / "ds")
    _drive(root, "error", 0, 10)
    env = dict(os.environ)
    env.pop("SPARKBRIDGE_FAULTS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.etl.commit_driver", root, "append", str(100 * k),
                               str(100 * k + 10)], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(1, 9)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    versions = sorted(int(o[0].split("COMMITTED ")[1]) for o in outs)
    assert len(set(versions)) == 8
    expected = list(range(10)) + [i for k in range(1, 9) for i in range(100 * k, 100 * k + 10)]
    assert _loader_ids(root) == expected
    reader = LogReader(open_storage(root))
    ops = [reader.read_entry(v).operation for v in range(reader.refresh().version + 1)]
    # a writer's vacuum may land in between (removing another's finished staging): never a lost write
    assert ops.count("append") == 8 and ops[0] == "create" and set(ops) <= {"create", "append", "vacuum"}
    assert [v for v, op in enumerate(ops) if op == "append"] == versions
