"""Write modes (error / append / overwrite with retention) and two jobs writing one output at once."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from sparkbridge import etl
from sparkbridge.etl.commit import ConcurrentWriteError, DatasetExistsError, SchemaMismatchError
from sparkbridge.etl.layout import find_orphans, is_job_id
from sparkbridge.format.manifest import Manifest
from sparkbridge.storage import open_storage

from tests.etl.helpers import stock_ids

pytestmark = pytest.mark.slow


def _sha(path: str) -> str:
    with open(os.path.join(path, "index.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _manifest(path: str) -> Manifest:
    with open(os.path.join(path, "manifest.json")) as f:
        return Manifest.from_json(f.read())


def _frame(spark, lo: int, hi: int, parts: int = 2):
    return spark.range(lo, hi, numPartitions=parts).selectExpr("id", "cast(id * 2 as int) AS twice", "cast(id as string) AS s")


def _files(path: str) -> set[str]:
    out = set()
    for folder, _, names in os.walk(path):
        for name in names:
            out.add(os.path.relpath(os.path.join(folder, name), path))
    return out


def test_error_mode_and_append(spark, tmp_path):
    out = str(tmp_path / "ds")
    first = etl.write_mds(_frame(spark, 0, 100), out)
    assert (first.rows, first.mode) == (100, "error")
    before = _sha(out)
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):
        etl.write_mds(_frame(spark, 0, 10), out)
    assert _sha(out) == before

    second = etl.write_mds(_frame(spark, 100, 250, parts=3), out, mode="append")
    assert second.rows == 150
    assert sorted(stock_ids(out)) == list(range(250))
    manifest = _manifest(out)
    assert manifest.rows == 250 and manifest.shards == first.shards + second.shards
    jobs = {name for name in os.listdir(out) if is_job_id(name)}
    assert jobs == {first.job_id, second.job_id}
    assert find_orphans(open_storage(out)) == []


def test_append_with_a_different_schema_lists_the_differences(spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 20), out)
    before, files = _sha(out), _files(out)
    other = spark.range(5).selectExpr("cast(id as string) AS id", "cast(id as int) AS twice", "1.5 AS extra")
    with pytest.raises(SchemaMismatchError) as info:
        etl.write_mds(other, out, mode="append")
    message = str(info.value)
    assert "column 's' (string) is missing from the new data" in message
    assert "column 'extra' (decimal) is not in the existing dataset" in message
    assert "column 'id': logical is 'int64' in the dataset but 'string' now" in message
    assert _sha(out) == before and _files(out) == files


def test_overwrite_keeps_old_shards_for_a_reader_mid_epoch(spark, tmp_path):
    from streaming import StreamingDataset

    out = str(tmp_path / "ds")
    v1 = etl.write_mds(_frame(spark, 0, 300), out, shard_size="2KB")
    assert v1.shards >= 4
    reader = StreamingDataset(local=out, batch_size=1, shuffle=False)
    seen = [int(reader[i]["id"]) for i in range(10)]

    t0 = time.time()
    v2 = etl.write_mds(_frame(spark, 1000, 1100), out, mode="overwrite")
    seen += [int(reader[i]["id"]) for i in range(10, len(reader))]  # old version, still readable
    del reader
    assert sorted(seen) == list(range(300))
    manifest = _manifest(out)
    assert manifest.rows == 100
    (record,) = manifest.extra["retained"]
    assert all(f.startswith(v1.job_id + "/") for f in record["files"])
    assert len(record["files"]) == 2 * v1.shards  # stored .zstd + the raw name a reader unpacks to
    assert t0 + 3600 <= record["expires_at"] <= time.time() + 3600
    assert find_orphans(open_storage(out)) == []  # retained and unpacked files are not orphans

    v3 = etl.write_mds(_frame(spark, 2000, 2050), out, mode="overwrite", retention_seconds=0)
    assert [r["expires_at"] > time.time() for r in _manifest(out).extra["retained"]] == [True, False]
    v4 = etl.write_mds(_frame(spark, 3000, 3010), out, mode="overwrite")
    top = {name for name in os.listdir(out) if is_job_id(name)}
    assert top == {v1.job_id, v3.job_id, v4.job_id}  # v2 expired and was deleted; v1 not yet
    assert sorted(stock_ids(out)) == list(range(3000, 3010))
    assert find_orphans(open_storage(out)) == []


def _slow(batches):
    time.sleep(4)
    yield from batches


def test_second_concurrent_job_is_refused_and_leaves_the_first_alone(spark, tmp_path):
    out = str(tmp_path / "ds")
    slow = _frame(spark, 0, 400).mapInArrow(_slow, "id long, twice int, s string")
    result: dict = {}

    def first():
        try:
            result["ok"] = etl.write_mds(slow, out)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.time() + 60
    staging = os.path.join(out, "_staging")
    while time.time() < deadline and not (os.path.isdir(staging) and os.listdir(staging)):
        time.sleep(0.05)
    (job_dir,) = os.listdir(staging)
    for mode in ("error", "overwrite"):
        with pytest.raises(ConcurrentWriteError, match=f"being written by another job {job_dir}"):
            etl.write_mds(_frame(spark, 0, 5), out, mode=mode)
        assert os.listdir(staging) == [job_dir]  # the first job's staging is untouched
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["ok"].job_id == job_dir
    assert sorted(stock_ids(out)) == list(range(400))
    assert not os.path.exists(staging) and find_orphans(open_storage(out)) == []
    with open(os.path.join(out, "index.json")) as f:
        assert all(s["zip_data"]["basename"].startswith(job_dir + "/") for s in json.load(f)["shards"])


def test_commit_between_mode_check_and_registration_is_refused(spark, tmp_path, monkeypatch):
    """mode='error' found no dataset, then another writer committed before this job registered:
    the job must fail (and write nothing), not replace that dataset."""
    import sparkbridge.etl.writer as writer

    out = str(tmp_path / "ds")
    real_start_job = writer.start_job
    calls = []

    def start_job_after_a_rival_commit(storage, job_id, mode):
        calls.append(job_id)
        if len(calls) == 1:  # the outer write, between check_mode and start_job
            etl.write_mds(_frame(spark, 500, 510, parts=1), out)
        return real_start_job(storage, job_id, mode)

    monkeypatch.setattr(writer, "start_job", start_job_after_a_rival_commit)
    with pytest.raises(ConcurrentWriteError, match="committed by another writer after mode='error' was checked"):
        etl.write_mds(_frame(spark, 0, 20), out)
    assert len(calls) == 2
    assert sorted(stock_ids(out)) == list(range(500, 510))  # the rival's version is intact
    assert not os.path.exists(os.path.join(out, "_staging")) and find_orphans(open_storage(out)) == []


def _arrays(spark, lo: int, hi: int, length):
    """``id`` and ``arr`` (doubles): ``length`` elements per row, or 1..3 when ``length`` is None."""
    n = "1 + id % 3" if length is None else str(length)
    return spark.range(lo, hi, numPartitions=1).selectExpr(
        "id", f"transform(sequence(1, {n}), x -> cast(id * 10 + x as double)) AS arr")


def test_append_keeps_each_array_columns_encoding(spark, tmp_path):
    from sparkbridge.bridge import StreamingLoader

    out = str(tmp_path / "var")
    etl.write_mds(_arrays(spark, 0, 30, None), out)
    assert _manifest(out).column("arr").shape is None
    etl.write_mds(_arrays(spark, 30, 50, 2), out, mode="append")  # uniform rows stay variable
    assert _manifest(out).column("arr").encoding == "ndarray:float64"
    with open(os.path.join(out, "index.json")) as f:
        encodings = {tuple(s["column_encodings"]) for s in json.load(f)["shards"]}
    assert len(encodings) == 1
    ids = []
    for batch in StreamingLoader(out, batch_size=16):
        ids += [int(i) for i in batch["id"]]
    assert sorted(ids) == list(range(50))

    fixed = str(tmp_path / "fixed")
    etl.write_mds(_arrays(spark, 0, 10, 2), fixed)
    etl.write_mds(_arrays(spark, 10, 20, 2), fixed, mode="append")
    assert _manifest(fixed).column("arr").shape == [2] and sorted(stock_ids(fixed)) == list(range(20))
    before, files = _sha(fixed), _files(fixed)
    with pytest.raises(SchemaMismatchError, match=r"column 'arr' has arrays of shape \[2\] in the dataset but "
                                                   r"variable \(1 to 3 elements\) in the new data"):
        etl.write_mds(_arrays(spark, 20, 30, None), fixed, mode="append")
    assert _sha(fixed) == before and _files(fixed) == files
