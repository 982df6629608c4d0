"""The Spark session the jobs run in: the active one when there is one, else a quiet new one.

Why one place: the demo, ``sparkbridge convert`` and the notebooks all need the same things -- an
active session reused as it is (Databricks, a notebook, the tests), Spark's Python workers running
this interpreter, UTC session time, and a console that shows our progress bars and short log
instead of Spark's own progress bar and its INFO/WARN start-up chatter (``verbose=True`` keeps
Spark's own log at INFO). A local driver JVM gets a log4j2 configuration that prints errors only;
under spark-submit the driver is already running, so only the log level is set.

Spark Connect: ``remote="sc://host:port"`` (the CLI's ``--remote``) or the ``SPARK_REMOTE``
environment variable (pyspark's own convention) makes a Connect session instead; the Spark-side
code works on either (:mod:`sparkbridge.etl.session`). A Connect server owns its driver: JVM
options, Python workers and log levels are set where it runs, not here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["spark_session", "active_session", "quiet_log4j_config", "remote_url"]

log = logging.getLogger(__name__)

_LOG4J2 = """\
# sparkbridge: Spark's driver log on the console, errors only (sparkbridge -v shows INFO)
rootLogger.level = {level}
rootLogger.appenderRef.console.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{HH:mm:ss}} %p %c{{1}}: %m%n%ex
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
# a custom level for the shell's logger keeps Spark from announcing "Setting default log level"
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = {level}
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = {level}
"""


def quiet_log4j_config(level: str = "error") -> str:
    """Path of a log4j2 properties file for the driver JVM at ``level`` (written once per level)."""
    path = os.path.join(tempfile.gettempdir(), f"sparkbridge-log4j2-{level}-{os.getuid()}.properties")
    text = _LOG4J2.format(level=level)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def active_session() -> Optional["SparkSession"]:
    """The session of this thread's running SparkContext, if there is one."""
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def remote_url(remote: Optional[str] = None) -> Optional[str]:
    """The Spark Connect URL to use: ``remote`` when given, else ``SPARK_REMOTE``, else None (classic).

    Raises :class:`~sparkbridge.errors.UsageError` for a URL pyspark would refuse with its own error."""
    from sparkbridge.errors import UsageError

    url = remote if remote else os.environ.get("SPARK_REMOTE") or None
    if url is None:
        return None
    where = "--remote" if remote else "SPARK_REMOTE"
    if not (url.startswith("sc://") or url.startswith("local")):
        raise UsageError(f"{where} must be a Spark Connect URL such as sc://host:15002 (or local[N] for a server "
                         f"started in this process), got {url!r}")
    return url


def spark_session(
    master: Optional[str] = "local[*]",
    *,
    remote: Optional[str] = None,
    app_name: str = "sparkbridge",
    conf: Optional[Mapping[str, str]] = None,
    verbose: bool = False,
) -> tuple["SparkSession", bool]:
    """``(session, created)``: the active session if there is one, else a new one on ``master``
    (``None``: what spark-submit configured), or a Spark Connect session on ``remote`` /
    ``SPARK_REMOTE`` when one is given. The caller stops the session only if it created it."""
    from pyspark.sql import SparkSession

    from sparkbridge.etl.session import describe

    active = active_session()
    if active is not None:
        log.info("using the active Spark session (%s)", describe(active))
        return active, False
    settings = dict(conf or {})
    url = remote_url(remote)
    if url is not None:
        # Only session (SQL) settings make sense for a remote driver; static ones are the server's.
        if url.startswith("sc://"):
            try:
                from pyspark.sql.connect.session import SparkSession as RemoteSparkSession
            except ImportError as exc:
                from sparkbridge.errors import UsageError

                raise UsageError(f"Spark Connect needs pyspark's connect client packages (pip install "
                                 f"'pyspark[connect]': grpcio, grpcio-status, zstandard): {exc}") from None
            # as SparkSession.builder does, without its refusal when this process also has a classic context
            os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
            builder = RemoteSparkSession.builder.remote(url).appName(app_name)
        else:
            builder = SparkSession.builder.remote(url).appName(app_name)
        for key, value in {"spark.sql.session.timeZone": "UTC", **settings}.items():
            builder = builder.config(key, value)
        log.info("connecting to Spark Connect %s", url.split(";")[0])
        return builder.getOrCreate(), True
    if not os.environ.get("PYSPARK_PYTHON") and "spark.pyspark.python" not in settings:
        # Python workers must import pyarrow and sparkbridge: run them with this interpreter.
        os.environ["PYSPARK_PYTHON"] = sys.executable
        log.debug("PYSPARK_PYTHON=%s (this interpreter)", sys.executable)
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",  # our progress bars (jobs.progress) instead
    }
    launching = master is not None and not os.environ.get("PYSPARK_GATEWAY_PORT")
    if launching and master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no "hostname resolves to a loopback" warning
        # Spark's 200 shuffle partitions are for clusters; on one machine each costs a task per
        # shuffle (the flights job on 2 cores: 107 s in a notebook with 200, 40 s with 8).
        defaults["spark.sql.shuffle.partitions"] = str(max(4, 2 * (os.cpu_count() or 2)))
    if launching and not verbose and "spark.driver.extraJavaOptions" not in settings:
        defaults["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile=file:{quiet_log4j_config()}"
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    for key, value in {**defaults, **settings}.items():
        builder = builder.config(key, value)
    log.info("starting Spark (master %s)", master or "from spark-submit")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARKBRIDGE_SPARK_LOG_LEVEL", "INFO" if verbose else "ERROR"))
    return spark, True
