"""Fault injection with exact row accounting: every source id exactly once, no attempt mixed in.

- a task that fails on its first attempt after writing shards (shared ``local[2,4]`` session);
- speculative execution: Spark never launches a speculative copy on the host of the original, so
  this test starts a real standalone master with two workers registered under two host names
  (``127.0.0.1`` and ``localhost``) and a job with ``spark.speculation=true`` and one slow attempt;
- SIGKILL of a whole driver process group mid-write: the previous version stays intact and
  readable, a rerun succeeds, and a vacuum fences the dead write and removes its leftovers.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparkbridge import etl
from sparkbridge.log import vacuum
from sparkbridge.storage import open_storage

from tests.etl.helpers import arrow_batch_rows, leftovers, log_versions, stock_ids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _index(path: str) -> dict:
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)


def _folders_by_partition(index: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for shard in index["shards"]:
        job, attempt, _ = shard["zip_data"]["basename"].split("/")
        out.setdefault(attempt.split("-")[0], set()).add(f"{job}/{attempt}")
    return out


def test_task_failing_on_its_first_attempt(spark, tmp_path):
    from pyspark import TaskContext

    out = str(tmp_path / "ds")
    marker = str(tmp_path / "failed-attempt-files.json")

    def flaky(batches):
        ctx = TaskContext.get()
        for i, batch in enumerate(batches):
            yield batch
            if ctx.partitionId() == 1 and ctx.attemptNumber() == 0 and i == 5:
                deadline = time.time() + 60
                files = []
                while not files and time.time() < deadline:  # wait for the writer's first shard
                    time.sleep(0.1)
                    files = glob.glob(os.path.join(out, "_staging", "*", "p00001-*", "shard.*"))
                with open(marker, "w") as f:
                    json.dump(files, f)
                raise RuntimeError("injected failure on the first attempt of partition 1")

    # ~50 KB batches: a Python worker's output is buffered (64 KB), so small batches would not reach
    # the writer before the injected failure
    df = spark.range(0, 2000, numPartitions=4).selectExpr("id", "repeat('x', 1000) AS pad").mapInArrow(
        flaky, "id long, pad string")
    with arrow_batch_rows(spark, 50):
        result = etl.write_mds(df, out, shard_size="64KB")
    assert result.rows == 2000 and result.partitions == 4
    with open(marker) as f:
        failed_files = json.load(f)
    assert failed_files, "the failing attempt should have written shards before it failed"
    assert not any(os.path.exists(p) for p in failed_files)
    ids = stock_ids(out)
    assert len(ids) == 2000 and sorted(ids) == list(range(2000))
    folders = _folders_by_partition(_index(out))
    assert sorted(folders) == ["p00000", "p00001", "p00002", "p00003"]
    assert all(len(v) == 1 for v in folders.values())  # one accepted attempt per partition
    failed_attempt = failed_files[0].split(os.sep)[-2]
    assert f"{result.job_id}/{failed_attempt}" not in folders["p00001"]
    assert not os.path.exists(os.path.join(out, "_staging"))
    assert leftovers(out) == []


# --------------------------------------------------------------------------- speculation

SPECULATIVE_JOB = textwrap.dedent('''
    import json, os, sys, time
    from pyspark.sql import SparkSession
    from sparkbridge import etl
    master, out, markers, commit = sys.argv[1:5]
    spark = (SparkSession.builder.master(master).appName("h1-speculation")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
             .config("spark.executor.memory", "512m").config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "50")
             .config("spark.speculation", "true").config("spark.speculation.interval", "100ms")
             .config("spark.speculation.multiplier", "1.5").config("spark.speculation.quantile", "0.5")
             .config("spark.speculation.minTaskRuntime", "500ms").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")

    def slow(batches):
        from pyspark import TaskContext
        ctx = TaskContext.get()
        name = f"p{ctx.partitionId()}-n{ctx.attemptNumber()}-t{ctx.taskAttemptId()}"
        open(os.path.join(markers, name), "w").close()
        for i, batch in enumerate(batches):
            yield batch
            if ctx.partitionId() == 1 and ctx.attemptNumber() == 0 and i == 2:
                time.sleep(8)  # the original attempt stalls after writing some shards

    df = (spark.range(0, 2000, numPartitions=4).selectExpr("id", "repeat(cast(id as string), 300) AS s")
          .mapInArrow(slow, "id long, s string"))
    result = etl.write_mds(df, out, shard_size="64KB", commit=commit)
    print("RESULT " + json.dumps(result.to_dict()), flush=True)
    spark.stop()
''')


@contextlib.contextmanager
def _two_host_cluster(base: Path):
    """A master and two 1-core workers that Spark sees as different hosts."""
    from sparkbridge.jobs.local_cluster import _master_state, _poll, _spawn, _stop, free_ports, spark_home

    home = spark_home()
    spark_class = str(Path(home) / "bin" / "spark-class")
    env = dict(os.environ, SPARK_HOME=home, SPARK_DAEMON_MEMORY="256m", SPARK_LOG_DIR=str(base),
               PYSPARK_PYTHON=sys.executable)
    env.pop("SPARK_CONF_DIR", None)
    master_port, master_ui, *worker_ui = free_ports(4)
    web = f"http://127.0.0.1:{master_ui}"
    procs = []
    try:
        procs.append(_spawn("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host",
                                       "127.0.0.1", "--port", str(master_port), "--webui-port", str(master_ui)],
                            log_path=base / "master.log", env=dict(env, SPARK_LOCAL_IP="127.0.0.1"), cwd=base))
        _poll("spark master", lambda: _master_state(web).get("status") == "ALIVE", timeout=90, procs=procs)
        for i, host in enumerate(("127.0.0.1", "localhost")):
            work = base / f"worker-{i}"
            work.mkdir()
            procs.append(_spawn(f"worker {host}", [
                spark_class, "org.apache.spark.deploy.worker.Worker", "--host", host, "--cores", "1",
                "--memory", "1g", "--webui-port", str(worker_ui[i]), "--work-dir", str(work),
                f"spark://127.0.0.1:{master_port}"], log_path=base / f"worker-{i}.log", env=env, cwd=base))
        _poll("two spark workers", lambda: sum(w.get("state") == "ALIVE" for w in _master_state(web).get("workers", [])) >= 2,
              timeout=90, procs=procs)
        yield f"spark://127.0.0.1:{master_port}"
    finally:
        _stop(procs)


def test_speculative_attempts_are_never_mixed_in(tmp_path):
    """Both commit modes on one cluster: per job (the driver keeps one attempt per partition) and
    per partition (the first attempt to claim a partition wins; the stalled one adds nothing)."""
    script = tmp_path / "job.py"
    script.write_text(SPECULATIVE_JOB)
    (tmp_path / "cluster").mkdir()
    runs = {}
    with _two_host_cluster(tmp_path / "cluster") as master:
        for commit in ("job", "partition"):
            out, markers = str(tmp_path / f"ds-{commit}"), tmp_path / f"markers-{commit}"
            markers.mkdir()
            proc = subprocess.run([sys.executable, str(script), master, out, str(markers), commit], capture_output=True,
                                  text=True, timeout=240, cwd=str(REPO), env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[commit] = (out, markers, json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]))
        time.sleep(1.0)
    for commit, (out, markers, result) in runs.items():
        attempts = sorted(os.listdir(markers))
        assert any(m.startswith("p1-n1-") for m in attempts), f"{commit}: no speculative attempt was launched: {attempts}"
        assert result["rows"] == 2000
        ids = stock_ids(out)
        assert len(ids) == 2000 and sorted(ids) == list(range(2000)), commit
        folders = _folders_by_partition(_index(out))
        assert all(len(v) == 1 for v in folders.values()) and len(folders) == 4
        (p1,) = folders["p00001"]
        tid_of = {m.split("-n")[1].split("-t")[0]: m.split("-t")[1] for m in attempts if m.startswith("p1-")}
        assert p1.endswith(f"-a{tid_of['1']}")  # the fast speculative copy won; the stalled one did not
        assert not os.path.exists(os.path.join(out, "_staging"))
        assert leftovers(out) == [], commit
    assert log_versions(runs["partition"][0]) == ["create (per partition)"] + ["partition"] * 4 + ["complete"]


# --------------------------------------------------------------------------- SIGKILL

KILLED_JOB = textwrap.dedent('''
    import sys, time
    from pyspark.sql import SparkSession
    from sparkbridge import etl
    out = sys.argv[1]
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "20").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    etl.write_mds(spark.range(0, 200, numPartitions=2).selectExpr("id", "id * 3 AS x"), out)
    print("V1", flush=True)

    def slow(batches):
        for batch in batches:
            time.sleep(0.1)
            yield batch

    df = (spark.range(1000, 5000, numPartitions=2).selectExpr("id", "id * 3 AS x", "repeat('p', 500) AS pad")
          .mapInArrow(slow, "id long, x long, pad string"))
    etl.write_mds(df, out, mode="overwrite", shard_size="32KB")
    print("V2", flush=True)
''')


def test_sigkill_mid_write_keeps_the_previous_version(spark, tmp_path):
    out = str(tmp_path / "ds")
    script = tmp_path / "job.py"
    script.write_text(KILLED_JOB)
    proc = subprocess.Popen([sys.executable, str(script), out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=str(REPO), start_new_session=True,
                            env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
    try:
        assert proc.stdout.readline().strip() == "V1"
        with open(os.path.join(out, "index.json"), "rb") as f:
            v1_sha = hashlib.sha256(f.read()).hexdigest()
        deadline = time.time() + 120
        while time.time() < deadline and len(glob.glob(os.path.join(out, "_staging", "*", "p*", "shard.*"))) < 4:
            time.sleep(0.05)
        staged = glob.glob(os.path.join(out, "_staging", "*", "p*", "shard.*"))
        assert len(staged) >= 4, "the second write never started writing shards"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and the Python workers
        proc.wait(timeout=30)
    time.sleep(0.5)
    assert proc.returncode == -signal.SIGKILL
    with open(os.path.join(out, "index.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == v1_sha  # nothing half-committed
    assert sorted(stock_ids(out)) == list(range(200))
    dead = leftovers(out)
    assert dead and all(p.startswith("_staging/") for p in dead)  # the dead job's staging

    result = etl.write_mds(spark.range(7000, 7100, numPartitions=2).selectExpr("id", "id * 3 AS x"), out,
                           mode="overwrite")
    assert result.rows == 100
    assert sorted(stock_ids(out)) == list(range(7000, 7100))
    assert leftovers(out) == dead  # the dead write stopped less than the retention window ago: kept
    plan = vacuum(out, retention_seconds=0)  # no liveness check: it is fenced, then its files go
    assert plan.fence == [dead[0].split("/")[1]] and set(dead) <= set(plan.delete)
    # with no retention the replaced first version goes too (with the raw shards stock Mosaic unpacked)
    replaced = set(plan.delete) - set(dead)
    assert replaced and len({p.split("/")[0] for p in replaced}) == 1
    assert {p.split("/")[0] for p in replaced}.isdisjoint({result.job_id, plan.fence[0]})
    assert leftovers(out) == [] and not os.path.exists(os.path.join(out, "_staging"))
    assert log_versions(out) == ["create", "overwrite", "vacuum"]
    assert sorted(stock_ids(out)) == list(range(7000, 7100))
