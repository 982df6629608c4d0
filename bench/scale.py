"""Many shards: open time, first batch, peak RSS and a shuffled epoch, ours vs stock Mosaic.

    python bench/scale.py [--rows 1000000] [--shards 100 1000 10000]

For each shard count the same rows (18 fixed-width columns, zstd, xxh64) are written into that
many shards, then each reader runs in a fresh child process: ``StreamingLoader`` (shuffled, batch
1024, one whole epoch) and stock ``StreamingDataset`` + ``DataLoader`` (shuffled; timed on its
first batches only — a whole epoch of it takes minutes); ours also reads a second epoch. Reported per reader: seconds to import
it, to build it (ours imports torch and Mosaic's dataset lazily, there), to its first batch (after building it, and from the start of the process), peak
RSS, rows/s; then ours / stock in the same run. Writes
``bench-output/scale.md`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import format_facts, machine_facts, write_report
from loader import write_dataset

CHILD = r"""
import json, resource, sys, time
kind, path, cache, max_batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
if kind == "ours":
    from sparkbridge.bridge import StreamingLoader
else:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
t_import = time.perf_counter()
if kind == "ours":
    it_src = StreamingLoader(path, batch_size=1024, shuffle=True, seed=1)
else:
    it_src = DataLoader(StreamingDataset(remote=path, local=cache, batch_size=1024, shuffle=True, shuffle_seed=1),
                        batch_size=1024, num_workers=0)
t_built = time.perf_counter()
it = iter(it_src)
first = next(it)
t_first = time.perf_counter()
rows, batches, t1 = len(first["i32"]), 1, time.perf_counter()
for batch in it:
    rows += len(batch["i32"])
    batches += 1
    if max_batches and batches >= max_batches:
        break
elapsed = time.perf_counter() - t1
later = 0.0
if kind == "ours":  # a second epoch: the shards are decoded in memory now
    t2, n2 = time.perf_counter(), 0
    for batch in it_src:
        n2 += len(batch["i32"])
    later = n2 / (time.perf_counter() - t2)
print(json.dumps({"later_rows_per_s": later, "import_s": t_import - t0, "open_s": t_built - t_import, "first_s": t_first - t_built,
                  "process_first_s": t_first - t0, "rows": rows,
                  "rows_per_s": (rows - len(first["i32"])) / elapsed if elapsed > 0 else 0.0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(kind: str, data: Path, cache: Path, max_batches: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(data), str(cache), str(max_batches)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--stock-batches", type=int, default=50, help="batches stock Mosaic is timed on")
    args = parser.parse_args(argv)
    table, bars = [], {}
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-scale-") as tmp:
        for count in args.shards:
            data = Path(tmp) / f"d{count}"
            write_dataset(data, args.rows, shard_rows=-(-args.rows // count))
            ours = child("ours", data, Path(tmp) / f"c-ours-{count}", 0)
            stock = child("stock", data, Path(tmp) / f"c-stock-{count}", args.stock_batches)
            for name, r in (("ours", ours), ("stock", stock)):
                table.append([f"{count:,}", name, f"{r['import_s']:.2f}", f"{r['open_s']:.2f}", f"{r['first_s']:.2f}",
                              f"{r['process_first_s']:.2f}", f"{r['peak_rss_mb']:,.0f}", f"{r['rows_per_s']:,.0f}",
                              f"{r['later_rows_per_s']:,.0f}" if r["later_rows_per_s"] else "-"])
                print(f"{count:>6,} shards {name:>5}: import {r['import_s']:.2f} s, open {r['open_s']:.2f} s, "
                      f"first batch {r['first_s']:.2f} s after open ({r['process_first_s']:.2f} s into the process), "
                      f"peak RSS {r['peak_rss_mb']:,.0f} MB, {r['rows_per_s']:,.0f} rows/s"
                      + (f", next epoch {r['later_rows_per_s']:,.0f} rows/s" if r["later_rows_per_s"] else ""), flush=True)
            opened = {name: r["import_s"] + r["open_s"] for name, r in (("ours", ours), ("stock", stock))}
            print(f"{count:>6,} shards ratios ours/stock: import + open {opened['ours'] / opened['stock']:.2f}x, "
                  f"first batch in a fresh process {ours['process_first_s'] / stock['process_first_s']:.2f}x, "
                  f"peak RSS {ours['peak_rss_mb'] / stock['peak_rss_mb']:.2f}x, rows/s "
                  f"{ours['rows_per_s'] / max(stock['rows_per_s'], 1):.0f}x", flush=True)
            bars[f"{count:,} shards, ours"] = ours["rows_per_s"]
            bars[f"{count:,} shards, stock"] = stock["rows_per_s"]
    facts = machine_facts()
    print(format_facts(facts))
    md, png = write_report("scale", title=f"{args.rows:,} rows in 100 to 10,000 shards: shuffled rows/s",
                           headers=["shards", "reader", "import (s)", "open (s)", "first batch after open (s)",
                                    "first batch, fresh process (s)", "peak RSS (MB)", "rows/s, first epoch",
                                    "rows/s, next epoch"],
                           rows=table, bars=bars, bar_label="rows/s (shuffled)", facts=facts,
                           notes=["each reader in a fresh process; stock timed on its first "
                                  f"{args.stock_batches} batches"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
