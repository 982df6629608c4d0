"""``sparkbridge bench [etl|loader|memory|scale|live|shuffle|all] [--rows N]``: run the benchmarks in ``bench/``.

Each benchmark is a script that measures ours and its peers in one run and prints the ratios; this
command runs them one after another as child processes of the same interpreter (the venv's python),
so a benchmark's Spark JVM or DataLoader workers never share a process with another's.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sparkbridge.errors import SparkbridgeError, UsageError

__all__ = ["BENCHMARKS", "add_bench_arguments", "run_bench", "bench_command"]

log = logging.getLogger("sparkbridge.bench")

REPO = Path(__file__).resolve().parents[1]
#: name -> script under bench/
BENCHMARKS = {
    "etl": "bench/etl.py",  # write_mds vs dataframe_to_mds vs df.write.parquet
    "loader": "bench/loader.py",  # StreamingLoader vs stock Mosaic vs the in-memory bound
    "grid": "bench/grid.py",  # later epochs vs the in-memory bound over dataset x shard sizes, 0/2 workers
    "memory": "bench/memory.py",  # a bounded decoded budget vs unbounded, rows/s and RSS growth
    "scale": "bench/scale.py",  # 100 -> 10,000 shards: open, first batch, RSS, rows/s vs stock
    "order": "bench/order.py",  # shuffled epoch at 4M-32M rows: memory growth and rows/s, py1e vs global
    "first_batch": "bench/first_batch.py",  # fresh process to first batch, step by step, vs stock
    "live": "bench/live.py",  # training that follows the ETL vs ETL then training
    "shuffle": "bench/shuffle.py",  # shuffle score of a followed epoch vs a global shuffle
    "s3": "bench/s3.py",  # first epoch from a real S3 server (SeaweedFS) vs stock Mosaic
    "media": "bench/media.py",  # JPEG decode in the transform stage vs the decode bound and Mosaic
    "sequences": "bench/sequences.py",  # token sequences padded / packed vs Mosaic's per-sample path
    "peers": "bench/peers.py",  # first epoch vs Petastorm's BatchedDataLoader (installed on first use)
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="?", choices=(*BENCHMARKS, "all"), default="all",
                        help="benchmark to run (default: all)")
    parser.add_argument("--rows", type=int, default=None, help="rows to benchmark on (default: each script's own)")
    parser.add_argument("--args", dest="extra", default="", metavar="'OPTS'",
                        help="further options for the script(s), one quoted string, e.g. --args '--repeats 1'")


def bench_command(name: str, *, rows: Optional[int] = None, extra: Sequence[str] = ()) -> list[str]:
    """The argv that runs benchmark ``name`` with this interpreter."""
    script = REPO / BENCHMARKS[name]
    argv = [sys.executable, str(script)]
    if rows is not None:
        argv += ["--rows", str(rows)]
    return argv + list(extra)


def run_bench(args: argparse.Namespace) -> int:
    if args.rows is not None and args.rows <= 0:
        raise UsageError(f"--rows must be positive, got {args.rows}")
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    failed = []
    for name in names:
        script = REPO / BENCHMARKS[name]
        if not script.exists():
            raise FileNotFoundError(f"{script} does not exist: `sparkbridge bench` runs from a source checkout "
                                    "(the benchmarks are not installed with the package)")
        argv = bench_command(name, rows=args.rows, extra=shlex.split(args.extra or ""))
        log.info("running %s: %s", name, " ".join(argv))
        started = time.perf_counter()
        code = subprocess.call(argv, cwd=str(REPO), env=env)
        log.info("%s finished in %.1f s with exit code %d", name, time.perf_counter() - started, code)
        if code != 0:
            failed.append(name)
    if failed:
        raise SparkbridgeError(f"benchmark(s) failed: {', '.join(failed)} (their output is above)")
    return 0
