"""Interleavings the dataset log must survive, with real Spark applications and a real S3 server:
three applications appending at once, a zombie attempt writing after the commit, a reader
mid-epoch across an overwrite and a vacuum, and credentials that never leak into workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparkbridge import etl
from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import DatasetNotFoundError, VersionNotFoundError
from sparkbridge.jobs.datasets import validate_dataset
from sparkbridge.log import open_dataset, vacuum

from tests.etl.commit_driver import write
from tests.etl.helpers import leftovers, log_versions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

APPEND_APP = textwrap.dedent('''
    import sys
    from pyspark.sql import SparkSession
    from sparkbridge import etl
    out, lo = sys.argv[1], int(sys.argv[2])
    spark = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    df = spark.range(lo, lo + 300, numPartitions=2).selectExpr("id", "cast(id as double) / 4 AS x")
    print("VERSION", etl.write_mds(df, out, mode="append").version, flush=True)
    spark.stop()
''')


def test_three_spark_applications_append_at_once(spark, tmp_path):
    out = str(tmp_path / "ds")
    etl.write_mds(spark.range(0, 10, numPartitions=1).selectExpr("id", "cast(id as double) / 4 AS x"), out)
    script = tmp_path / "append.py"
    script.write_text(APPEND_APP)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    env.pop("SPARKBRIDGE_FAULTS", None)
    procs = [subprocess.Popen([sys.executable, str(script), out, str(lo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(REPO), env=env) for lo in (1000, 2000, 3000)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    versions = sorted(int(o[0].split("VERSION ")[1].split()[0]) for o in outs)
    assert len(set(versions)) == 3  # each application committed its own version
    expected = list(range(10)) + [i for lo in (1000, 2000, 3000) for i in range(lo, lo + 300)]
    loader = StreamingLoader(out, batch_size=128)
    assert sorted(int(i) for b in loader for i in b["id"]) == expected
    loader.close()
    assert log_versions(out).count("append") == 3 and leftovers(out) == []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_zombie_attempt_writing_after_the_commit_changes_nothing(kind, tmp_path, request):
    from pyspark.sql import types as T

    from sparkbridge.etl.task import TaskConfig, TaskFailure, _Target
    from sparkbridge.etl.types import plan_columns
    from sparkbridge.storage import open_storage

    root = str(tmp_path / "ds") if kind == "local" else request.getfixturevalue("s3_bucket").url("ds")
    write(root, mode="error", lo=0, hi=100)
    before = open_dataset(root)
    write_id = before.writes and next(iter(before.writes))
    plans = plan_columns(T.StructType([T.StructField("id", T.LongType(), False)]))
    cfg = TaskConfig(storage=open_storage(root), job_id=write_id, plans=tuple(plans), compression=None, hashes=(),
                     shard_size=4096, nulls="error")
    # an attempt of the committed write wakes up late: it may not even start writing ...
    with pytest.raises(TaskFailure, match="already finished or was aborted|does not exist on this executor"):
        _Target(cfg, "p00000-a99").write("shard.00000.mds", b"late")
    # ... and bytes a zombie forces in anyway are an orphan: never read, reported, vacuumed
    storage = open_storage(root)
    storage.write_bytes_atomic(f"{write_id}/p00000-a99/shard.00000.mds", b"late")
    assert open_dataset(root).identity == before.identity
    report = validate_dataset(root, progress=False)
    assert report.orphans == [f"{write_id}/p00000-a99/shard.00000.mds"]  # its write is complete: no waiting
    vacuum(root)
    assert leftovers(root) == [] and validate_dataset(root, progress=False).ok


def test_a_reader_mid_epoch_across_an_overwrite_and_a_vacuum(tmp_path):
    root = str(tmp_path / "ds")
    write(root, mode="error", lo=0, hi=600)
    loader = StreamingLoader(root, batch_size=50, shuffle=True, seed=2)
    seen = []
    it = iter(loader)
    for _ in range(3):
        seen += [int(i) for i in next(it)["id"]]
    write(root, mode="overwrite", lo=5000, hi=5100)  # its own vacuum keeps version 0 (retention 1 h)
    vacuum(root)  # and so does an explicit one
    for batch in it:  # the epoch started on version 0 ends on version 0
        seen += [int(i) for i in batch["id"]]
    loader.close()
    assert sorted(seen) == list(range(600))
    assert sorted(int(i) for b in StreamingLoader(root, batch_size=50) for i in b["id"]) == list(range(5000, 5100))
    vacuum(root, retention_seconds=0)
    with pytest.raises(VersionNotFoundError, match="no longer retained"):
        StreamingLoader(root, batch_size=50, version=0)


PROBE_ENV = "AWS_SECRET_ACCESS_KEY"


def test_credentials_reach_tasks_without_leaking(spark, s3_bucket, tmp_path):
    """The shared session was started before the S3 server: its workers have no credentials of
    their own, so the write works only if the driver's reach the tasks — and after it no worker's
    environment holds them, and no task configuration shows them."""
    from sparkbridge.etl.task import TaskConfig
    from sparkbridge.storage import open_storage

    secret = os.environ[PROBE_ENV]
    url = s3_bucket.url("ds")
    result = etl.write_mds(spark.range(0, 50, numPartitions=2).selectExpr("id"), url)
    assert result.rows == 50

    def probe(batches):
        import pyarrow as pa

        for _ in batches:
            pass
        yield pa.RecordBatch.from_arrays([pa.array([os.environ.get(PROBE_ENV, "")])], ["env"])

    leaked = spark.range(0, 8, numPartitions=4).mapInArrow(probe, "env string").collect()
    assert all(r["env"] in ("", None) for r in leaked)
    storage = open_storage(url)
    cfg = TaskConfig(storage=storage, job_id="j20260101T000000-00000000", plans=(), compression=None, hashes=(),
                     shard_size=4096, nulls="error")
    import pickle

    storage.set_client_args({"aws_secret_access_key": secret})
    assert secret not in repr(cfg) and secret.encode() not in pickle.dumps(cfg)
    assert spark.sparkContext.getLocalProperty("spark.sparkbridge.s3.secret.access.key") is None  # cleared after the write
    with pytest.raises(DatasetNotFoundError):
        open_dataset(s3_bucket.url("nothing-here"))
