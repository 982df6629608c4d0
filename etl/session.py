"""Classic or Spark Connect: which kind of ``SparkSession`` we were given, and the few things that differ.

Why one module: a classic session (py4j, a ``sparkContext`` in this process) and a Spark Connect
session (``pyspark.sql.connect``: Databricks serverless and shared clusters, ``SPARK_REMOTE``,
Spark 4 thin clients; no JVM in the client) share the DataFrame API, which is all the ETL code
uses. The differences are few -- how a value rides with a job's tasks, where a streaming query's
id is found, how progress is observed -- and each is answered here once, so no caller tests
``hasattr(spark, "sparkContext")`` on its own.

Nothing here imports pyspark's Connect client at import time (it needs grpcio): the kind is read
from the session's class.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any, Iterator, Mapping, Optional

from sparkbridge.errors import UsageError

__all__ = ["SessionKind", "session_kind", "is_connect", "active_session_kind", "task_properties",
           "streaming_query_id", "default_parallelism", "describe"]


class SessionKind(str, enum.Enum):
    """The two kinds of ``SparkSession`` pyspark has."""

    CLASSIC = "classic"  # py4j: this process runs (or talks to) the driver JVM; ``sparkContext`` exists
    CONNECT = "connect"  # Spark Connect: a gRPC client of a remote driver; no ``sparkContext``

    def __str__(self) -> str:
        return self.value


def session_kind(spark: Any) -> SessionKind:
    """The kind of ``spark`` (a SparkSession; a DataFrame is accepted too: its session counts)."""
    if spark is None:
        raise UsageError("a SparkSession is needed (got None)")
    module = type(spark).__module__ or ""
    return SessionKind.CONNECT if module.startswith("pyspark.sql.connect") else SessionKind.CLASSIC


def is_connect(spark: Any) -> bool:
    """True for a Spark Connect session (or a DataFrame of one)."""
    return session_kind(spark) is SessionKind.CONNECT


def active_session_kind() -> Optional[SessionKind]:
    """The kind of this thread's active session, None when there is none (no work can have started)."""
    try:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
    except Exception:  # noqa: BLE001 - pyspark missing, or a Connect client without grpc: no session
        return None
    return None if active is None else session_kind(active)


# --------------------------------------------------------------------------- values that ride with tasks


@contextlib.contextmanager
def task_properties(spark: Any, values: Mapping[str, str]) -> Iterator[None]:
    """While the block runs, tasks of the jobs it starts read ``values`` with
    ``TaskContext.get().getLocalProperty(key)``; afterwards nothing is left behind.

    Keys must start with ``spark.`` (the way a Connect session's values reach tasks, see below) and
    should be unique to the caller: on Connect two threads of one session share what is set.

    - Classic: Spark *local properties* of this thread (``sparkContext.setLocalProperty``): they
      travel with each task of the jobs this thread starts.
    - Connect: the client has no ``sparkContext``; the values are set in the session's own
      configuration, which Spark copies into the local properties of every job it runs for that
      session (``spark.*`` keys: ``SQLExecution.withSQLConfPropagated``). A ``spark.conf.set`` is a
      configuration request, never part of a query plan.

    Either way Spark's event log records a job's properties as they are (it redacts only keys that
    are also in the application's SparkConf): a secret must not travel here in clear (see
    :mod:`sparkbridge.etl.credentials`).
    """
    for key in values:
        if not key.startswith("spark."):
            raise ValueError(f"task property {key!r} must start with 'spark.'")
    if not values:
        yield
        return
    if not is_connect(spark):
        sc = spark.sparkContext
        saved = {key: sc.getLocalProperty(key) for key in values}
        setter = sc.setLocalProperty  # None removes a property
    else:
        saved = {key: spark.conf.get(key, None) for key in values}

        def setter(key: str, value: Optional[str]) -> None:
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
    try:
        for key, value in values.items():
            setter(key, value)
        yield
    finally:
        for key, value in saved.items():
            with contextlib.suppress(Exception):  # a stopped session keeps nothing anyway
                setter(key, value)


# --------------------------------------------------------------------------- streaming, parallelism


def streaming_query_id(batch_df: Any) -> Optional[str]:
    """The id of the streaming query whose ``foreachBatch`` received ``batch_df``; None where the
    session does not expose it.

    Classic: the local property ``sql.streaming.queryId`` Spark sets on the thread that runs the
    batch. Connect: the function runs in a Python process next to the server on a cloned session
    that carries neither local properties nor the query (measured on Spark 4.x: no conf, no
    active query, no task property), so there is no id to read.
    """
    if is_connect(batch_df):
        return None
    return batch_df.sparkSession.sparkContext.getLocalProperty("sql.streaming.queryId") or None


def default_parallelism(spark: Any) -> int:
    """How many tasks Spark runs at once by default (``sparkContext.defaultParallelism``).

    Connect has no ``sparkContext``: ``spark.range`` without a partition count uses exactly that
    default for its partitions, so one tiny query answers it."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    from pyspark.sql import functions as F

    row = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p")).agg(F.max("p").alias("p")).collect()[0]
    return int(row["p"]) + 1


def describe(spark: Any) -> str:
    """``master local[2]`` or ``Spark Connect sc://host:port``: for logs and notebooks."""
    if not is_connect(spark):
        return f"master {spark.sparkContext.master}"
    endpoint = ""
    with contextlib.suppress(Exception):  # host:port only: the URL's parameters may hold a token
        endpoint = str(spark.client._builder.endpoint)
    url = f"sc://{endpoint}" if endpoint else ""
    return f"Spark Connect {url or '(remote)'}".strip()
