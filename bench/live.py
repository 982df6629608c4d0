"""The demo's ETL and training, sequential vs overlapped (``sparkbridge demo`` vs ``demo --live``).

    python bench/live.py [--rows 336776] [--epochs 2] [--rounds 1] [--pools 0]

Each run is a fresh ``sparkbridge demo`` process on the same machine, alternating the two modes:
sequential writes both splits (committed per job), stops Spark, then trains; overlapped commits a
partition at a time and trains on the train split as it lands (``StreamingLoader(follow=True)``).
Reported from each run's ``summary.json``: time to first batch (from the start of the write; for
the sequential run the write's whole time plus the loader's first batch), total wall time, the
seconds both ran at once, and the share of training time spent waiting for data; then the ratios
sequential / overlapped measured in this run. ``--pools 0,0.05,0.2,0.5`` runs the overlapped demo
once per mixing pool (``--follow-shuffle-rows``, as a share of the train split's rows): the time
to first batch it costs (its shuffle score is measured by ``bench/shuffle.py``). Writes
``bench-output/live.md`` and ``live.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import format_facts, machine_facts, write_report

REPO = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *, rows: int, epochs: int, live: bool, pool: int = 0) -> dict:
    cmd = [sys.executable, "-m", "sparkbridge.jobs.cli", "demo", "--out", str(out), "--rows", str(rows),
           "--epochs", str(epochs), "--no-progress"] + (["--live"] if live else [])
    if live and pool:
        cmd += ["--follow-shuffle-rows", str(pool)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_seconds"] = wall
    if not live:  # the first batch comes after the whole write, plus the loader's own first batch
        first = summary.get("first_batch_seconds") or 0.0
        summary["time_to_first_batch"] = summary["write_seconds"] + first
        summary["overlap_seconds"] = 0.0
        summary["wait_share"] = summary["loader_wait_seconds"] / summary["train_seconds"]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="flights to use (default: all 336,776)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pools", default="0",
                        help="follow_shuffle_rows of the overlapped runs, as shares of the train split, comma-separated")
    args = parser.parse_args(argv)
    rows = args.rows or 336_776
    pools = [float(p) for p in args.pools.split(",")]
    overlapped = [f"overlapped, pool {p:.0%}" if len(pools) > 1 or p else "overlapped" for p in pools]
    modes = ["sequential", *overlapped]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-live-") as tmp:
        for r in range(args.rounds):
            # the sequential run first in every round: its summary gives the train split's rows
            for i, mode in enumerate(modes if r % 2 == 0 else ["sequential", *reversed(overlapped)]):
                out = Path(tmp) / f"{i}-{r}"
                live = mode != "sequential"
                pool = 0
                if live:
                    share = pools[overlapped.index(mode)]
                    pool = int(round(share * results["sequential"][-1]["rows_train"]))
                results[mode].append(run_demo(out, rows=rows, epochs=args.epochs, live=live, pool=pool))
                s = results[mode][-1]
                print(f"round {r + 1} {mode}{f' ({pool:,} rows)' if pool else ''}: first batch "
                      f"{s['time_to_first_batch']:.1f} s, write {s['write_seconds']:.1f} s, total "
                      f"{s['total_seconds']:.1f} s, overlap {s['overlap_seconds']:.1f} s", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in results[mode])

    keys = [("time_to_first_batch", "time to first batch (s)"), ("write_seconds", "write (s)"),
            ("total_seconds", "total wall time (s)"), ("etl_seconds", "ETL (s)"), ("train_seconds", "training (s)"),
            ("overlap_seconds", "both running (s)"), ("wait_share", "training time waiting for data")]
    table = [[label, *(f"{med(m, k):.3g}" for m in modes)] for k, label in keys]
    first = overlapped[0]
    ratio_first = med("sequential", "time_to_first_batch") / med(first, "time_to_first_batch")
    ratio_total = med("sequential", "total_seconds") / med(first, "total_seconds")
    facts = machine_facts()
    print(f"\n{rows:,} flights, {args.epochs} epoch(s), median of {args.rounds} round(s) per mode")
    for row in table:
        print(f"  {row[0]:<34} " + "   ".join(f"{m} {v:>8}" for m, v in zip(modes, row[1:])))
    print(f"  first batch {ratio_first:.2f}x sooner {first}; total wall time {ratio_total:.2f}x (sequential / {first})")
    for m in overlapped:
        print(f"  {m}: first batch at {med(m, 'time_to_first_batch') / med(m, 'write_seconds'):.2f} of the write's time")
    print(format_facts(facts))
    bars = {"sequential, first batch": med("sequential", "time_to_first_batch")}
    bars.update({f"{m}, first batch": med(m, "time_to_first_batch") for m in overlapped})
    bars["sequential, total"] = med("sequential", "total_seconds")
    bars.update({f"{m}, total": med(m, "total_seconds") for m in overlapped})
    md, png = write_report(
        "live", title=f"demo ETL + training, {rows:,} flights: sequential vs overlapped",
        headers=["", *modes], rows=table, bars=bars, bar_label="seconds", facts=facts,
        notes=[f"first batch {ratio_first:.2f}x sooner; total wall time ratio {ratio_total:.2f}x (same run, "
               f"sequential / {first})",
               *(f"{m}: first batch at {med(m, 'time_to_first_batch') / med(m, 'write_seconds'):.2f} of the "
                 "write's time" for m in overlapped if m != "overlapped"),
               "pool = --follow-shuffle-rows as a share of the train split's rows"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
