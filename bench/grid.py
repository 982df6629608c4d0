"""The loader across dataset sizes and shard sizes: ours vs the in-memory bound, 0 and 2 workers.

    python bench/grid.py [--rows 100000 1000000 4000000] [--shard-mb 1 8 64] [--repeats 3]

For each dataset size x shard size, the loader benchmark's table (16 float32 + int32 + int64
columns, zstd + xxh64) is written with shards of about that many MB decoded, and for 0 and 2
workers a new ``StreamingLoader`` (shuffled, batch 1024) over a fresh copy reads a first epoch,
then later epochs interleaved with epochs of the in-memory bound (one numpy array per column,
shuffled gathers; best of ``--repeats`` each). A shard size larger than the dataset gives the
same dataset as a smaller one and is measured once. One more cell reads the middle size with
``decoded_cache_bytes`` below the table's size (``--small-cache-mb``), so the rows are not
resident and the workers start: the case of a dataset larger than the loader's memory. Prints
each cell's ratios and writes ``bench-output/grid.md`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_facts, write_report
from loader import BATCH, bound_epoch, fresh_copy, in_memory_table, ours_epoch, write_dataset

#: Bytes of one row in a shard: 16 float32 + int32 + int64, and its 4-byte offset.
ROW_BYTES = 16 * 4 + 4 + 8 + 4


def cells(rows_list: list[int], shard_mb: list[int]) -> list[tuple[int, int]]:
    """(rows, rows per shard) of each distinct dataset, in order."""
    out: list[tuple[int, int]] = []
    for rows in rows_list:
        seen = set()
        for mb in shard_mb:
            per_shard = min(rows, max(1, (mb << 20) // ROW_BYTES))
            if per_shard not in seen:
                seen.add(per_shard)
                out.append((rows, per_shard))
    return out


def measure(data: Path, work: Path, table: dict, *, rows: int, workers: int, repeats: int,
            cache_bytes: int | None, rng: np.random.Generator) -> dict:
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(fresh_copy(data, work / "copy"), batch_size=BATCH, shuffle=True, num_workers=workers,
                             decoded_cache_bytes=cache_bytes)
    try:
        got, dt = ours_epoch(loader)
        if got != rows:
            raise SystemExit(f"{data}: the first epoch read {got:,} rows, expected {rows:,}")
        first = got / dt
        best_ours = best_bound = 0.0
        for _ in range(repeats):
            got, dt = ours_epoch(loader)
            best_ours = max(best_ours, got / dt)
            got_b, dt_b = bound_epoch(table, rng)
            best_bound = max(best_bound, got_b / dt_b)
        resident = loader.dataset.resident()
    finally:
        loader.close()
    return {"first": first, "later": best_ours, "bound": best_bound, "resident": resident}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-cache-mb", type=int, default=32,
                        help="decoded_cache_bytes of the extra non-resident cell, in MB (0: no such cell)")
    args = parser.parse_args(argv)
    if min(args.rows) < BATCH or min(args.shard_mb) < 1 or args.repeats < 1 or args.small_cache_mb < 0:
        parser.error(f"--rows must be at least {BATCH}; --shard-mb and --repeats at least 1; --small-cache-mb >= 0")

    import torch  # noqa: F401 - imported before any clock starts

    plan = [(rows, per, None) for rows, per in cells(args.rows, args.shard_mb)]
    if args.small_cache_mb:
        mid = sorted(args.rows)[len(args.rows) // 2]
        per = min(mid, max(1, (sorted(args.shard_mb)[len(args.shard_mb) // 2] << 20) // ROW_BYTES))
        plan.append((mid, per, args.small_cache_mb << 20))
    rng = np.random.default_rng(1)
    table_rows, bars, worst = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-grid-") as tmp:
        written: dict[tuple[int, int], Path] = {}
        for rows, per, cache_bytes in plan:
            data = written.get((rows, per))
            if data is None:
                data = Path(tmp) / f"d{rows}-{per}"
                t = time.perf_counter()
                write_dataset(data, rows, shard_rows=per)
                written[(rows, per)] = data
                print(f"wrote {rows:,} rows in {-(-rows // per)} shards of {per:,} rows "
                      f"(~{per * ROW_BYTES / 2**20:.1f} MB) in {time.perf_counter() - t:.1f} s", flush=True)
            mem = in_memory_table(data, rows)
            for w in (0, 2):
                r = measure(data, Path(tmp), mem, rows=rows, workers=w, repeats=args.repeats,
                            cache_bytes=cache_bytes, rng=rng)
                shards = -(-rows // per)
                label = (f"{rows:,} rows, {shards} x {per * ROW_BYTES / 2**20:.1f} MB"
                         + (f", cache {cache_bytes >> 20} MB" if cache_bytes else ""))
                later, first = r["later"] / r["bound"], r["first"] / r["bound"]
                print(f"{label}, {w} workers ({'resident' if r['resident'] else 'not resident'}): later epochs "
                      f"{r['later']:,.0f} rows/s = {later:.2f}x the bound ({r['bound']:,.0f}); first epoch "
                      f"{r['first']:,.0f} = {first:.2f}x", flush=True)
                table_rows.append([label, str(w), "yes" if r["resident"] else "no", f"{r['later']:,.0f}",
                                   f"{r['bound']:,.0f}", f"{later:.2f}x", f"{r['first']:,.0f}", f"{first:.2f}x"])
                bars[f"{label}, w{w}"] = later
                if cache_bytes is None:
                    worst[w] = min(worst.get(w, float("inf")), later)
            del mem
    print(f"worst later-epoch ratio over the resident cells: {worst.get(0, 0):.2f}x the bound with 0 workers "
          f"(goal 1.0x), {worst.get(2, 0):.2f}x with 2 (goal 0.9x)")
    md, png = write_report(
        "grid", title=f"loader, later epochs vs the in-memory bound (batch {BATCH}, shuffled)",
        headers=["dataset", "workers", "resident", "later epochs (rows/s)", "bound (rows/s)", "later / bound",
                 "first epoch (rows/s)", "first / bound"],
        rows=table_rows, bars=bars, bar_label="later epochs / in-memory bound", facts=machine_facts(),
        notes=[f"later epochs: best of {args.repeats}, interleaved with the bound's; first epoch: one new loader "
               "over a fresh copy of the shards (cold zstd + xxh64)"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
