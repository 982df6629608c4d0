"""Writing to a real S3 server (SeaweedFS on 127.0.0.1): shards go straight to the bucket, a failed
attempt's uploads are removed after commit, stock ``StreamingDataset`` streams the result back."""

from __future__ import annotations

import json
import os
import time

import pytest

from sparkbridge import etl
from sparkbridge.log.layout import is_write_id
from sparkbridge.storage import open_storage

from tests.etl.helpers import arrow_batch_rows, leftovers, log_versions

pytestmark = pytest.mark.slow


def test_write_to_s3_with_a_failed_attempt_then_overwrite(spark, s3_bucket, tmp_path):
    from pyspark import TaskContext
    from streaming import StreamingDataset

    url = s3_bucket.url("datasets", "ds")
    marker = str(tmp_path / "failed-attempt-keys.json")
    env = s3_bucket.server.env()

    def flaky(batches):
        ctx = TaskContext.get()
        # ~40 KB batches: the JVM buffers 64 KB towards the writer's Python worker, so tiny batches
        # would not reach the writer before the injected failure
        for i, batch in enumerate(batches):
            yield batch
            if ctx.partitionId() == 0 and ctx.attemptNumber() == 0 and i == 4:
                os.environ.update(env)
                storage = open_storage(url)
                deadline = time.time() + 60
                keys = []
                while not keys and time.time() < deadline:  # wait for the writer's first upload
                    time.sleep(0.2)
                    keys = [k for k, _ in storage.list_files("") if "/p00000-" in k]
                with open(marker, "w") as f:
                    json.dump(keys, f)
                raise RuntimeError("injected failure on the first attempt of partition 0")

    df = (spark.range(0, 1500, numPartitions=3).selectExpr("id", "cast(id as double) / 4 AS x", "repeat('s', 800) AS pad")
          .mapInArrow(flaky, "id long, x double, pad string"))
    with arrow_batch_rows(spark, 50):
        result = etl.write_mds(df, url, shard_size="64KB")
    assert (result.rows, result.partitions, result.out) == (1500, 3, url)

    with open(marker) as f:
        failed_keys = json.load(f)
    assert failed_keys, "the failed attempt should have uploaded shards before failing"
    keys = s3_bucket.keys("datasets/ds/")
    assert not {"datasets/ds/" + k for k in failed_keys} & set(keys)
    index = json.loads(open_storage(url).read_bytes("index.json"))
    referenced = {"datasets/ds/" + s["zip_data"]["basename"] for s in index["shards"]}
    assert {k for k in keys if not k.startswith("datasets/ds/_log/")} == referenced | {
        "datasets/ds/index.json", "datasets/ds/manifest.json"}
    assert log_versions(url) == ["create", "vacuum"]  # the vacuum removed the failed attempt
    attempts = {s["zip_data"]["basename"].split("/")[1] for s in index["shards"]}
    assert sorted(a.split("-")[0] for a in attempts) == ["p00000", "p00001", "p00002"]
    assert leftovers(url) == []

    ds = StreamingDataset(remote=url, local=str(tmp_path / "cache"), batch_size=1, shuffle=False)
    ids = [int(ds[i]["id"]) for i in range(len(ds))]
    xs = {int(ds[i]["id"]): float(ds[i]["x"]) for i in range(0, len(ds), 97)}
    del ds
    assert len(ids) == 1500 and sorted(ids) == list(range(1500))
    assert all(x == k / 4 for k, x in xs.items())

    again = etl.write_mds(spark.range(10, 20, numPartitions=1).selectExpr("id", "cast(id as double) AS x"), url,
                          mode="overwrite")
    keys = s3_bucket.keys("datasets/ds/")
    jobs = {k.split("/")[2] for k in keys if is_write_id(k.split("/")[2])}
    assert jobs == {result.job_id, again.job_id}  # the old version is retained, not deleted
    manifest = json.loads(open_storage(url).read_bytes("manifest.json"))
    assert manifest["rows"] == 10 and manifest["extra"]["log_version"] == 2
    assert not [k for k in keys if "/_staging/" in k]
    assert leftovers(url) == []
