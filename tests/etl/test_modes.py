"""Write modes (error / append / overwrite with retention) and writers racing on one output."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from sparkbridge import etl
from sparkbridge.errors import CommitConflictError, DatasetExistsError, SchemaMismatchError, VersionNotFoundError
from sparkbridge.format.manifest import Manifest
from sparkbridge.log import LogReader, open_dataset
from sparkbridge.storage import open_storage
from sparkbridge.log.layout import is_write_id

from tests.etl.helpers import leftovers, log_versions, stock_ids

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


def test_error_mode_and_append(any_spark, tmp_path):
    out = str(tmp_path / "ds")
    first = etl.write_mds(_frame(any_spark, 0, 100), out)
    assert (first.rows, first.mode) == (100, "error")
    before = _sha(out)
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):
        etl.write_mds(_frame(any_spark, 0, 10), out)
    assert _sha(out) == before

    second = etl.write_mds(_frame(any_spark, 100, 250, parts=3), out, mode="append")
    assert second.rows == 150
    assert sorted(stock_ids(out)) == list(range(250))
    manifest = _manifest(out)
    assert manifest.rows == 250 and manifest.shards == first.shards + second.shards
    jobs = {name for name in os.listdir(out) if is_write_id(name)}
    assert jobs == {first.job_id, second.job_id}
    assert leftovers(out) == [] and log_versions(out) == ["create", "append"]


def test_append_with_a_different_schema_lists_the_differences(any_spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(any_spark, 0, 20), out)
    before, files = _sha(out), _files(out)
    other = any_spark.range(5).selectExpr("cast(id as string) AS id", "cast(id as int) AS twice", "1.5 AS extra")
    with pytest.raises(SchemaMismatchError) as info:
        etl.write_mds(other, out, mode="append")
    message = str(info.value)
    assert "column 's' (string) is missing from the new data" in message
    assert "column 'extra' (decimal) is not in the existing dataset" in message
    assert "column 'id': logical is 'int64' in the dataset but 'string' now" in message
    assert _sha(out) == before and _files(out) == files


def test_overwrite_keeps_old_shards_for_a_reader_mid_epoch(any_spark, tmp_path):
    from streaming import StreamingDataset

    out = str(tmp_path / "ds")
    v1 = etl.write_mds(_frame(any_spark, 0, 300), out, shard_size="2KB")
    assert v1.shards >= 4 and v1.version == 0
    reader = StreamingDataset(local=out, batch_size=1, shuffle=False)
    seen = [int(reader[i]["id"]) for i in range(10)]

    v2 = etl.write_mds(_frame(any_spark, 1000, 1100), out, mode="overwrite")
    seen += [int(reader[i]["id"]) for i in range(10, len(reader))]  # old version, still readable
    del reader
    assert sorted(seen) == list(range(300))
    assert (_manifest(out).rows, v2.version) == (100, 1)
    assert leftovers(out) == []  # v1's files are referenced by a retained version
    assert open_dataset(out, version=0).rows == 300  # time travel while retained
    top = {name for name in os.listdir(out) if is_write_id(name)}
    assert top == {v1.job_id, v2.job_id}

    v3 = etl.write_mds(_frame(any_spark, 2000, 2050), out, mode="overwrite", retention_seconds=0)
    top = {name for name in os.listdir(out) if is_write_id(name)}
    assert top == {v3.job_id}  # retention 0: the vacuum after v3 keeps only the latest version
    with pytest.raises(VersionNotFoundError, match="no longer retained"):
        open_dataset(out, version=0)
    v4 = etl.write_mds(_frame(any_spark, 3000, 3010), out, mode="overwrite")
    top = {name for name in os.listdir(out) if is_write_id(name)}
    assert top == {v3.job_id, v4.job_id}
    assert sorted(stock_ids(out)) == list(range(3000, 3010))
    assert log_versions(out) == ["create", "overwrite", "overwrite", "vacuum",
                                 "overwrite"]
    assert leftovers(out) == []


def _gated(gate: str):
    """A mapInArrow function whose task waits until ``gate`` exists: the test decides when this
    write's tasks finish (one partition: the other core stays free for the rival write)."""

    def wait(batches):
        deadline = time.time() + 120
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.05)
        yield from batches

    return wait


def _slow_frame(spark, tmp_path, lo: int, hi: int):
    gate = str(tmp_path / "gate")
    return _frame(spark, lo, hi, parts=1).mapInArrow(_gated(gate), "id long, twice int, s string"), gate


def _open_gate(gate: str) -> None:
    with open(gate, "w"):
        pass


def _in_thread(fn):
    result: dict = {}

    def run():
        try:
            result["ok"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _wait_for_staging(out: str) -> str:
    deadline = time.time() + 60
    staging = os.path.join(out, "_staging")
    while time.time() < deadline and not (os.path.isdir(staging) and os.listdir(staging)):
        time.sleep(0.05)
    (write_id,) = os.listdir(staging)
    return write_id


def test_concurrent_appends_both_commit(spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 10), out)
    slow, gate = _slow_frame(spark, tmp_path, 100, 500)
    thread, result = _in_thread(lambda: etl.write_mds(slow, out, mode="append"))
    _wait_for_staging(out)
    fast = etl.write_mds(_frame(spark, 1000, 1020), out, mode="append")  # commits while the slow one runs
    _open_gate(gate)
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert (fast.version, result["ok"].version) == (1, 2)
    # both planned on version 0: the slow one lost the race for version 1, re-read the log, committed 2
    reader = LogReader(open_storage(out))
    assert [reader.read_entry(v).read_version for v in (1, 2)] == [0, 0]
    assert sorted(stock_ids(out)) == list(range(10)) + list(range(100, 500)) + list(range(1000, 1020))
    assert log_versions(out) == ["create", "append", "append"]
    assert leftovers(out) == []


def test_append_landing_during_an_overwrite_fails_the_overwrite(spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(_frame(spark, 0, 10), out)
    slow, gate = _slow_frame(spark, tmp_path, 100, 500)
    thread, result = _in_thread(lambda: etl.write_mds(slow, out, mode="overwrite"))
    write_id = _wait_for_staging(out)
    etl.write_mds(_frame(spark, 1000, 1020), out, mode="append")
    _open_gate(gate)
    thread.join(timeout=120)
    assert isinstance(result.get("error"), CommitConflictError), result
    assert "version 1: append by" in str(result["error"]) and "rerun the overwrite" in str(result["error"])
    assert sorted(stock_ids(out)) == list(range(10)) + list(range(1000, 1020))  # nothing lost, nothing half-done
    assert not os.path.exists(os.path.join(out, write_id)) and leftovers(out) == []


def test_two_creates_race_one_wins_the_other_is_refused(spark, tmp_path):
    out = str(tmp_path / "ds")
    slow, gate = _slow_frame(spark, tmp_path, 0, 400)
    thread, result = _in_thread(lambda: etl.write_mds(slow, out))
    write_id = _wait_for_staging(out)
    etl.write_mds(_frame(spark, 500, 510, parts=1), out)  # mode='error' found nothing either: it commits first
    _open_gate(gate)
    thread.join(timeout=120)
    assert isinstance(result.get("error"), DatasetExistsError), result
    assert "a dataset was committed while this write ran" in str(result["error"])
    assert sorted(stock_ids(out)) == list(range(500, 510))  # the rival's version is intact
    assert not os.path.exists(os.path.join(out, write_id)) and leftovers(out) == []


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
