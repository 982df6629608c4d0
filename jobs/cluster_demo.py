"""``sparkbridge cluster-demo`` (``make cluster-demo``): the whole bridge on a real cluster, on one machine.

1. starts SeaweedFS (S3) and a Spark standalone master with two workers on 127.0.0.1, free ports;
2. runs the flights ETL with ``spark-submit jobs/flights.py`` on that cluster, writing
   ``s3://sparkbridge/flights/{train,test}``;
3. trains with ``torchrun --nproc_per_node 2 -m sparkbridge.jobs.train``, both ranks streaming their
   share from S3, then evaluates on the test split;
4. prints where each part ran (master URL, the workers that ran the executors, the S3 endpoint, the
   ranks) and stops everything -- also on Ctrl-C or a failure.

The servers are :mod:`jobs.local_cluster`, the same code the test fixtures start. Each step's output
goes to a log file under ``--workdir`` (quoted when a step fails).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sparkbridge.errors import SparkbridgeError, UsageError

__all__ = ["add_cluster_demo_arguments", "run_cluster_demo", "cluster_demo", "ClusterDemoError"]

log = logging.getLogger(__name__)

BUCKET = "sparkbridge"


class ClusterDemoError(SparkbridgeError, RuntimeError):
    """A step of the cluster demo failed; the message names the step and its log file."""


def add_cluster_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=20_000, help="first N flights (default 20,000)")
    parser.add_argument("--workers", type=int, default=2, help="Spark workers, 1 core each (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (ranks) (default 2)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--workdir", default=None,
                        help="folder for logs, raw CSVs, caches and training output (default: a temporary one, "
                             "removed at the end)")


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


def _run_step(name: str, argv: Sequence[str], *, log_path: Path, env: dict, cwd: Path, timeout: float) -> None:
    """Run one step in its own process group, output to ``log_path``; kill the whole group if this
    process is interrupted or the step overruns."""
    log.info("%s: %s (log %s)", name, " ".join(str(a) for a in argv[:6]) + (" ..." if len(argv) > 6 else ""), log_path)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=str(cwd), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            if isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise ClusterDemoError(f"{name} ran longer than {timeout:.0f} s; log {log_path}") from None
            raise
    if code != 0:
        raise ClusterDemoError(f"{name} failed with exit code {code}; log {log_path}:\n{_tail(log_path)}")


def _executors_by_worker(webui: Optional[str], app_name: str, since_ms: float) -> list[dict[str, Any]]:
    """Which worker ran which executor of the newest application called ``app_name``."""
    from sparkbridge.jobs.local_cluster import master_state, worker_executors

    if webui is None:
        return []
    state = master_state(webui)
    apps = [a for a in state.get("completedapps", []) + state.get("activeapps", [])
            if a.get("name") == app_name and a.get("starttime", 0) >= since_ms]
    if not apps:
        return []
    app_id = max(apps, key=lambda a: a.get("starttime", 0))["id"]
    out = []
    for worker in state.get("workers", []):
        execs = [e for e in worker_executors(worker["webuiaddress"]) if e.get("appid") == app_id]
        out.append({"app": app_id, "worker": worker["id"], "host": worker["host"], "port": worker["port"],
                    "executors": sorted(int(e["id"]) for e in execs)})
    return out


def cluster_demo(
    workdir: Path,
    *,
    rows: int,
    workers: int = 2,
    nproc: int = 2,
    epochs: int = 1,
    master: Optional[str] = None,
    master_webui: Optional[str] = None,
    s3: Any = None,
) -> dict[str, Any]:
    """Run the demo under ``workdir``; returns the facts it prints. Without ``master``/``s3`` it starts
    (and stops) its own cluster and S3 server; the tests pass their session's fixtures instead."""
    from sparkbridge.jobs import flights, local_cluster

    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"workdir": str(workdir)}
    with contextlib.ExitStack() as stack:
        if s3 is None:
            log.info("starting SeaweedFS (S3) on 127.0.0.1")
            s3 = stack.enter_context(local_cluster.seaweedfs_server(workdir / "s3", bucket=BUCKET))
        bucket = getattr(s3, "bucket", BUCKET)
        report["s3"] = {"endpoint": s3.endpoint_url, "bucket": bucket}
        if master is None:
            log.info("starting a Spark standalone master and %d worker(s) on 127.0.0.1", workers)
            info: dict[str, Any] = {}
            master = stack.enter_context(local_cluster.spark_standalone_cluster(
                workers, log_dir=workdir / "spark", env=s3.env(), info=info))
            master_webui = info["webui"]
        report["master"] = {"url": master, "webui": master_webui}
        root = f"s3://{bucket}/flights"
        stack.enter_context(local_cluster.environment(s3.env()))  # this process reads features.json from S3 too
        env = dict(os.environ, **s3.env(), PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable),
                   OMP_NUM_THREADS="1")

        started_ms = time.time() * 1000 - 5000
        _run_step("ETL: spark-submit jobs/flights.py", [
            local_cluster.spark_submit(), "--master", master, "--conf", "spark.ui.enabled=false",
            "--conf", "spark.executor.memory=768m", "--conf", "spark.executor.cores=1",
            "--driver-memory", "1g", flights.__file__, "--raw", workdir / "raw", "--out", root, "--rows", rows,
            "--partitions", max(2, workers),
        ], log_path=workdir / "etl.log", env=env, cwd=workdir, timeout=900)
        spec = flights.read_feature_spec(root)
        report["etl"] = {"dataset": root, "counts": spec["counts"],
                         "executors": _executors_by_worker(master_webui, "sparkbridge-flights", started_ms)}

        (port,) = local_cluster.free_ports(1)
        out = workdir / "train"
        _run_step(f"training: torchrun --nproc_per_node {nproc}", [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_addr",
            local_cluster.HOST, "--master_port", port, "-m", "sparkbridge.jobs.train",
            "--data", f"{root}/train", "--cache", workdir / "cache" / "train", "--label", spec["label"],
            "--task", "binary", "--features", ",".join(spec["categorical"] + spec["numeric"]),
            "--epochs", epochs, "--batch-size", 512, "--lr", "3e-3", "--device", "cpu", "--out", out,
            "--eval", f"{root}/test", "--eval-cache", workdir / "cache" / "test", "--no-progress",
        ], log_path=workdir / "train.log", env=env, cwd=workdir, timeout=900)
        report["train"] = json.loads((out / "summary.json").read_text())
    report["stopped"] = True
    return report


