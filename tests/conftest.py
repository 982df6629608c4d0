"""Shared fixtures. One local Spark session for the whole run (starting one costs ~5 s).

``local[2,4]``: two cores, and a failed task is retried up to 4 times, so fault tests can make a
task fail on its first attempt inside the shared session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Real servers (SeaweedFS S3, a standalone Spark cluster) live in their own plugin module.
pytest_plugins = ["tests.fixtures_servers"] if (REPO / "tests" / "fixtures_servers.py").exists() else []

# Spark's Python workers must run this interpreter (the venv's), or imports fail inside tasks.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Every JVM of the run (the session below, CLI subprocesses, spark-submit, cluster daemons and their
# executors) compiles with C1 only: the tests run many short Spark jobs, for which C2's compile
# work on 2 cores costs more than it saves (measured: a local session starts in 8 s instead of 17,
# the flights features in 13 s instead of 25-31). Long jobs and benchmarks keep the default JIT.
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2,4]")
        .appName("sparkbridge-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _release_stock_datasets(monkeypatch):
    """Release the shared memory of every stock ``StreamingDataset`` a test made.

    Mosaic keeps each segment (one file descriptor) until interpreter exit, and every new dataset
    re-opens those of the live ones, so a long test session would run out of descriptors."""
    import streaming

    from sparkbridge.bridge.distributed import release_shared_memory

    made = []
    original = streaming.StreamingDataset.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(streaming.StreamingDataset, "__init__", tracking_init)
    yield
    for ds in made:
        release_shared_memory(ds)
