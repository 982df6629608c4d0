"""ETL benchmark: ``etl.write_mds`` vs Mosaic's ``dataframe_to_mds`` vs Spark's ``df.write.parquet``.

One cached DataFrame of ``--rows`` rows (16 float32 + int32 + int64 columns, ``--partitions``
partitions), one warmed-up Spark session, the three writers timed in ``--rounds`` rounds with the
order rotated each round; each writer's best and median time and rows/s are reported with the
ratios (of bests, of medians, and per round: the writers of one round ran minutes apart at most),
the machine's facts and load. Both MDS writers use zstd + xxh64. Targets (issue 11, 2 cores):
``write_mds`` ≤ 1.1x Spark's Parquet write (goal 1.0x) and ≥ 10x faster than ``dataframe_to_mds``.
Leaves ``bench-output/etl.md`` (table) and ``bench-output/etl.png`` (chart).

``--connect``: ``write_mds`` from a Spark Connect session vs from a classic session instead (issue 21:
target Connect <= 1.2x classic). Both drivers run ``--master`` with the same settings: the classic one
in this process, the Connect one in a local Connect server process (``sparkbridge.jobs.local_cluster``);
the same table is cached in each, and the two writes alternate in each round.

    python bench/etl.py [--rows 1000000] [--partitions 4] [--rounds 3] [--json out.json] [--report-dir DIR]
    python bench/etl.py --rows 20000 --rounds 1        # a CI-size smoke run
    python bench/etl.py --connect [--rows 1000000] [--rounds 3]
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

from _common import REPORT_DIR, format_facts, machine_facts, summarize, timer, versions, write_report  # noqa: E402

FLOATS = [f"f{i:02d}" for i in range(16)]
MDS_COLUMNS = {**{f: "float32" for f in FLOATS}, "i32": "int32", "i64": "int64"}
WRITERS = ("write_mds", "dataframe_to_mds", "parquet")
#: ratio name -> (numerator writer, denominator writer, comparison, target)
TARGETS = {"write_mds / parquet": ("write_mds", "parquet", "<=", 1.1),
           "dataframe_to_mds / write_mds": ("dataframe_to_mds", "write_mds", ">=", 10.0)}


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


_CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"
_SESSION_CONF = {"spark.sql.session.timeZone": "UTC", "spark.sql.execution.arrow.pyspark.enabled": "true",
                 "spark.ui.showConsoleProgress": "false"}


def _connect_mode(on: bool) -> None:
    """pyspark builds Connect columns only while the process is in Connect mode: switch per session."""
    if on:
        os.environ[_CONNECT_MODE] = "1"
    else:
        os.environ.pop(_CONNECT_MODE, None)


def run_connect(args, spark, scratch: Path, java: str) -> int:
    """``write_mds`` on a Spark Connect session vs on the classic ``spark``: alternating, same table."""
    from pyspark.sql.connect.session import SparkSession as RemoteSparkSession

    from sparkbridge import etl
    from sparkbridge.jobs.local_cluster import spark_connect_server

    conf = {**_SESSION_CONF, "spark.driver.memory": "4g"}
    facts_before = machine_facts()
    with spark_connect_server(master=args.master, conf=conf, log_dir=scratch / "connect-server") as server:
        _connect_mode(True)
        remote = RemoteSparkSession.builder.remote(server.url).getOrCreate()
        sessions = {"classic": spark, "connect": remote}
        try:
            frames, warm = {}, {}
            for kind, session in sessions.items():
                _connect_mode(kind == "connect")
                frames[kind] = build_frame(session, args.rows, args.partitions)
                warm[kind] = build_frame(session, min(args.rows, 20_000), 2)
            print(f"rows={args.rows} partitions={args.partitions} rounds={args.rounds} master={args.master} "
                  f"(classic driver in this process; Connect server {server.url})")
            print("machine:", format_facts(facts_before))
            print("versions:", format_facts({**versions(), "java": java}))
            for kind in sessions:  # warm up: Python workers, JIT, imports
                _connect_mode(kind == "connect")
                etl.write_mds(warm[kind], str(scratch / f"warm-{kind}"), mode="overwrite")
                warm[kind].unpersist()
            times: dict[str, list[float]] = {k: [] for k in sessions}
            order = list(sessions)
            for r in range(args.rounds):
                for kind in order[r % 2:] + order[:r % 2]:
                    _connect_mode(kind == "connect")
                    out = scratch / kind
                    if out.exists():
                        shutil.rmtree(out)
                    with timer() as t:
                        result = etl.write_mds(frames[kind], str(out), compression="zstd", hashes=("xxh64",))
                    if result.rows != args.rows:
                        raise SystemExit(f"{kind} wrote {result.rows} rows, expected {args.rows}")
                    times[kind].append(t[0])
                    print(f"  round {r + 1}: write_mds on {kind:8s} {t[0]:7.2f} s")
            facts_after = machine_facts()
            stats = {k: summarize(v) for k, v in times.items()}
            for kind in sessions:
                st = stats[kind]
                print(f"  {kind:8s} best {st['best']:7.2f} s  median {st['median']:7.2f} s  "
                      f"{args.rows / st['best']:12,.0f} rows/s")
            best = stats["connect"]["best"] / stats["classic"]["best"]
            median = stats["connect"]["median"] / stats["classic"]["median"]
            rounds = [a / b for a, b in zip(times["connect"], times["classic"])]
            print(f"ratio connect / classic: best {best:.2f}x  median {median:.2f}x  rounds "
                  f"[{', '.join(f'{x:.2f}' for x in rounds)}]  (target <= 1.2x: {'met' if best <= 1.2 else 'NOT met'})")
            print("load average before/after:", facts_before["load_avg"], facts_after["load_avg"])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": args.rows, "partitions": args.partitions, "rounds": args.rounds,
                               "times": times, "stats": stats, "ratio": {"best": best, "median": median},
                               "per_round": rounds, "machine_before": facts_before, "machine_after": facts_after,
                               "versions": {**versions(), "java": java}}, f, indent=2)
        finally:
            _connect_mode(True)
            remote.stop()
            _connect_mode(False)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--skip", choices=WRITERS, action="append", default=[], help="leave a writer out")
    parser.add_argument("--report-dir", default=str(REPORT_DIR), help="where etl.md and etl.png go")
    parser.add_argument("--connect", action="store_true",
                        help="compare write_mds on a Spark Connect session with a classic session instead")
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
    java = spark.sparkContext._jvm.System.getProperty("java.version")
    if args.connect:
        try:
            return run_connect(args, spark, scratch, java)
        finally:
            spark.stop()
            if not args.out:
                shutil.rmtree(scratch, ignore_errors=True)
    writers = [w for w in WRITERS if w not in args.skip]
    facts_before = machine_facts()
    try:
        df = build_frame(spark, args.rows, args.partitions)
        print(f"rows={args.rows} partitions={args.partitions} rounds={args.rounds} master={args.master}")
        print("machine:", format_facts(facts_before))
        print("versions:", format_facts({**versions(), "java": java}))
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
        facts_after = machine_facts()
        stats = {w: summarize(t) for w, t in times.items()}
        print("\neach writer (best / median of the rounds, rows/s at best, output bytes):")
        for name in writers:
            st = stats[name]
            print(f"  {name:17s} best {st['best']:7.2f} s  median {st['median']:7.2f} s  "
                  f"{args.rows / st['best']:12,.0f} rows/s  {details[name]['bytes']:,} B")
        ratios, per_round = {}, {}
        for key, (num, den, op, goal) in TARGETS.items():
            if num in times and den in times:
                ratios[key] = {"best": stats[num]["best"] / stats[den]["best"],
                               "median": stats[num]["median"] / stats[den]["median"]}
                per_round[key] = [a / b for a, b in zip(times[num], times[den])]
        print("ratios (same run):")
        for key, r in ratios.items():
            _, _, op, goal = TARGETS[key]
            met = r["best"] >= goal if op == ">=" else r["best"] <= goal
            rounds = ", ".join(f"{x:.2f}" for x in per_round[key])
            print(f"  {key:30s} best {r['best']:6.2f}x  median {r['median']:6.2f}x  rounds [{rounds}]  "
                  f"(target {op} {goal}x: {'met' if met else 'NOT met'})")
        print("load average before/after:", facts_before["load_avg"], facts_after["load_avg"])
        vers = {**versions(), "java": java}
        facts = {**facts_before, "load_avg_after": facts_after["load_avg"], **vers}
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": args.rows, "partitions": args.partitions, "rounds": args.rounds,
                           "times": times, "stats": stats, "ratios": ratios, "per_round": per_round,
                           "machine_before": facts_before, "machine_after": facts_after, "versions": vers},
                          f, indent=2)
        table = [[name, f"{stats[name]['best']:.2f}", f"{stats[name]['median']:.2f}",
                  f"{args.rows / stats[name]['best']:,.0f}", f"{args.rows / stats[name]['median']:,.0f}",
                  f"{details[name]['bytes']:,}"] for name in writers]
        notes = [f"{args.rows:,} rows (16 float32 + int32 + int64), {args.partitions} cached partitions, "
                 f"{args.rounds} rounds, order rotated each round, master {args.master}; MDS writers use zstd + xxh64"]
        for key, r in ratios.items():
            _, _, op, goal = TARGETS[key]
            notes.append(f"{key}: {r['best']:.2f}x of bests, {r['median']:.2f}x of medians, per round "
                         f"[{', '.join(f'{x:.2f}' for x in per_round[key])}] (target {op} {goal}x)")
        md, png = write_report(
            "etl", title=f"ETL write, {args.rows:,} rows: write_mds vs dataframe_to_mds vs Spark Parquet",
            headers=["writer", "best s", "median s", "rows/s (best)", "rows/s (median)", "output bytes"],
            rows=table, bars={w: stats[w]["median"] for w in writers}, bar_label="seconds (median; whiskers best..worst)",
            errors={w: (stats[w]["best"], stats[w]["worst"]) for w in writers}, facts=facts, notes=notes,
            out_dir=Path(args.report_dir))
        print(f"report: {md}" + (f", {png}" if png else ""))
    finally:
        spark.stop()
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
