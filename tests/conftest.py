"""Shared fixtures. One local Spark session for the whole run (starting one costs ~5 s).

``local[2,4]``: two cores, and a failed task is retried up to 4 times, so fault tests can make a
task fail on its first attempt inside the shared session.

``any_spark`` runs a test on both session kinds: the classic ``spark`` and ``connect_spark``, a
Spark Connect client of ONE real Connect server for the whole run (``connect_server``, its own
process on a free 127.0.0.1 port, started the first time a test asks for it: ~20-40 s on 2 busy
cores). Why a separate process: once a Python process holds a Connect session, pyspark switches
the process to Connect mode (``SPARK_CONNECT_MODE_ENABLED``: ``pyspark.sql.functions`` build
Connect columns, ``SparkSession.builder`` refuses a classic session), so the fixture turns that
mode on only for the duration of each Connect test, as a Connect-only process would have it.
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
# C1 alone reserves a 48 MB code cache; the shared session's thousands of generated classes filled it
# once in a fresh-clone run ("Out of space in CodeCache for adapters" in a pyspark.ml fit): 256 MB.
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m")


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


_CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory):
    """One Spark Connect server for the run (INFO driver log, UI and event log on, so tests can
    search them); its executors get no S3 credentials of their own."""
    from sparkbridge.jobs.local_cluster import spark_connect_server

    with spark_connect_server(log_dir=tmp_path_factory.mktemp("connect-server"), ui=True, event_log=True,
                              conf={"spark.sql.shuffle.partitions": "4",
                                    "spark.sql.execution.arrow.pyspark.enabled": "true",
                                    "spark.driver.memory": "2g"}) as server:
        yield server


@pytest.fixture(scope="session")
def connect_spark(connect_server):
    """A Spark Connect session on ``connect_server``. Use it through ``any_spark`` or ``connect_mode``."""
    from pyspark.sql.connect.session import SparkSession as RemoteSparkSession

    before = os.environ.get(_CONNECT_MODE)
    os.environ[_CONNECT_MODE] = "1"
    # the Connect builder itself: pyspark's SparkSession.builder refuses a Connect session while this
    # process holds the classic one
    session = RemoteSparkSession.builder.remote(connect_server.url).getOrCreate()
    session.range(1).collect()  # the server is ready
    if before is None:
        os.environ.pop(_CONNECT_MODE, None)  # classic tests keep working in this process
    yield session
    os.environ[_CONNECT_MODE] = "1"
    session.stop()
    if before is None:
        os.environ.pop(_CONNECT_MODE, None)


@pytest.fixture
def connect_mode(connect_spark, monkeypatch):
    """``connect_spark``, with this process in Connect mode for the test (as a Connect-only client is)."""
    monkeypatch.setenv(_CONNECT_MODE, "1")
    return connect_spark


@pytest.fixture(params=["classic", "connect"])
def any_spark(request):
    """The test runs twice: on the shared classic session and on the shared Connect session."""
    if request.param == "classic":
        return request.getfixturevalue("spark")
    return request.getfixturevalue("connect_mode")


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
