"""Damaged, stray and hostile files in a dataset root (issue 22, items 8–12), and ``sparkbridge
validate`` reporting each of them as one line instead of crashing.

Every dataset is written through ``write_mds``'s own commit path (tests/log/writes.py: real MDS
shards, real log entries), then damaged by hand the way a user, a crashed tool or an attacker would.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from sparkbridge.errors import LogError, UnsafePathError
from sparkbridge.jobs import cli
from sparkbridge.log import LogReader, open_dataset
from sparkbridge.log.entry import entry_name
from sparkbridge.storage import open_storage
from tests.log.writes import Write, read_ids, write_ids


@pytest.fixture
def st(tmp_path):
    return open_storage(str(tmp_path / "ds"))


@pytest.fixture
def two_versions(st):
    write_ids(st, "error", [[1, 2, 3]])
    write_ids(st, "append", [[4, 5]])
    return st


def validate(capsys, root) -> tuple[int, str]:
    code = cli.main(["validate", str(root)])
    return code, capsys.readouterr().out


def edit_entry(st, version: int, change) -> None:
    """Rewrite ``_log/<version>.json`` by hand (``change`` edits the parsed object in place)."""
    path = st.local_path(entry_name(version))
    obj = json.loads(open(path, "rb").read())
    change(obj)
    with open(path, "w") as f:
        f.write(json.dumps(obj))


# ----------------------------------------------------------------------------- item 8


def test_a_stray_entry_far_beyond_the_log_is_an_error_naming_it_at_once(two_versions, capsys):
    st = two_versions
    stray = st.local_path("_log/99999999999999999999.json")
    with open(stray, "w") as f:
        f.write("{}")
    started = time.perf_counter()
    with pytest.raises(LogError, match=r"99999999999999999999\.json") as err:
        open_dataset(st.root)
    assert time.perf_counter() - started < 2.0  # no list of 10^20 missing versions
    assert "versions 2 to 99999999999999999998" in str(err.value) and "missing below it" in str(err.value)
    with pytest.raises(LogError, match=r"99999999999999999999\.json"):
        write_ids(st, "append", [[6]])
    code, out = validate(capsys, st.root)
    assert code == 1 and "99999999999999999999.json" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("content", ["null", "[]", '"a string"', "7", '{"format": 3, "state": []}'])
def test_a_checkpoint_that_is_json_but_not_an_object_is_skipped_and_reported(two_versions, capsys, content):
    st = two_versions
    with open(st.local_path("_log/00000000000000000001.checkpoint.json"), "w") as f:
        f.write(content)
    snap = open_dataset(st.root)  # replayed from the entries, the checkpoint skipped
    assert (snap.version, read_ids(st, snap)) == (1, [1, 2, 3, 4, 5])
    assert open_dataset(st.root, version=1).rows == 5
    write_ids(st, "append", [[6]])
    assert read_ids(st, open_dataset(st.root)) == [1, 2, 3, 4, 5, 6]
    code, out = validate(capsys, st.root)
    assert code == 1 and "00000000000000000001.checkpoint.json" in out and "damaged checkpoint" in out


# ----------------------------------------------------------------------------- item 10


def test_delete_prefix_never_follows_a_symlinked_folder_out_of_the_root(st, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    os.makedirs(st.local_path("_staging"))
    os.symlink(outside, st.local_path("_staging/j20260101T000000-0000abcd"))
    st.delete_prefix("_staging/j20260101T000000-0000abcd/")
    assert (outside / "keep.txt").read_text() == "mine"
    assert not os.path.lexists(st.local_path("_staging/j20260101T000000-0000abcd"))  # the link itself went
    # a folder whose parent is a link out of the root is not followed either
    os.symlink(outside, st.local_path("elsewhere"))
    (outside / "sub").mkdir()
    (outside / "sub" / "x").write_text("x")
    with pytest.raises(UnsafePathError, match="outside"):
        st.delete_prefix("elsewhere/sub/")
    assert (outside / "sub" / "x").read_text() == "x"


def test_a_write_refuses_a_staging_folder_planted_as_a_symlink(st, tmp_path):
    write_ids(st, "error", [[1]])
    w = Write(st, "append", commit="partition")
    w.task(0, [2])
    w.crash()
    wid = w.job.write_id
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    staging = st.local_path(f"_staging/{wid}")
    import shutil

    shutil.rmtree(staging)
    os.symlink(outside, staging)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Write(st, "append", commit="partition", resume=True)
    assert (outside / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("field, value, message", [
    ("schema.columns", "not a list", "schema.columns"),
    ("schema.columns", [{"name": "id"}], "schema.columns"),
    ("schema.columns", [7], "schema.columns"),
    ("timestamp", float("nan"), "timestamp"),
    ("timestamp", float("inf"), "timestamp"),
    ("timestamp", -5.0, "timestamp"),
    ("bytes", 2 ** 70, "bytes"),
    ("bytes", 2 ** 32 + 1, "bytes"),
    ("samples", 2 ** 40, "samples"),
])
def test_hand_edited_entries_are_refused_when_parsed(two_versions, capsys, field, value, message):
    st = two_versions

    def change(obj):
        if field == "schema.columns":
            obj["schema"]["columns"] = value
        elif field == "timestamp":
            obj["timestamp"] = value
        else:
            target = obj["add"][0] if field == "samples" else obj["add"][0]["raw_data"]
            target[field] = value

    edit_entry(st, 1, change)
    with pytest.raises(LogError, match=message) as err:
        open_dataset(st.root)
    assert "00000000000000000001.json" in str(err.value)
    code, out = validate(capsys, st.root)
    assert code == 1 and "00000000000000000001.json" in out and message in out


def test_a_shard_listed_twice_in_one_entry_is_refused(two_versions, capsys):
    st = two_versions
    edit_entry(st, 1, lambda obj: obj["add"].append(dict(obj["add"][0])))
    with pytest.raises(LogError, match=r"00000000000000000001\.json.*listed twice"):
        open_dataset(st.root)
    code, out = validate(capsys, st.root)
    assert code == 1 and "listed twice" in out


def test_a_shard_added_again_by_a_later_entry_is_refused(two_versions, capsys):
    st = two_versions
    first = json.loads(open(st.local_path(entry_name(0)), "rb").read())["add"][0]
    edit_entry(st, 1, lambda obj: obj["add"].append(first))
    with pytest.raises(LogError, match=r"00000000000000000001\.json.*already in the dataset"):
        open_dataset(st.root)
    code, out = validate(capsys, st.root)
    assert code == 1 and "already in the dataset" in out


def test_an_entry_that_is_json_but_not_an_object_is_reported(two_versions, capsys):
    st = two_versions
    with open(st.local_path(entry_name(1)), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(LogError, match=r"00000000000000000001\.json: a log entry must be a JSON object"):
        open_dataset(st.root)
    code, out = validate(capsys, st.root)
    assert code == 1 and "must be a JSON object" in out


def test_timestamps_written_are_finite(st):
    write_ids(st, "error", [[1]])
    assert math.isfinite(LogReader(st).read_entry(0).timestamp)


# ----------------------------------------------------------------------------- item 5


def _two_applications_resume_one_write(st):
    """A partitioned append crashes after partition 0; two applications (a duplicate submission)
    resume it. Both run partition 1 as task attempt 0 (attempt ids restart in every application):
    B writes its shards, A commits, B commits (the loser). Returns (A, B's row)."""
    write_ids(st, "error", [[1, 2]])
    crashed = Write(st, "append", commit="partition")
    crashed.task(0, [10, 11])
    crashed.crash()
    a = Write(st, "append", commit="partition", resume=True)
    b = Write(st, "append", commit="partition", resume=True)
    assert a.job.write_id == b.job.write_id == crashed.job.write_id
    b_row = b.write_shards(1, [20, 21, 22], task_attempt_id=0)
    a.commit_task(a.write_shards(1, [20, 21, 22], task_attempt_id=0))
    lost = b.commit_task(b_row)
    return a, lost


def _check_resumed(st, a, lost):
    assert lost.get("superseded") is True and lost["entries"] == []
    a.finish(partitions=2)
    snap = open_dataset(st.root)
    assert sorted(read_ids(st, snap)) == [1, 2, 10, 11, 20, 21, 22]
    attempts = {e["raw_data"]["basename"].split("/")[1] for e in snap.shards[1:]}
    assert len(attempts) == 2 and all("-a0" in name for name in attempts)


def test_two_applications_resuming_one_write_locally_keep_the_winners_shard(st):
    a, lost = _two_applications_resume_one_write(st)
    _check_resumed(st, a, lost)


@pytest.mark.slow
def test_two_applications_resuming_one_write_on_s3_keep_the_winners_shard(s3_bucket):
    st = open_storage(s3_bucket.url("ds"))
    a, lost = _two_applications_resume_one_write(st)
    _check_resumed(st, a, lost)
    from sparkbridge.jobs.datasets import validate_dataset

    report = validate_dataset(st.root, progress=False)
    assert report.ok, report.problems


# ----------------------------------------------------------------------------- item 12


class _ListingFailsAfterCommit(type(open_storage("/tmp"))):
    """A local root whose listing fails once right after a log entry landed (a transient error of
    the store while the writer re-reads the log)."""

    armed = False

    def put_if_absent(self, rel, data):
        landed = super().put_if_absent(rel, data)
        if landed and rel.startswith("_log/"):
            type(self).armed = True
        return landed

    def list_info(self, prefix="", *, start_after=None):
        if type(self).armed:
            type(self).armed = False
            raise ConnectionError("transient: the store did not answer")
        return super().list_info(prefix, start_after=start_after)


def test_a_transient_error_after_the_entry_landed_is_not_a_failed_write(tmp_path):
    st = _ListingFailsAfterCommit(str(tmp_path / "ds"))
    write_ids(open_storage(st.root), "error", [[1, 2]])
    entry = write_ids(st, "append", [[3, 4]])  # the re-read after the put fails once
    assert entry.version == 1
    snap = open_dataset(st.root)
    assert (snap.version, read_ids(st, snap)) == (1, [1, 2, 3, 4])  # committed once, reported committed


def test_without_hard_links_an_entry_appears_whole_and_only_once(st, monkeypatch):
    """A file system without link() (some FUSE mounts): the entry is renamed into place without
    replacing (renameat2), so no reader ever sees it half-written, and a second writer loses."""
    import errno as _errno

    def no_links(src, dst, *a, **k):
        raise OSError(_errno.EPERM, "Operation not permitted")

    def excl_is_the_last_resort(*a, **k):
        raise AssertionError("O_EXCL create used although rename-without-replace works here")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(type(st), "_create_exclusive", excl_is_the_last_resort)
    write_ids(st, "error", [[1, 2]])
    write_ids(st, "append", [[3]])
    assert st.put_if_absent(entry_name(1), b"{}") is False  # taken: not replaced
    snap = open_dataset(st.root)
    assert (snap.version, read_ids(st, snap)) == (1, [1, 2, 3])
    assert not [n for n in os.listdir(st.local_path("_log")) if n.endswith(".tmp")]


def test_the_store_clock_of_a_local_root_is_its_file_times(two_versions):
    st = two_versions
    before = sorted(os.listdir(st.local_path("_log")))
    assert abs(st.now() - time.time()) < 5
    assert sorted(os.listdir(st.local_path("_log"))) == before  # its probe file is gone


def test_validate_reports_a_symlink_planted_in_the_root(two_versions, tmp_path, capsys):
    st = two_versions
    outside = tmp_path / "precious"
    outside.mkdir()
    os.makedirs(st.local_path("_staging"), exist_ok=True)
    os.symlink(outside, st.local_path("_staging/j20260101T000000-0000abcd"))
    code, out = validate(capsys, st.root)
    assert code == 1 and "symbolic link" in out and "_staging/j20260101T000000-0000abcd" in out


def test_a_job_write_fenced_by_a_vacuum_fails_with_a_clear_error(st):
    """Found by the model test: the vacuum deleted the fenced write's staged files, and its commit
    failed with a bare FileNotFoundError from a rename instead of saying it was fenced."""
    from sparkbridge.errors import CommitConflictError
    from sparkbridge.log import vacuum

    write_ids(st, "error", [[1, 2]])
    w = Write(st, "append")
    w.task(0, [3])
    time.sleep(0.05)  # file times are coarse: a file as old as the store's "now" is rightly kept
    vacuum(st, retention_seconds=0)
    with pytest.raises(CommitConflictError, match="fenced by a vacuum"):
        w.finish(partitions=1)
    assert read_ids(st, open_dataset(st.root)) == [1, 2]


def test_vacuum_keeps_shards_a_rollback_brought_back(st):
    """A partitioned append commits a partition; a partitioned overwrite replaces it; a vacuum
    fences the overwrite and rolls it back, so the append's shard is served again. Once another
    overwrite begins, a vacuum with a long retention deletes that shard (it is in no ``add`` after
    ``retained_from``) and the version a default reader is served can no longer be read. Found by
    the model test; the vacuum now keeps the files of every retained version a fence rolled back."""
    from sparkbridge.log import vacuum

    w1 = Write(st, "append", commit="partition")
    w1.task(0, [0])
    Write(st, "append", commit="partition", resume=w1.job.write_id)  # a second driver, as in the model
    w2 = Write(st, "overwrite", commit="partition")
    time.sleep(0.05)
    vacuum(st, retention_seconds=0)
    w2.abort()
    w1.abort()
    Write(st, "overwrite", commit="partition")
    vacuum(st, retention_seconds=3600)
    reader = LogReader(st)
    assert read_ids(st, reader.snapshot(reader.complete_version())) == [0]


def test_an_append_after_every_write_was_rolled_back_writes_the_first_rows(st):
    """The model test's second finding: once every write of a root was fenced and rolled back, the
    log holds no rows and no schema; an append there was refused ("no recorded schema") instead of
    writing the first rows, as it does on an empty root."""
    from sparkbridge.log import vacuum

    w = Write(st, "append", commit="partition")
    w.task(0, [0, 1])
    time.sleep(0.05)
    vacuum(st, retention_seconds=0)  # fenced and rolled back: no rows, no schema
    assert read_ids(st, open_dataset(st.root)) == []
    write_ids(st, "append", [[5, 6, 7]])
    assert read_ids(st, open_dataset(st.root)) == [5, 6, 7]
    assert open_dataset(st.root).schema is not None
