"""ETL benchmark: ``etl.write_mds`` vs Mosaic's ``dataframe_to_mds`` vs Spark's ``df.write.parquet``.

One cached DataFrame of ``--rows`` rows (16 float32 + int32 + int64 columns, ``--partitions``
partitions), one warmed-up Spark session, the three writers timed in ``--rounds`` rounds with the
order rotated each round; the best time of each is reported with the ratios and the machine's
load. Both MDS writers use zstd + xxh64. Targets (issue 4, 2 cores): ≥ 10x faster than
``dataframe_to_mds`` and ≤ 1.5x Spark's Parquet write.

    python bench/etl.py [--rows 1000000] [--partitions 4] [--rounds 3] [--json out.json]
    python bench/etl.py --rows 20000 --rounds 1        # a CI-size smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _common import format_facts, machine_facts, timer, versions  # noqa: E402

FLOATS = [f"f{i:02d}" for i in range(16)]
MDS_COLUMNS = {**{f: "float32" for f in FLOATS}, "i32": "int32", "i64": "int64"}
WRITERS = ("write_mds", "dataframe_to_mds", "parquet")


def build_frame(spark, rows: int, partitions: int):
    from pyspark.sql import functions as F

    cols = [F.rand(seed=i).cast("float").alias(f) for i, f in enumerate(FLOATS)]
    df = spark.range(0, rows, numPartitions=partitions).select(
        *cols, F.col("id").cast("int").alias("i32"), (F.col("id") * 3).alias("i64"))
    df = df.cache()
    df.count()
    return df


def run_writer(name: str, df, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    if name == "write_mds":
        from sparkbridge import etl
        with timer() as t:
            result = etl.write_mds(df, str(out), compression="zstd", hashes=("xxh64",))
        return {"seconds": t[0], "rows": result.rows, "bytes": result.bytes}
    if name == "dataframe_to_mds":
        from streaming.base.converters import dataframe_to_mds

        with timer() as t:
            dataframe_to_mds(df, merge_index=True, mds_kwargs={
                "out": str(out), "columns": dict(MDS_COLUMNS), "compression": "zstd", "hashes": ["xxh64"]})
        with open(out / "index.json") as f:
            index = json.load(f)
        return {"seconds": t[0], "rows": sum(s["samples"] for s in index["shards"]),
                "bytes": sum((s["zip_data"] or s["raw_data"])["bytes"] for s in index["shards"])}
    if name == "parquet":
        with timer() as t:
            df.write.mode("overwrite").parquet(str(out))
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        return {"seconds": t[0], "rows": None, "bytes": size}
    raise ValueError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--skip", choices=WRITERS, action="append", default=[], help="leave a writer out")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.partitions <= 0 or args.rounds <= 0:
        parser.error("--rows, --partitions and --rounds must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    from pyspark.sql import SparkSession

    scratch = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sparkbridge-bench-etl-"))
    scratch.mkdir(parents=True, exist_ok=True)
    spark = (SparkSession.builder.master(args.master).appName("sparkbridge-bench-etl")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "4g")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    writers = [w for w in WRITERS if w not in args.skip]
    facts_before = machine_facts()
    try:
        df = build_frame(spark, args.rows, args.partitions)
        print(f"rows={args.rows} partitions={args.partitions} rounds={args.rounds} master={args.master}")
        print("machine:", format_facts(facts_before))
        print("versions:", format_facts(versions()))
        warm = build_frame(spark, min(args.rows, 20_000), 2)
        for name in writers:  # warm up: Python workers, JIT, imports
            run_writer(name, warm, scratch / f"warm-{name}")
        warm.unpersist()
        times: dict[str, list[float]] = {w: [] for w in writers}
        details: dict[str, dict] = {}
        for r in range(args.rounds):
            order = writers[r % len(writers):] + writers[:r % len(writers)]
            for name in order:
                res = run_writer(name, df, scratch / name)
                times[name].append(res["seconds"])
                details[name] = res
                if res["rows"] is not None and res["rows"] != args.rows:
                    raise SystemExit(f"{name} wrote {res['rows']} rows, expected {args.rows}")
                print(f"  round {r + 1}: {name:17s} {res['seconds']:7.2f} s")
        best = {w: min(t) for w, t in times.items()}
        facts_after = machine_facts()
        print("\nbest of each (seconds, rows/s, output bytes):")
        for name in writers:
            print(f"  {name:17s} {best[name]:7.2f} s  {args.rows / best[name]:12,.0f} rows/s  {details[name]['bytes']:,} B")
        ratios = {}
        if "write_mds" in best and "dataframe_to_mds" in best:
            ratios["dataframe_to_mds / write_mds"] = best["dataframe_to_mds"] / best["write_mds"]
        if "write_mds" in best and "parquet" in best:
            ratios["write_mds / parquet"] = best["write_mds"] / best["parquet"]
        targets = {"dataframe_to_mds / write_mds": (">=", 10.0), "write_mds / parquet": ("<=", 1.5)}
        print("ratios:")
        for key, value in ratios.items():
            op, goal = targets[key]
            met = value >= goal if op == ">=" else value <= goal
            print(f"  {key:30s} {value:6.2f}x  (target {op} {goal}x: {'met' if met else 'NOT met'})")
        print("load average before/after:", facts_before["load_avg"], facts_after["load_avg"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": args.rows, "partitions": args.partitions, "rounds": args.rounds,
                           "times": times, "best": best, "ratios": ratios, "machine_before": facts_before,
                           "machine_after": facts_after, "versions": versions()}, f, indent=2)
    finally:
        spark.stop()
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
