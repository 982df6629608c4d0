"""Driver and metadata at scale (issue 20 item 4): 1,000 to 100,000 shards, logs of 1,000 to
10,000 entries.

    python bench/metadata.py [--shards 1000 10000 100000] [--entries 1000 10000]
                             [--shards-per-entry 10] [--spark-partitions 0] [--profile DIR]

What is built, without Spark (Spark would take hours to write 100,000 shards on 2 cores) but with
the code ``write_mds`` runs: shards by :func:`sparkbridge.etl.task.run_task` (a task's own encoder,
cutter, zstd + xxh64 sink, attempt folders under ``_staging``), commits by
:class:`sparkbridge.etl.commit.WriteJob` (the driver's ``start`` / ``finish`` / ``after_commit``:
publish, log entry, checkpoint, derived ``index.json``/``manifest.json``, vacuum) and
:func:`sparkbridge.etl.partition.commit_partition` (a task's partition commit). The log of many
entries is built with :func:`sparkbridge.log.commit.commit` and one long-lived reader (what a
write's own commits do); its entries are appends (``commit="job"``), partitioned writes (an
opening entry, one entry per partition, a ``complete``) and the checkpoints ``commit`` writes
every :data:`sparkbridge.log.snapshot.CHECKPOINT_INTERVAL` versions.

Measured, at each size (growth = time ratio / size ratio between consecutive sizes: 1.0 is
linear, below 1 sub-linear):

* ``WriteJob`` driver commit of one write of N shards: ``WriteJob()`` (reading the base version),
  ``finish`` (publish + log entry + checkpoint) and ``after_commit`` (derived files + vacuum);
* opening: ``LogReader(storage).snapshot()`` (the replay) with checkpoints and with them ignored
  (entries only), ``open_version`` (what a loader calls), ``index.json`` read + checked;
* ``StreamingLoader(...)`` build and its first batch (shuffled, batch 1024);
* ``sparkbridge validate`` (``validate_dataset``) on the dataset of N shards;
* on a log of E entries: the replay (with / without checkpoints), one more append through
  ``WriteJob`` (the driver of a ``write_mds(mode="append")``), one partition commit as a task
  does it (``commit_partition``, a fresh reader as in a Spark task).

Optionally (``--spark-partitions P``) one real ``write_mds`` through local Spark with P partitions
of tiny shards, timed with its driver-side phases. Results: ``bench/results/metadata.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_facts, machine_facts, markdown_table, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "metadata.md"
ROWS_PER_SHARD = 16


# ---------------------------------------------------------------------------------------- building


def _plans():
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    from sparkbridge.etl.types import plan_columns

    return plan_columns(StructType([StructField("id", LongType(), False), StructField("label", IntegerType(), False)]))


def _schema(plans) -> dict:
    """The schema record ``write_mds`` commits (same functions, same fingerprint)."""
    from sparkbridge.etl.commit import schema_record
    from sparkbridge.etl.types import logical_schema

    fingerprint = hashlib.sha256(json.dumps(logical_schema(plans), sort_keys=True).encode()).hexdigest()
    return schema_record(columns=[p.spec for p in plans if p.spec is not None], fingerprint=fingerprint,
                         nulls="error", compression="zstd", hashes=("xxh64",))


def _task_config(storage, plans, write_id: str, run: str, *, commit: str = "job", read_version: int = -1):
    from sparkbridge.etl.task import TaskConfig

    cfg = TaskConfig(storage=storage, job_id=write_id, plans=tuple(plans), compression="zstd", hashes=("xxh64",),
                     shard_size=1 << 20, nulls="error", commit=commit, read_version=read_version, run=run)
    # a shard_size that cuts exactly ROWS_PER_SHARD rows a shard (12 bytes a row + 4 of offset)
    config_len = len(json.dumps(cfg.config(), sort_keys=True).encode("utf-8"))
    size = 16 * ROWS_PER_SHARD + 8 + config_len
    return TaskConfig(**{**cfg.__dict__, "shard_size": size})


_next_id = [0]


def _run_task(cfg, partition: int, shards: int, attempt_id: int) -> dict:
    """One Spark task's work, in this process: ``shards`` shards of ROWS_PER_SHARD rows."""
    import numpy as np
    import pyarrow as pa

    from sparkbridge.etl.task import run_task

    n = shards * ROWS_PER_SHARD
    first = _next_id[0]
    _next_id[0] += n
    batch = pa.RecordBatch.from_arrays([pa.array(np.arange(first, first + n, dtype=np.int64)),
                                        pa.array((np.arange(n) % 7).astype(np.int32))], ["id", "label"])
    row = run_task(cfg, iter([batch]), partition=partition, task_attempt_id=attempt_id, attempt_number=0)
    if len(row["entries"]) != shards:
        raise SystemExit(f"the task cut {len(row['entries'])} shards, expected {shards}")
    return row


