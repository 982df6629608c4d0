"""Shuffle score of a followed epoch (training while Spark writes) vs Mosaic's global shuffle.

    python bench/shuffle.py [--rows 200000] [--partitions 8] [--seconds 1.0]

Spark (``local[*]``) writes ``--rows`` ids in ``--partitions`` partitions with
``write_mds(commit="partition")``, each partition slowed by ``--seconds`` so that they land over
time, while ``StreamingLoader(follow=True, shuffle=True)`` trains on them as they land. Then the
finished dataset is read by a loader that does not follow (Mosaic's ``py1e`` shuffle, the default)
and by one that does not shuffle.

The score of an epoch is the mean distance between a row's position in the epoch and its
position in the dataset (the order an unshuffled loader reads: partitions as they were committed), divided by what a uniformly random permutation gives (N/3): 1.0 is a
global shuffle, 0.0 no shuffle at all. A followed epoch can only mix the rows that have landed, so
it scores below a global shuffle; how far below depends on how fast partitions land compared to
training. Writes ``bench-output/shuffle.md`` and ``shuffle.png``.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0, help="delay per Arrow batch of each partition")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    from sparkbridge import StreamingLoader, write_mds
    from sparkbridge.jobs.spark import spark_session

    spark, _ = spark_session("local[*]", app_name="sparkbridge-bench-shuffle")
    results = {}
    try:
        spark.range(0, 100, numPartitions=2).mapInArrow(_slow(0.0), "id long").collect()  # warm the workers
        with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-shuffle-") as tmp:
            out = str(Path(tmp) / "ds")
            frame = (spark.range(0, args.rows, numPartitions=args.partitions)
                     .mapInArrow(_slow(args.seconds), "id long"))
            box: dict = {}
            writer = threading.Thread(target=lambda: box.update(result=write_mds(frame, out, commit="partition")))
            started = time.perf_counter()
            writer.start()
            follow = StreamingLoader(out, batch_size=args.batch_size, shuffle=True, seed=3, follow=True,
                                     follow_poll=0.05)
            ids = epoch_ids(follow)
            followed_s = time.perf_counter() - started
            writer.join()
            follow.close()
            if "result" not in box:
                raise SystemExit("the Spark write failed (see its output above)")
            results["followed (shuffle=True, follow=True)"] = (ids, followed_s)
            for label, shuffle in (("global (Mosaic py1e, shuffle=True)", True), ("none (shuffle=False)", False)):
                loader = StreamingLoader(out, batch_size=args.batch_size, shuffle=shuffle, seed=3)
                t0 = time.perf_counter()
                results[label] = (epoch_ids(loader), time.perf_counter() - t0)
                loader.close()
    finally:
        spark.stop()

    stored = results["none (shuffle=False)"][0]  # unshuffled: the dataset's own order
    table, bars = [], {}
    for label, (ids, seconds) in results.items():
        complete = len(ids) == args.rows and np.array_equal(np.sort(ids), np.arange(args.rows))
        score = shuffle_score(ids, stored)
        table.append([label, f"{score:.2f}", f"{len(ids):,}", "yes" if complete else "NO", f"{seconds:.1f}"])
        bars[label] = score
        print(f"{label:<40} shuffle score {score:.2f}  rows {len(ids):,}  every row once: {complete}", flush=True)
    followed = shuffle_score(results["followed (shuffle=True, follow=True)"][0], stored)
    glob = shuffle_score(results["global (Mosaic py1e, shuffle=True)"][0], stored)
    print(f"followed / global shuffle score: {followed / glob:.2f}")
    facts = machine_facts()
    print(format_facts(facts))
    md, png = write_report(
        "shuffle", title=f"shuffle score, {args.rows:,} rows in {args.partitions} partitions landing over time",
        headers=["epoch", "shuffle score", "rows", "every row once", "seconds"], rows=table, bars=bars,
        bar_label="shuffle score (1.0 = uniform random permutation)", facts=facts,
        notes=[f"followed / global: {followed / glob:.2f} (same run); the followed epoch's seconds include "
               "waiting for the write"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
