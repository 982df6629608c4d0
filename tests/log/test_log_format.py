"""A log saved by an older sparkbridge still reads: tests/log/data/log_main_d318eee was written by
the code at main d318eee (format ``sparkbridge.log/1``: ``operation: write|begin`` plus ``mode``),
see tests/log/data/make_log_main_d318eee.py. New entries use the :class:`Operation` words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparkbridge.log import Draft, LogReader, commit, open_dataset
from sparkbridge.log.entry import CommitUnit, Operation
from sparkbridge.storage import open_storage

from tests.log.test_log import SCHEMA, shard, wid

SAVED = Path(__file__).parent / "data" / "log_main_d318eee"


def test_a_log_written_by_main_d318eee_still_reads_and_takes_new_entries(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(SAVED, root)
    reader = LogReader(open_storage(str(root)))
    ops = [reader.read_entry(v) for v in range(reader.refresh().version + 1)]
    assert [(str(e.operation), e.opens) for e in ops] == [
        ("create", False), ("append", False), ("overwrite", True), ("partition", False), ("partition", False),
        ("complete", False), ("stream", False), ("append", True), ("partition", False), ("vacuum", False),
        ("append", True)]
    assert ops[2].operation is Operation.OVERWRITE and ops[2].commit is CommitUnit.PARTITION
    snap = open_dataset(str(root))
    # the overwrite's 7 rows and the stream's 2; the fenced append (9 rows) is rolled back
    assert (snap.version, snap.rows, snap.txns) == (10, 9, {"q1": 0})
    assert {k: w.state for k, w in snap.writes.items()} == {
        wid(1): "complete", wid(2): "complete", wid(3): "complete", "s20260101T000000-00000004": "complete",
        wid(5): "fenced", wid(8): "open"}
    assert reader.complete_version() == 9 and open_dataset(str(root), version=5).rows == 7
    # the next commit is written in the new words and reads back
    st = open_storage(str(root))
    e = commit(st, Draft(operation=Operation.PARTITION, write_id=wid(8), read_version=10, partition=0,
                         add=(shard(f"{wid(8)}/p00000-a0/shard.00000.mds", 1),)))
    commit(st, Draft(operation=Operation.APPEND, write_id=wid(9), read_version=11, schema=SCHEMA,
                     add=(shard(f"{wid(9)}/p00000-a0/shard.00000.mds", 5),)))
    raw = json.loads(st.read_bytes("_log/00000000000000000012.json"))
    assert (raw["format"], raw["operation"], raw["commit"], "mode" in raw) == ("sparkbridge.log/2", "append", "job", False)
    assert e.version == 11 and open_dataset(str(root)).rows == 9 + 1 + 5
