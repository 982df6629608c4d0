"""The demo's ETL and training, sequential vs overlapped (``sparkbridge demo`` vs ``demo --live``).

    python bench/live.py [--rows 336776] [--epochs 2] [--rounds 1]

Each run is a fresh ``sparkbridge demo`` process on the same machine, alternating the two modes:
sequential writes both splits (committed per job), stops Spark, then trains; overlapped commits a
partition at a time and trains on the train split as it lands (``StreamingLoader(follow=True)``).
Reported from each run's ``summary.json``: time to first batch (from the start of the write; for
the sequential run the write's whole time plus the loader's first batch), total wall time, the
seconds both ran at once, and the share of training time spent waiting for data; then the ratios
sequential / overlapped measured in this run. Writes ``bench-output/live.md`` and ``live.png``.
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


def run_demo(out: Path, *, rows: int, epochs: int, live: bool) -> dict:
    cmd = [sys.executable, "-m", "sparkbridge.jobs.cli", "demo", "--out", str(out), "--rows", str(rows),
           "--epochs", str(epochs), "--no-progress"] + (["--live"] if live else [])
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
    args = parser.parse_args(argv)
    rows = args.rows or 336_776
    results: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-live-") as tmp:
        for r in range(args.rounds):
            for mode in (("sequential", "overlapped") if r % 2 == 0 else ("overlapped", "sequential")):
                out = Path(tmp) / f"{mode}-{r}"
                results[mode].append(run_demo(out, rows=rows, epochs=args.epochs, live=mode == "overlapped"))
                s = results[mode][-1]
                print(f"round {r + 1} {mode}: first batch {s['time_to_first_batch']:.1f} s, total "
                      f"{s['total_seconds']:.1f} s, overlap {s['overlap_seconds']:.1f} s", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in results[mode])

    keys = [("time_to_first_batch", "time to first batch (s)"), ("total_seconds", "total wall time (s)"),
            ("etl_seconds", "ETL (s)"), ("train_seconds", "training (s)"), ("overlap_seconds", "both running (s)"),
            ("wait_share", "training time waiting for data")]
    table = [[label, f"{med('sequential', k):.3g}", f"{med('overlapped', k):.3g}"] for k, label in keys]
    ratio_first = med("sequential", "time_to_first_batch") / med("overlapped", "time_to_first_batch")
    ratio_total = med("sequential", "total_seconds") / med("overlapped", "total_seconds")
    facts = machine_facts()
    print(f"\n{rows:,} flights, {args.epochs} epoch(s), median of {args.rounds} round(s) per mode")
    for row in table:
        print(f"  {row[0]:<34} sequential {row[1]:>8}   overlapped {row[2]:>8}")
    print(f"  first batch {ratio_first:.2f}x sooner overlapped; total wall time {ratio_total:.2f}x (sequential / overlapped)")
    print(format_facts(facts))
    md, png = write_report(
        "live", title=f"demo ETL + training, {rows:,} flights: sequential vs overlapped",
        headers=["", "sequential", "overlapped (--live)"], rows=table,
        bars={"sequential, first batch": med("sequential", "time_to_first_batch"),
              "overlapped, first batch": med("overlapped", "time_to_first_batch"),
              "sequential, total": med("sequential", "total_seconds"),
              "overlapped, total": med("overlapped", "total_seconds")},
        bar_label="seconds", facts=facts,
        notes=[f"first batch {ratio_first:.2f}x sooner; total wall time ratio {ratio_total:.2f}x (same run)"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
