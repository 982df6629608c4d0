"""Shuffle score of a followed epoch (training while Spark writes) vs Mosaic's global shuffle, and
the mixing pool's price in time to first batch.

    python bench/shuffle.py [--rows 200000] [--partitions 8] [--seconds 1.0]
                            [--pools 0,0.05,0.2,0.5] [--step-ms 0,60]

Spark (``local[*]``) writes ``--rows`` ids in ``--partitions`` partitions with
``write_mds(commit="partition")``, each partition slowed by ``--seconds`` per Arrow batch so that
they land over time, while ``StreamingLoader(follow=True, shuffle=True,
follow_shuffle_rows=P x rows)`` trains on them as they land: one fresh write per pool fraction
``P`` (``--pools``) and per training step cost (``--step-ms``: a sleep per batch standing in for
the model; 0 is a loader that outpaces the writer). Then the finished dataset is read by a
loader that does not follow (Mosaic's ``py1e`` shuffle, the default) and by one that does not
shuffle.

The score of an epoch is the mean distance between a row's position in the epoch and its
position in the dataset (the order an unshuffled loader reads: partitions as they were committed), divided by what a uniformly random permutation gives (N/3): 1.0 is a
global shuffle, 0.0 no shuffle at all. A followed epoch can only mix the rows that have landed, so
it scores below a global shuffle; how far below depends on how fast partitions land compared to
training, and on the pool. Time to first batch is counted from the start of the write and
compared with the write's own time. Writes ``bench-output/shuffle.md`` and ``shuffle.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import format_facts, machine_facts, write_report


def shuffle_score(ids: np.ndarray, stored: np.ndarray) -> float:
    """Mean |position in the epoch - position in the dataset| over N/3 (a random permutation's
    mean). ``stored``: the ids in dataset order (log order: partitions as they were committed)."""
    n = len(ids)
    if n < 2:
        return 0.0
    position = np.empty(int(stored.max()) + 1, dtype=np.int64)
    position[stored] = np.arange(len(stored))
    return float(np.abs(np.arange(n) - position[ids]).mean() / (n / 3))


def _slow(seconds: float):
    def slow(batches):
        for batch in batches:
            time.sleep(seconds)
            yield batch

    return slow


def epoch_ids(loader) -> np.ndarray:
    return np.concatenate([batch["id"].numpy() for batch in loader])


def _followed(spark, out: str, args, pool_rows: int, step_s: float) -> dict:
    """One write of ``args.rows`` ids landing over time, followed by a loader with a pool of
    ``pool_rows``: the epoch's ids, its first batch and its end (seconds from the write's start),
    the write's seconds, and the dataset's own order (an unshuffled read once it is finished)."""
    from sparkbridge import StreamingLoader, write_mds

    frame = (spark.range(0, args.rows, numPartitions=args.partitions)
             .mapInArrow(_slow(args.seconds), "id long"))
    box: dict = {}

    def write():
        try:
            box["result"] = write_mds(frame, out, commit="partition")
        finally:
            box["done"] = time.perf_counter()

    writer = threading.Thread(target=write)
    started = time.perf_counter()
    writer.start()
    follow = StreamingLoader(out, batch_size=args.batch_size, shuffle=True, seed=3, follow=True,
                             follow_poll=0.05, follow_shuffle_rows=pool_rows)
    parts, first = [], None
    for batch in follow:
        if first is None:
            first = time.perf_counter() - started
        parts.append(batch["id"].numpy())
        if step_s:
            time.sleep(step_s)
    ended = time.perf_counter() - started
    writer.join()
    follow.close()
    if "result" not in box:
        raise SystemExit("the Spark write failed (see its output above)")
    plain = StreamingLoader(out, batch_size=args.batch_size, shuffle=False)
    stored = epoch_ids(plain)
    plain.close()
    return {"ids": np.concatenate(parts), "first": first, "ended": ended, "write": box["done"] - started,
            "stored": stored}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0, help="delay per Arrow batch of each partition")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--pools", default="0,0.05,0.2,0.5",
                        help="follow_shuffle_rows as fractions of --rows, comma-separated")
    parser.add_argument("--step-ms", default="0,60", help="training time per batch (a sleep), comma-separated")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    pools = [float(p) for p in args.pools.split(",")]
    steps = [float(s) for s in args.step_ms.split(",")]

    from sparkbridge import StreamingLoader
    from sparkbridge.jobs.spark import spark_session

    spark, _ = spark_session("local[*]", app_name="sparkbridge-bench-shuffle")
    runs, peers = [], {}
    try:
        spark.range(0, 100, numPartitions=2).mapInArrow(_slow(0.0), "id long").collect()  # warm the workers
        with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-shuffle-") as tmp:
            from sparkbridge import write_mds

            # the first partitioned write of a session is slower (workers import the writer): not measured
            write_mds(spark.range(0, 1000, numPartitions=2).mapInArrow(_slow(0.0), "id long"),
                      str(Path(tmp) / "warm"), commit="partition")
            last = None
            for step_ms in steps:
                for frac in pools:
                    last = str(Path(tmp) / f"ds-{step_ms:g}-{frac:g}")
                    run = _followed(spark, last, args, int(round(frac * args.rows)), step_ms / 1000)
                    run.update(frac=frac, step_ms=step_ms)
                    run["score"] = shuffle_score(run["ids"], run["stored"])
                    runs.append(run)
                    print(f"follow_shuffle_rows {frac:>4.0%} of rows, step {step_ms:g} ms: shuffle score "
                          f"{run['score']:.2f}, first batch {run['first']:.1f} s of a {run['write']:.1f} s write "
                          f"({run['first'] / run['write']:.2f}), epoch done at {run['ended']:.1f} s", flush=True)
            stored = runs[-1]["stored"]
            for label, shuffle in (("global (Mosaic py1e, shuffle=True)", True), ("none (shuffle=False)", False)):
                loader = StreamingLoader(last, batch_size=args.batch_size, shuffle=shuffle, seed=3)
                t0 = time.perf_counter()
                peers[label] = (epoch_ids(loader), time.perf_counter() - t0)
                loader.close()
    finally:
        spark.stop()

    def every_row_once(ids: np.ndarray) -> str:
        return "yes" if len(ids) == args.rows and np.array_equal(np.sort(ids), np.arange(args.rows)) else "NO"

    table, bars = [], {}
    for run in runs:
        label = f"followed, pool {run['frac']:.0%}, step {run['step_ms']:g} ms"
        table.append([label, f"{run['score']:.2f}", f"{run['first']:.1f}", f"{run['write']:.1f}",
                      f"{run['first'] / run['write']:.2f}", f"{run['ended']:.1f}", every_row_once(run["ids"])])
        bars[label] = run["score"]
    for label, (ids, seconds) in peers.items():
        score = shuffle_score(ids, stored)
        table.append([label, f"{score:.2f}", "", "", "", f"{seconds:.1f} (read only)", every_row_once(ids)])
        bars[label] = score
        print(f"{label:<40} shuffle score {score:.2f}  every row once: {every_row_once(ids)}", flush=True)
    facts = machine_facts()
    print(format_facts(facts))
    md, png = write_report(
        "shuffle", title=f"shuffle score vs time to first batch, {args.rows:,} rows in {args.partitions} partitions "
                         "landing over time",
        headers=["epoch", "shuffle score", "first batch (s)", "write (s)", "first batch / write", "epoch done (s)",
                 "every row once"], rows=table, bars=bars,
        bar_label="shuffle score (1.0 = uniform random permutation)", facts=facts,
        notes=["pool = follow_shuffle_rows as a share of the rows; step = training time per batch (a sleep); "
               "seconds from the start of the write; one fresh write per row, in one run",
               f"batch {args.batch_size}, {args.seconds:g} s per Arrow batch of a partition"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
