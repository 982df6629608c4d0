"""A Structured Streaming ETL: a folder of CSV files → an MDS dataset, a micro-batch at a time.

    spark-submit jobs/stream.py --input landing/ --output s3://bucket/events \\
        --schema "id LONG, x DOUBLE" --checkpoint ckpt/ [--trigger 10s | --available-now]

New files dropped into ``--input`` are picked up by Spark's file source; each micro-batch is
appended to the dataset exactly once by :func:`sparkbridge.etl.mds_sink` (a crash and restart
from ``--checkpoint`` replays the last batch, which the sink recognises and skips). A trainer with
``StreamingLoader(OUTPUT, follow=True, follow_idle_timeout=...)`` trains on batches as they land.
``--available-now`` processes what is there and stops (a backfill, or a test); otherwise the job
runs until ``--stop-after-idle`` seconds pass with no new file, or until it is interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

__all__ = ["build_parser", "run_stream", "main"]

log = logging.getLogger("sparkbridge.stream")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-submit jobs/stream.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder watched for new CSV files")
    parser.add_argument("--output", required=True, help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--schema", required=True, help="CSV schema as DDL, e.g. 'id LONG, x DOUBLE' (streams need one)")
    parser.add_argument("--checkpoint", required=True, help="Spark's checkpoint folder (keep it to restart exactly once)")
    parser.add_argument("--app-id", default=None, help="a stable name for the stream (default: Spark's query id)")
    parser.add_argument("--trigger", default="5s", help="micro-batch interval, e.g. 5s or 1m (default 5s)")
    parser.add_argument("--available-now", action="store_true", help="process the files there now, then stop")
    parser.add_argument("--max-files-per-trigger", type=int, default=None, help="files per micro-batch")
    parser.add_argument("--stop-after-idle", type=float, default=None, metavar="SECONDS",
                        help="stop once no micro-batch had rows for this long (default: run until interrupted)")
    parser.add_argument("--nulls", choices=("error", "fill", "mask"), default="error")
    parser.add_argument("--compression", default="zstd")
    parser.add_argument("--shard-size", default="64MB")
    parser.add_argument("--master", default=None, help="override spark-submit's master (e.g. local[2])")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_stream(args: argparse.Namespace) -> int:
    from sparkbridge.etl import mds_sink
    from sparkbridge.jobs.etl import build_session

    if args.max_files_per_trigger is not None and args.max_files_per_trigger < 1:
        print("error: --max-files-per-trigger must be at least 1", file=sys.stderr)
        return 2
    spark = build_session(master=args.master, conf={}, app_name="sparkbridge-stream")
    last_rows = {"at": time.monotonic(), "rows": 0, "batches": 0}

    def progress(result) -> None:
        last_rows["batches"] += 1
        if result.rows:
            last_rows["at"] = time.monotonic()
            last_rows["rows"] += result.rows
        log.info("micro-batch %d: %s; %d rows so far", last_rows["batches"],
                 "replayed, skipped" if result.skipped else f"{result.rows} rows", last_rows["rows"])

    compression = None if str(args.compression).lower() == "none" else args.compression
    sink = mds_sink(args.output, app_id=args.app_id, on_batch=progress, nulls=args.nulls, compression=compression,
                    shard_size=args.shard_size)
    reader = spark.readStream.schema(args.schema).option("header", "true")
    if args.max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", args.max_files_per_trigger)
    writer = reader.csv(args.input).writeStream.foreachBatch(sink).option("checkpointLocation", args.checkpoint)
    writer = writer.trigger(availableNow=True) if args.available_now else writer.trigger(processingTime=args.trigger)
    query = writer.start()
    log.info("streaming %s → %s (query %s)", args.input, args.output, query.id)
    failure: Optional[BaseException] = None
    try:
        if args.available_now or args.stop_after_idle is None:
            query.awaitTermination()
        else:
            while query.isActive and time.monotonic() - last_rows["at"] < args.stop_after_idle:
                query.awaitTermination(1.0)
    except KeyboardInterrupt:
        log.info("interrupted: stopping the query (a restart from %s continues exactly once)", args.checkpoint)
    except Exception as exc:  # the query failed: one line, the checkpoint lets a restart continue
        failure = exc
    finally:
        query.stop()
        spark.stop()
    if failure is not None:
        message = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        print(f"error: the stream stopped: {message} (restart with the same --checkpoint to continue exactly "
              "once)", file=sys.stderr)
        return 1
    print(f"streamed {last_rows['rows']:,} rows in {last_rows['batches']} micro-batch(es) to {args.output}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_stream(args)


if __name__ == "__main__":  # spark-submit jobs/stream.py
    sys.exit(main())