def _tasks_for(shards: int, per_task: int = 100) -> list[int]:
    out = [per_task] * (shards // per_task)
    if shards % per_task:
        out.append(shards % per_task)
    return out


def write_job(root: str, shards: int, *, mode: str, plans, progress=None) -> dict[str, float]:
    """One ``write_mds``-shaped write of ``shards`` shards through ``WriteJob``; returns the
    driver's phases (seconds). Tasks run in this process and are not timed."""
    from sparkbridge.etl.commit import WriteJob
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    t0 = time.perf_counter()
    job = WriteJob(storage, mode)
    t_open = time.perf_counter() - t0
    job.start()
    cfg = _task_config(storage, plans, job.write_id, job.run_id)
    tasks = []
    for p, k in enumerate(_tasks_for(shards)):
        tasks.append(_run_task(cfg, p, k, p))
        if progress is not None:
            progress.update(k)
    t0 = time.perf_counter()
    entry = job.finish(tasks, schema=_schema(plans), info={"writer": "bench/metadata.py", "partitions": len(tasks)})
    t_finish = time.perf_counter() - t0
    t0 = time.perf_counter()
    job.after_commit(retention_seconds=3600)
    t_after = time.perf_counter() - t0
    return {"open": t_open, "finish": t_finish, "after_commit": t_after, "driver": t_open + t_finish + t_after,
            "version": entry.version}


def build_log(root: str, entries: int, shards_per_entry: int, *, plans, progress=None,
              partitioned_every: int = 10, partitions: int = 8) -> dict[str, Any]:
    """A log of ``entries`` entries on one long-lived reader: appends of ``shards_per_entry``
    shards, and every ``partitioned_every``-th write a partitioned one (begin, ``partitions``
    partition entries, complete). Returns counts and the seconds of the last 200 commits vs the
    first 200 (the growth of one commit with the log's length)."""
    from sparkbridge.etl.partition import attempt_entries
    from sparkbridge.log.commit import Draft, commit
    from sparkbridge.log.entry import CommitUnit, Operation
    from sparkbridge.log.layout import new_run_id, new_write_id, staging_prefix
    from sparkbridge.log.snapshot import LogReader
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    reader = LogReader(storage)
    schema = _schema(plans)
    times: list[float] = []
    shards = 0
    writes = 0
    attempt = 0

    def timed(draft) -> Any:
        t0 = time.perf_counter()
        e = commit(storage, draft, reader=reader)
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
        return e

    def task_rows(write_id: str, run: str, n_tasks: int, per: int, *, publish: bool) -> list[dict]:
        nonlocal attempt
        os.makedirs(storage.local_path(staging_prefix(write_id)), exist_ok=True)
        cfg = _task_config(storage, plans, write_id, run)
        rows = []
        for p in range(n_tasks):
            attempt += 1
            rows.append(_run_task(cfg, p, per, attempt))
        if publish:  # what WriteJob._publish_local / partition._publish do: staging -> W/<attempt>
            os.makedirs(storage.local_path(write_id), exist_ok=True)
            for r in rows:
                os.rename(storage.local_path(f"{staging_prefix(write_id)}/{r['attempt']}"),
                          storage.local_path(f"{write_id}/{r['attempt']}"))
            shutil.rmtree(storage.local_path(staging_prefix(write_id)))
        return rows

    while len(times) < entries:
        latest = reader.refresh()
        write_id, run = new_write_id(), new_run_id()
        left = entries - len(times)
        if writes % partitioned_every == partitioned_every - 1 and left >= partitions + 2:
            begin = timed(Draft(operation=Operation.APPEND if latest.exists else Operation.CREATE,
                                commit=CommitUnit.PARTITION, write_id=write_id, read_version=latest.version,
                                schema=schema, info={"writer": "bench/metadata.py"}))
            rows = task_rows(write_id, run, partitions, shards_per_entry, publish=True)
            total = 0
            for r in rows:
                timed(Draft(operation=Operation.PARTITION, write_id=write_id, read_version=begin.version,
                            partition=r["partition"], add=tuple(attempt_entries(write_id, r)),
                            info={"attempt": r["attempt"], "rows": r["rows"]}))
                total += r["rows"]
                shards += shards_per_entry
            timed(Draft(operation=Operation.COMPLETE, write_id=write_id, read_version=begin.version, rows=total,
                        info={"partitions": partitions}))
        else:
            rows = task_rows(write_id, run, 1, shards_per_entry, publish=True)
            timed(Draft(operation=Operation.APPEND if latest.exists else Operation.CREATE, commit=CommitUnit.JOB,
                        write_id=write_id, read_version=latest.version,
                        add=tuple(e for r in rows for e in attempt_entries(write_id, r)), schema=schema,
                        rows=sum(r["rows"] for r in rows), info={"writer": "bench/metadata.py", "partitions": 1}))
            shards += shards_per_entry
        writes += 1
    from sparkbridge.log.derived import sync_derived

    sync_derived(storage, reader)  # as after_commit does (validate wants index.json)
    k = min(200, len(times) // 2)
    return {"entries": len(times), "shards": shards, "writes": writes,
            "first_commits_ms": 1000 * sum(times[:k]) / k, "last_commits_ms": 1000 * sum(times[-k:]) / k}


# ---------------------------------------------------------------------------------------- measuring


def best_of(fn: Callable[[], Any], repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Profiler:
    """cProfile around named measurements (``--profile DIR``): one .prof and a top-25 text each."""

    def __init__(self, folder: Optional[str]) -> None:
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        if self.folder is None:
            return
        prof = cProfile.Profile()
        prof.runcall(fn)
        prof.dump_stats(str(self.folder / f"{name}.prof"))
        with open(self.folder / f"{name}.txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(25)
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)


def replay(root: str, *, checkpoints: bool = True):
    from sparkbridge.log.snapshot import LogReader
    from sparkbridge.storage import open_storage

    reader = LogReader(open_storage(root))
    if not checkpoints:
        reader._load_checkpoint = lambda version: None  # entries only: the replay a checkpoint saves
    return reader.snapshot(take=True)


def read_index(root: str):
    from sparkbridge.format.index import check_index

    with open(os.path.join(root, "index.json"), "rb") as f:
        return check_index(json.loads(f.read()), where=f"{root}/index.json")


def open_version(root: str):
    from sparkbridge.bridge.source import open_version as ov, resolve_source

    return ov(resolve_source(root, None), None)


LOADER_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from sparkbridge.bridge import StreamingLoader
import streaming, torch  # noqa: F401
t1 = time.perf_counter()
loader = StreamingLoader(sys.argv[1], batch_size=1024, shuffle=True, seed=1, num_workers=0)
t2 = time.perf_counter()
batch = next(iter(loader))
t3 = time.perf_counter()
assert len(batch["id"]) == 1024, len(batch["id"])
print(json.dumps({"import": t1 - t0, "build": t2 - t1, "first": t3 - t2}))
"""


def loader_first_batch(root: str, *, tries: int = 4) -> tuple[float, float]:
    """``StreamingLoader`` build and first batch in a fresh process (imports timed apart): Mosaic's
    shared memory names collide between loaders of one process and of concurrent processes, so
    a collision with another engineer's run is retried."""
    import subprocess

    for attempt in range(tries):
        proc = subprocess.run([sys.executable, "-c", LOADER_CHILD, root], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode == 0:
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            return got["build"], got["first"]
        if "File exists" not in proc.stderr or attempt == tries - 1:
            raise SystemExit(f"the loader failed on {root}:\n{proc.stderr[-2000:]}")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def _loader_in_process(root: str) -> None:
    """For the profiler only: the same build + first batch in this process."""
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(root, batch_size=1024, shuffle=True, seed=1, num_workers=0)
    next(iter(loader))


def validate(root: str) -> None:
    from sparkbridge.jobs.datasets import validate_dataset

    report = validate_dataset(root, progress=False)
    if report.problems:
        raise SystemExit(f"validate found problems in {root}: {report.problems[:3]}")


def partition_commit_on(root: str, plans) -> float:
    """One partitioned write's first partition commit, as a Spark task makes it (fresh reader);
    the write is opened first (untimed) and left open (it is the bench's own root)."""
    from sparkbridge.etl.commit import WriteJob
    from sparkbridge.etl.partition import commit_partition
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    job = WriteJob(storage, "append")
    job.begin(schema=_schema(plans), info={"writer": "bench/metadata.py"})
    job.start()
    cfg = _task_config(storage, plans, job.write_id, job.run_id, commit="partition", read_version=job.begin_version)
    row = _run_task(cfg, 0, 1, 0)
    t0 = time.perf_counter()
    commit_partition(cfg, row)
    took = time.perf_counter() - t0
    job.abort(None)
    return took


def growth(values: list[float], sizes: list[int]) -> list[str]:
    out = ["—"]
    for i in range(1, len(values)):
        if values[i - 1] > 0:
            out.append(f"{(values[i] / values[i - 1]) / (sizes[i] / sizes[i - 1]):.2f}")
        else:
            out.append("—")
    return out


def spark_write(root: str, partitions: int) -> dict[str, float]:
    """A real ``write_mds`` through local Spark (``local[2]``): ``partitions`` partitions of
    ROWS_PER_SHARD rows, one shard each; the driver's ``WriteJob`` steps are timed by wrapping
    them (the tasks' time is the rest)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession, functions as F

    from sparkbridge.etl import commit as etl_commit
    from sparkbridge.etl import write_mds

    spent: dict[str, float] = {}
    originals = {}
    for name in ("__init__", "start", "finish", "after_commit"):
        fn = getattr(etl_commit.WriteJob, name)
        originals[name] = fn

        def wrapped(self, *a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(self, *a, **kw)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0

        setattr(etl_commit.WriteJob, name, wrapped)
    spark = (SparkSession.builder.master("local[2]").appName("bench-metadata").config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        n = partitions * ROWS_PER_SHARD
        df = spark.range(0, n, 1, numPartitions=partitions).withColumn("label", (F.col("id") % 7).cast("int"))
        t0 = time.perf_counter()
        result = write_mds(df, root, shard_size=1024)  # the smallest write_mds takes: one shard a partition
        total = time.perf_counter() - t0
    finally:
        spark.stop()
        for name, fn in originals.items():
            setattr(etl_commit.WriteJob, name, fn)
    if result.rows != n or result.partitions != partitions:
        raise SystemExit(f"write_mds wrote {result.rows} rows in {result.partitions} partitions, expected {n} in "
                         f"{partitions}")
    driver = sum(spent.values())
    return {"partitions": partitions, "shards": result.shards, "total": total, "driver": driver,
            **{f"driver_{k.strip('_')}": v for k, v in spent.items()}}


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--entries", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--shards-per-entry", type=int, default=10)
    ap.add_argument("--spark-partitions", type=int, default=0,
                    help="also run one real write_mds through local Spark with this many partitions")
    ap.add_argument("--no-loader", action="store_true", help="skip StreamingLoader (no torch/streaming import)")
    ap.add_argument("--profile", default=None, help="folder for cProfile output of the largest size")
    ap.add_argument("--tmp", default=None, help="where datasets are built (default: the system temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    plans = _plans()
    prof = Profiler(args.profile)
    facts = machine_facts()
    lines: list[str] = []

    def say(text: str) -> None:
        tqdm.write(text)
        lines.append(text)


    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-metadata-", dir=args.tmp) as tmp:
        # ---------------------------------------------------------------- N shards, one commit
        one: dict[int, dict[str, float]] = {}
        for n in args.shards:
            root = os.path.join(tmp, f"one-{n}")
            with tqdm(total=n, desc=f"{n:,} shards, one write", unit="shard", leave=False, disable=None, mininterval=2) as bar:
                driver = write_job(root, n, mode="error", plans=plans, progress=bar)
            m = {f"commit_{k}": v for k, v in driver.items() if k != "version"}
            m["replay"] = best_of(lambda: replay(root))
            m["open_version"] = best_of(lambda: open_version(root))
            m["index_json"] = best_of(lambda: read_index(root))
            m["validate"] = best_of(lambda: validate(root), repeat=1)
            if not args.no_loader:
                builds = [loader_first_batch(root) for _ in range(2)]
                m["loader_build"], m["first_batch"] = min(b[0] for b in builds), min(b[1] for b in builds)
                m["open_plus_first"] = min(b[0] + b[1] for b in builds)
            one[n] = m
            say(f"{n:>7,} shards, one write: " + ", ".join(f"{k} {v:.3f}s" for k, v in m.items()))
            if n == max(args.shards):
                prof.run(f"replay-{n}", lambda: replay(root))
                prof.run(f"open_version-{n}", lambda: open_version(root))
                prof.run(f"validate-{n}", lambda: validate(root))
                if not args.no_loader:
                    prof.run(f"loader-{n}", lambda: _loader_in_process(root))
                prof.run(f"write-{n}", lambda: write_job(os.path.join(tmp, "prof-write"), n, mode="error",
                                                          plans=plans))
            shutil.rmtree(root, ignore_errors=True)

        # ---------------------------------------------------------------- logs of E entries
        logs: dict[int, dict[str, float]] = {}
        for e in args.entries:
            root = os.path.join(tmp, f"log-{e}")
            with tqdm(total=e, desc=f"log of {e:,} entries", unit="entry", leave=False, disable=None, mininterval=2) as bar:
                built = build_log(root, e, args.shards_per_entry, plans=plans, progress=bar)
            m: dict[str, float] = dict(built)
            m["replay"] = best_of(lambda: replay(root))
            m["replay_no_checkpoint"] = best_of(lambda: replay(root, checkpoints=False))
            m["open_version"] = best_of(lambda: open_version(root))
            m["validate"] = best_of(lambda: validate(root), repeat=1)
            if not args.no_loader:
                builds = [loader_first_batch(root) for _ in range(2)]
                m["open_plus_first"] = min(b[0] + b[1] for b in builds)
            drv = write_job(root, args.shards_per_entry, mode="append", plans=plans)
            m.update({f"append_{k}": v for k, v in drv.items() if k != "version"})
            m["partition_commit"] = partition_commit_on(root, plans)
            logs[e] = m
            say(f"log of {e:>6,} entries ({built['shards']:,} shards): " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
            if e == max(args.entries):
                prof.run(f"log-replay-{e}", lambda: replay(root))
                prof.run(f"log-replay-nockpt-{e}", lambda: replay(root, checkpoints=False))
                prof.run(f"log-append-{e}", lambda: write_job(root, args.shards_per_entry, mode="append",
                                                               plans=plans))
                prof.run(f"log-validate-{e}", lambda: validate(root))
            shutil.rmtree(root, ignore_errors=True)

        spark_result = None
        if args.spark_partitions:
            say(f"write_mds through local Spark, {args.spark_partitions:,} partitions ...")
            spark_result = spark_write(os.path.join(tmp, "spark"), args.spark_partitions)
            say("write_mds: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in spark_result.items()))

    # ---------------------------------------------------------------- report
    sizes = list(one)
    keys = list(next(iter(one.values()))) if one else []
    md = ["# Driver and metadata at scale (bench/metadata.py)", "",
          f"Command: `python bench/metadata.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          f"Shards of {ROWS_PER_SHARD} rows (`id int64, label int32`, zstd, xxh64), tasks of 100 shards.", "",
          "## One write of N shards (seconds; growth: time ratio / size ratio, 1.00 = linear)", ""]
    rows = []
    for k in keys:
        vals = [one[n][k] for n in sizes]
        rows.append([k] + [f"{v:.3f}" for v in vals] + [" / ".join(growth(vals, sizes)[1:]) or "—"])
    md.append(markdown_table(["measure"] + [f"{n:,} shards" for n in sizes] + ["growth"], rows))
    if logs:
        ent = list(logs)
        lkeys = [k for k in next(iter(logs.values())) if k not in ("entries", "writes")]
        md += ["", f"## A log of E entries ({args.shards_per_entry} shards an entry; partitioned writes of 8 "
                   "partitions every 10th write; checkpoints as `commit` writes them)", ""]
        rows = []
        for k in lkeys:
            vals = [float(logs[e][k]) for e in ent]
            rows.append([k] + [f"{v:,.3f}" if k != "shards" else f"{int(v):,}" for v in vals]
                        + [" / ".join(growth(vals, ent)[1:]) or "—"])
        md.append(markdown_table(["measure"] + [f"{e:,} entries" for e in ent] + ["growth"], rows))
    if spark_result:
        md += ["", f"## One real `write_mds` through local Spark ({spark_result['partitions']:,} partitions, one shard "
                   "each)", "", markdown_table(["measure", "value"], [[k, f"{v:.3f}" if isinstance(v, float) else v]
                                                                      for k, v in spark_result.items()])]
    md += ["", "Printed lines:", "", "```", *lines, "```", "",
           "Machine: " + format_facts(facts) + "; " + format_facts(versions()), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
