"""The Spark side on a Spark Connect session (Databricks serverless / shared clusters, ``SPARK_REMOTE``):
the same guarantees as on a classic session, credentials that reach the tasks without leaking, and
the few things Connect cannot do refused before any work.

The Connect server is a real one (``connect_server``, its own process, shared by the run); its
executors have no S3 credentials of their own. Tests that hold for both kinds take ``any_spark``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from sparkbridge import etl
from sparkbridge.errors import UsageError
from sparkbridge.etl.session import SessionKind, default_parallelism, describe, session_kind
from sparkbridge.log import open_dataset

from tests.etl.helpers import leftovers, log_versions, stock_ids

pytestmark = pytest.mark.slow


def _frame(spark, lo, hi, parts):
    return spark.range(lo, hi, numPartitions=parts).selectExpr("id", "cast(id * 2 as int) AS twice")


def test_session_kind_is_told_in_one_place(spark, connect_mode):
    assert session_kind(spark) is SessionKind.CLASSIC and session_kind(connect_mode) is SessionKind.CONNECT
    assert session_kind(connect_mode.range(1)) is SessionKind.CONNECT  # a DataFrame's session counts
    assert default_parallelism(spark) == default_parallelism(connect_mode) == 2  # both local[2,4]
    assert describe(connect_mode) == connect_mode.client._builder.endpoint.join(["Spark Connect sc://", ""])


# --------------------------------------------------------------------------- partition commits, resume


def test_partition_commits_and_resume_after_a_failed_task(connect_mode, tmp_path):
    """commit="partition" on Connect (the classic session has the same in test_live_writes, with fault
    hooks a Connect server's workers cannot be given): partition 3 fails on every attempt while a marker
    file exists (upstream of the writer, in the same task), the others commit; resume writes only what
    is left."""
    any_spark = connect_mode
    out = str(tmp_path / "ds")
    marker = tmp_path / "fail-partition-3"
    marker.touch()
    path = str(marker)

    def flaky(batches):
        from pyspark import TaskContext

        for batch in batches:
            if TaskContext.get().partitionId() == 3 and os.path.exists(path):
                raise RuntimeError("partition 3 cannot be read")
            yield batch

    def frame():
        return _frame(any_spark, 1000, 1500, 5).mapInArrow(flaky, "id long, twice int")

    etl.write_mds(_frame(any_spark, 0, 100, 1), out)
    with pytest.raises(Exception, match="partition 3 cannot be read"):
        etl.write_mds(frame(), out, mode="append", commit="partition")
    (w,) = open_dataset(out).open_writes
    assert 3 not in w.partitions and len(w.partitions) >= 1
    assert sorted(stock_ids(out)) == list(range(100))  # readers still see the last complete version
    marker.unlink()
    again = etl.write_mds(frame(), out, mode="append", commit="partition", resume=True)
    assert again.job_id == w.write_id and again.rows == 500
    assert sorted(stock_ids(out)) == list(range(100)) + list(range(1000, 1500))
    assert open_dataset(out).open_writes == [] and leftovers(out) == []
    assert log_versions(out)[0] == "create" and log_versions(out)[-1] == "complete"


# --------------------------------------------------------------------------- streaming sink


def test_streaming_sink_skips_the_replayed_batch(any_spark, tmp_path):
    """mds_sink by app_id on both kinds: a crash after batch 2's commit, a restart from the
    checkpoint replays batch 2 (skipped), then 3 and 4: every row exactly once."""
    src, out, ckpt = tmp_path / "in", str(tmp_path / "ds"), str(tmp_path / "ckpt")
    src.mkdir()
    for k in range(5):
        (src / f"part-{k}.csv").write_text("id,x\n" + "".join(f"{k * 100 + i},{i / 2}\n" for i in range(100)))
    sink = etl.mds_sink(out, app_id="events", nulls="error")
    crashed = str(tmp_path / "crashed")

    def crash_after_commit_of_batch_2(df, batch_id):
        sink(df, batch_id)
        if batch_id == 2 and not os.path.exists(crashed):  # on Connect this runs next to the server
            open(crashed, "w").close()
            raise RuntimeError("driver crash after the sink's commit")

    def run(fn):
        q = (any_spark.readStream.schema("id LONG, x DOUBLE").option("header", "true")
             .option("maxFilesPerTrigger", 1).csv(str(src)).writeStream.foreachBatch(fn)
             .option("checkpointLocation", ckpt).trigger(availableNow=True).start())
        try:
            q.awaitTermination()
        finally:
            q.stop()
        return q

    with pytest.raises(Exception, match="driver crash after the sink"):
        run(crash_after_commit_of_batch_2)
    first = open_dataset(out)
    assert first.rows == 300 and first.txns == {"events": 2}
    run(sink)
    snap = open_dataset(out)
    assert snap.txns == {"events": 4}
    assert sorted(stock_ids(out)) == list(range(500))
    assert log_versions(out).count("stream") == 5  # the replay of batch 2 added nothing
    assert leftovers(out) == []


def test_sink_without_app_id_is_refused_on_connect_before_the_stream_starts(connect_mode, tmp_path):
    with pytest.raises(UsageError, match="needs app_id=.*does not expose the streaming query id"):
        etl.mds_sink(str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


# --------------------------------------------------------------------------- S3 credentials


@pytest.fixture(scope="module")
def secret_s3(tmp_path_factory):
    """A SeaweedFS server of its own whose secret key appears nowhere else, so finding it is a leak."""
    from sparkbridge.jobs.local_cluster import environment, seaweedfs_server

    secret = "sbxleak" + secrets.token_hex(12)
    access = "sbxkey" + secrets.token_hex(6)
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs-secret"), access_key=access, secret_key=secret) as server:
        with environment(server.env()):
            yield server


def _ui_texts(webui: str) -> dict[str, str]:
    """Every UI page and REST answer where a configuration, a job or a plan could show up."""
    def get(path: str) -> str:
        with urllib.request.urlopen(webui + path, timeout=10) as resp:
            return resp.read().decode("utf-8", "replace")

    apps = json.loads(get("/api/v1/applications"))
    texts = {"applications": json.dumps(apps)}
    for app in apps:
        base = f"/api/v1/applications/{app['id']}"
        for part in ("/environment", "/jobs", "/stages?details=true", "/sql?details=true&planDescription=true",
                     "/executors"):
            texts[base + part] = get(base + part)
    for page in ("/environment/", "/SQL/", "/jobs/", "/connect/"):
        try:
            texts[page] = get(page)
        except OSError:
            texts[page] = ""
    return texts


def test_s3_write_on_connect_sends_credentials_without_leaking(connect_mode, connect_server, secret_s3, tmp_path,
                                                                capsys):
    """The Connect server's executors have no credentials: the write succeeds only if the driver's
    ride with its tasks. Then the secret must be nowhere: not in the server's log (INFO), its event
    log, its UI and REST API (configuration, jobs, stages, SQL plans, the Connect tab), the plan
    string, an exception message, or the session's configuration after the write."""
    from sparkbridge.jobs.local_cluster import create_bucket

    spark = connect_mode
    secret, access = secret_s3.secret_key, secret_s3.access_key
    create_bucket(secret_s3, "connect-leak")
    url = "s3://connect-leak/ds"
    df = _frame(spark, 0, 2000, 4)
    result = etl.write_mds(df, url, commit="partition")
    assert (result.rows, result.partitions) == (2000, 4)
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(url, local=str(tmp_path / "cache"), batch_size=500)
    assert sorted(int(i) for batch in loader for i in batch["id"]) == list(range(2000))
    loader.close()
    again = etl.write_mds(_frame(spark, 5000, 5100, 2), url, mode="append")
    assert again.rows == 100

    def boom(batches):
        for _ in batches:
            raise RuntimeError("a task failure on S3")
        yield from ()

    with pytest.raises(Exception) as failed:
        etl.write_mds(df.mapInArrow(boom, "id long, twice int"), url, mode="append")
    assert "a task failure on S3" in str(failed.value)
    left = {k: v for k, v in spark.conf.getAll.items() if "sparkbridge" in k}
    assert left == {}, left  # nothing left behind in the session's configuration

    df.explain(True)
    plan = capsys.readouterr().out
    assert "Range" in plan
    places = {"plan": plan, "exception": str(failed.value) + repr(failed.value),
              "server log": Path(connect_server.log_path).read_text(errors="replace")}
    for path in sorted(Path(connect_server.event_log_dir).rglob("*")):
        if path.is_file():
            places[f"event log {path.name}"] = path.read_text(errors="replace")
    assert any(k.startswith("event log") for k in places) and "SparkListenerJobStart" in "".join(places.values())
    places.update(_ui_texts(connect_server.webui))
    assert ".secret.access.key" in places["event log " + next(k[10:] for k in places if k.startswith("event log events"))]
    for where, text in places.items():
        assert secret not in text, f"the S3 secret key leaked into {where}"
        assert access not in text, f"the S3 access key leaked into {where}"


# --------------------------------------------------------------------------- progress


def test_progress_bars_on_connect_count_the_write_tasks(connect_mode, tmp_path, capsys):
    from sparkbridge.jobs.progress import SparkProgress

    with SparkProgress(connect_mode) as bars:
        with bars.phase("write"):
            etl.write_mds(_frame(connect_mode, 0, 400, 3), str(tmp_path / "ds"))
    err = capsys.readouterr().err
    done = re.findall(r"write: 100%\|[^|]*\| (\d+)/(\d+)", err)
    assert done and done[-1][0] == done[-1][1] and int(done[-1][0]) >= 3, err[-2000:]


# --------------------------------------------------------------------------- CLI


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE")}
    full.update({"PYSPARK_PYTHON": sys.executable, **env})
    return subprocess.run([sys.executable, "-m", "sparkbridge.jobs.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300)


def test_convert_cli_runs_on_a_connect_server(connect_server, tmp_path):
    src = tmp_path / "rows.csv"
    src.write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(250)))
    done = _cli("convert", str(src), str(tmp_path / "a"), "--remote", connect_server.url, "--schema",
                "id INT, name STRING", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == 250
    via_env = _cli("convert", str(src), str(tmp_path / "b"), "--schema", "id INT, name STRING", "--json",
                   "--no-progress", SPARK_REMOTE=connect_server.url)
    assert via_env.returncode == 0, via_env.stderr[-3000:]
    assert json.loads(via_env.stdout.strip().splitlines()[-1])["rows"] == 250
    assert sorted(stock_ids(str(tmp_path / "b"))) == list(range(250))
    both = _cli("convert", str(src), str(tmp_path / "c"), "--remote", connect_server.url, "--master", "local[1]")
    assert both.returncode == 2 and "pick one" in both.stderr and "Traceback" not in both.stderr
    bad = _cli("convert", str(src), str(tmp_path / "c"), "--remote", "http://host:1")
    assert bad.returncode == 2 and "must be a Spark Connect URL" in bad.stderr


def test_demo_cli_runs_its_spark_side_on_a_connect_server(connect_server, tmp_path):
    from tests.test_quickstart import _expected

    rows = 2_000
    exp = _expected(rows)
    done = _cli("demo", "--out", str(tmp_path / "demo"), "--rows", str(rows), "--epochs", "1", "--no-progress",
                "--remote", connect_server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["master"] == f"Spark Connect {connect_server.url}"
    for key in ("rows_written", "rows_train", "rows_test", "positives_train", "positives_test"):
        assert summary[key] == exp[key], key
