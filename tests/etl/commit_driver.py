"""A Spark-free write for crash tests, run as its own process so a fault hook can kill it.

It runs the executor-side writer (:func:`sparkbridge.etl.task.run_task`) on plain Arrow batches and
then exactly the driver-side commit code ``write_mds`` runs after its tasks (``WriteJob.finish`` and
``after_commit``). Every crash point of the commit lies in that code, so killing this process at a
point is the same crash as killing a Spark driver there, at a fraction of the cost of a JVM.

    python -m tests.etl.commit_driver ROOT MODE LO HI [--partitions N] [--retention S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys


def write(root: str, *, mode: str, lo: int, hi: int, partitions: int = 2, retention: float = 3600.0) -> int:
    import pyarrow as pa
    from pyspark.sql import types as T

    from sparkbridge.etl.commit import WriteJob, schema_record
    from sparkbridge.etl.task import TaskConfig, run_task
    from sparkbridge.etl.types import logical_schema, plan_columns
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    job = WriteJob(storage, mode)
    plans = plan_columns(T.StructType([T.StructField("id", T.LongType(), False),
                                       T.StructField("x", T.DoubleType(), False)]))
    fingerprint = hashlib.sha256(json.dumps(logical_schema(plans), sort_keys=True).encode()).hexdigest()
    schema = schema_record(columns=[p.spec for p in plans], fingerprint=fingerprint, nulls="error",
                           compression="zstd", hashes=("xxh64",))
    job.start()
    cfg = TaskConfig(storage=storage, job_id=job.write_id, plans=tuple(plans), compression="zstd",
                     hashes=("xxh64",), shard_size=4096, nulls="error")
    tasks = []
    bounds = [lo + (hi - lo) * p // partitions for p in range(partitions + 1)]
    try:
        for p in range(partitions):
            ids = list(range(bounds[p], bounds[p + 1]))
            batch = pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), pa.array([i / 4 for i in ids], pa.float64())],
                                               ["id", "x"])
            tasks.append(run_task(cfg, iter([batch]), partition=p, task_attempt_id=100 + p, attempt_number=0))
        entry = job.finish(tasks, schema=schema, info={"writer": "tests.etl.commit_driver"})
    except BaseException as exc:
        job.abort(exc)
        raise
    job.after_commit(retention_seconds=retention)
    return entry.version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("mode")
    parser.add_argument("lo", type=int)
    parser.add_argument("hi", type=int)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--retention", type=float, default=3600.0)
    args = parser.parse_args(argv)
    version = write(args.root, mode=args.mode, lo=args.lo, hi=args.hi, partitions=args.partitions,
                    retention=args.retention)
    print(f"COMMITTED {version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
