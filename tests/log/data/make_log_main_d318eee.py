# Wrote tests/log/data/log_main_d318eee/ with the code at main d318eee (before the Operation type):
# a saved log of today's format that every later sparkbridge must still read (tests/log/test_log_format.py).
# The shard sizes were later raised to what an int64 shard of that many rows takes (8 + 12 x rows; the
# index check added with issue 23 refuses a count its size cannot hold): a one-number edit per added shard.
# Run from the repository root: .venv/bin/python tests/log/data/make_log_main_d318eee.py
import sys, shutil, os
sys.path.insert(0, ".")
from tests.log.test_log import shard, wid, SCHEMA
from sparkbridge.log import Draft, commit, open_dataset
from sparkbridge.storage import open_storage
root = "tests/log/data/log_main_d318eee"
shutil.rmtree(root, ignore_errors=True)
st = open_storage(root)
def put(d): return commit(st, d)
S = lambda w, p, n: shard(f"{w}/p{p:05d}-a0/shard.00000.mds", n)
put(Draft(operation="write", mode="create", write_id=wid(1), read_version=-1, add=(S(wid(1),0,5),), schema=SCHEMA, rows=5, info={"writer": "sparkbridge.etl.write_mds", "mode": "error", "partitions": 1}))
put(Draft(operation="write", mode="append", write_id=wid(2), read_version=0, add=(S(wid(2),0,7),), schema=SCHEMA, rows=7, info={"writer": "sparkbridge.etl.write_mds", "mode": "append", "partitions": 1}))
snap = open_dataset(root)
rm = tuple(s["raw_data"]["basename"] for s in snap.shards)
put(Draft(operation="begin", mode="overwrite", write_id=wid(3), read_version=1, remove=rm, schema=SCHEMA, info={"writer": "sparkbridge.etl.write_mds", "mode": "overwrite"}))
put(Draft(operation="partition", write_id=wid(3), read_version=2, partition=0, add=(S(wid(3),0,3),), info={"attempt": "p00000-a0", "rows": 3}))
put(Draft(operation="partition", write_id=wid(3), read_version=2, partition=1, add=(S(wid(3),1,4),), info={"attempt": "p00001-a0", "rows": 4}))
put(Draft(operation="complete", write_id=wid(3), read_version=2, rows=7, info={"partitions": 2}))
put(Draft(operation="stream", write_id="s20260101T000000-00000004", read_version=5, add=(S("s20260101T000000-00000004",0,2),), schema=SCHEMA, rows=2, txn={"app_id": "q1", "batch_id": 0}, info={"writer": "sparkbridge.etl.write_mds", "mode": "append", "partitions": 1}))
put(Draft(operation="begin", mode="append", write_id=wid(5), read_version=6, schema=SCHEMA, info={"writer": "sparkbridge.etl.write_mds", "mode": "append"}))
put(Draft(operation="partition", write_id=wid(5), read_version=7, partition=0, add=(S(wid(5),0,9),), info={"attempt": "p00000-a0", "rows": 9}))
put(Draft(operation="vacuum", write_id=wid(6), read_version=8, fence=(wid(5), wid(7)), retained_from=5, info={"deleted": 0, "retention_seconds": 0}))
put(Draft(operation="begin", mode="append", write_id=wid(8), read_version=9, schema=SCHEMA, info={"writer": "sparkbridge.etl.write_mds", "mode": "append"}))
snap = open_dataset(root)
print(snap.version, snap.rows, {k: w.state for k, w in snap.writes.items()}, snap.fenced, snap.txns)