def _describe(report: dict[str, Any]) -> str:
    etl, train = report["etl"], report["train"]
    counts = etl["counts"]
    lines = ["", "sparkbridge cluster-demo", f"  S3 (SeaweedFS): {report['s3']['endpoint']}, dataset {etl['dataset']}",
             f"  Spark master: {report['master']['url']} (web UI {report['master']['webui']})"]
    for w in etl["executors"]:
        lines.append(f"  ETL executor(s) {w['executors'] or 'none'} of {w['app']} on worker {w['worker']} "
                     f"({w['host']}:{w['port']})")
    lines.append(f"  ETL: {counts['rows_source']:,} flights → {counts['rows_train']:,} train and "
                 f"{counts['rows_test']:,} test rows as MDS shards in S3")
    for r in train["ranks"]:
        lines.append(f"  training rank {r['rank']} of {r['world']}: host {r['host']}, pid {r['pid']}, {r['device']}, "
                     f"{r['batches_per_epoch']} batches/epoch streamed from S3")
    ev = train.get("eval") or {}
    lines.append(f"  trained {train['steps_this_run']} steps, {train['rows_per_s']:,.0f} rows/s over all ranks; "
                 f"test accuracy {ev.get('accuracy', float('nan')):.4f} on {ev.get('rows', 0):,} rows")
    lines.append("  stopped the Spark master, its workers and the S3 server")
    return "\n".join(lines)


def run_cluster_demo(args: argparse.Namespace) -> int:
    for name in ("rows", "workers", "nproc", "epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sparkbridge-cluster-")))
        try:
            report = cluster_demo(workdir, rows=args.rows, workers=args.workers, nproc=args.nproc, epochs=args.epochs)
        except KeyboardInterrupt:
            print("interrupted: stopped the cluster, the S3 server and every step's processes", file=sys.stderr)
            raise
        print(_describe(report))
    return 0
