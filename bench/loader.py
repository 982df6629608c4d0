"""Loader benchmark: stock Mosaic vs ``bridge.StreamingLoader`` vs an in-memory numpy bound.

Writes ``--rows`` rows (16 float32 + int32 + int64 columns) as an MDS dataset (zstd, xxh64) with
the shared format code, then in one run measures rows/s of:

* stock ``StreamingDataset`` + ``DataLoader(batch_size=1024)`` (0 and 2 workers), on a bounded
  number of batches (it is slow) from a fresh copy of the shards;
* ``StreamingLoader`` (shuffle, batch 1024, 0 and 2 workers): first epoch on a fresh copy of the
  shards (median of ``--repeats`` new loaders), then later epochs; and the first batch after
  ``iter()``, right after building a loader and 0.5 s after (as when a script builds its model);
* the bound: the whole table in RAM as one numpy array per column, each epoch a fresh permutation
  and shuffled gathers of 1024 rows into a dict of tensors.

Later epochs of ours and of the bound are interleaved, best of three each (single timings on a
shared 2-core machine swing by 2x). Time to first batch and peak RSS come from fresh processes.

    python bench/loader.py [--rows 1000000] [--out bench-output/loader]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine_facts, write_report

REPO = Path(__file__).resolve().parents[1]

BATCH = 1024
FLOATS = [f"f{i:02d}" for i in range(16)]
COLUMNS = FLOATS + ["i32", "i64"]


def write_dataset(out: Path, rows: int, *, shard_rows: int, seed: int = 0) -> None:
    """1M-row MDS dataset written with sparkbridge.format.mds (byte-identical to Mosaic's MDSWriter)."""
    from sparkbridge.format.mds import FixedColumn, encode_shard, index_entry, pack_rows, shard_config
    from sparkbridge.format.codecs import compress, compression_extension

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    encodings = ["float32"] * 16 + ["int32", "int64"]
    config = shard_config(column_names=COLUMNS, column_encodings=encodings, compression="zstd",
                          hashes=["xxh64"], size_limit=None)
    shards = []
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        cols = [FixedColumn(rng.standard_normal(n, dtype=np.float32)) for _ in FLOATS]
        cols.append(FixedColumn(np.arange(start, start + n, dtype=np.int32)))
        cols.append(FixedColumn(np.arange(start, start + n, dtype=np.int64) * 3))
        data, sizes = pack_rows(cols)
        raw = encode_shard(config, data, sizes)
        zipped = compress("zstd", raw)
        raw_name = f"shard.{k:05d}.mds"
        zip_name = f"{raw_name}.{compression_extension('zstd')}"
        (out / zip_name).write_bytes(zipped)
        shards.append(index_entry(config, samples=n, raw_basename=raw_name, raw=raw,
                                  zip_basename=zip_name, zipped=zipped))
    (out / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def time_stock(data: Path, work: Path, workers: int, max_batches: int) -> dict:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    local = fresh_copy(data, work / f"stock-w{workers}")
    ds = StreamingDataset(local=str(local), batch_size=BATCH, shuffle=True)
    dl = DataLoader(ds, batch_size=BATCH, num_workers=workers)
    t0 = time.perf_counter()
    rows = 0
    for i, batch in enumerate(dl):
        rows += len(batch["i32"])
        if i + 1 >= max_batches:
            break
    dt = time.perf_counter() - t0
    del dl
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt}


def time_stock_isolated(data: Path, work: Path, workers: int, max_batches: int) -> dict:
    """:func:`time_stock` in a child process. An abandoned stock iteration leaves Mosaic's
    threads spinning: measured in one process, the in-memory bound then fell from 4.2M to 0.33M
    rows/s, which made every later figure of this run wrong."""
    code = (
        "import sys, json; from pathlib import Path; sys.path.insert(0, {bench!r}); "
        "from loader import time_stock; "
        "print(json.dumps(time_stock(Path({data!r}), Path({work!r}), {w}, {n})))"
    ).format(bench=str(REPO / "bench"), data=str(data), work=str(work), w=workers, n=max_batches)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory_table(data: Path, rows: int) -> dict:
    """The in-memory bound's table: one numpy array per column, decoded from the same shards."""
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(data, batch_size=BATCH)
    table = {c: np.empty(rows, dtype=np.float32 if c in FLOATS else (np.int32 if c == "i32" else np.int64))
             for c in COLUMNS}
    for s in range(len(loader.dataset.shards)):
        sh = loader.dataset.decoded(s)
        recs = sh.rows.view(sh.layout.row_dtype())
        a = int(loader.dataset.sample_offset_per_shard[s])
        for c in COLUMNS:
            table[c][a:a + len(recs)] = recs[c]
    loader.close()
    return table


def bound_epoch(table: dict, rng: np.random.Generator) -> tuple[int, float]:
    import torch

    n = len(table["i32"])
    t0 = time.perf_counter()
    perm = rng.permutation(n)
    rows = 0
    for a in range(0, n, BATCH):
        idx = perm[a:a + BATCH]
        batch = {k: torch.from_numpy(v[idx]) for k, v in table.items()}
        rows += len(batch["i32"])
    return rows, time.perf_counter() - t0


def first_batch_after(data: Path, work: Path, gap: float) -> float:
    """Seconds from ``iter()`` to the first batch of a new loader over a fresh copy, when
    ``iter()`` comes ``gap`` seconds after the loader is built (a training script builds its model
    in between; the loader loads shards and computes the first order meanwhile)."""
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(fresh_copy(data, work / "ours-gap"), batch_size=BATCH, shuffle=True)
    time.sleep(gap)
    t0 = time.perf_counter()
    next(iter(loader))
    dt = time.perf_counter() - t0
    loader.close()
    return dt


def ours_epoch(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = 0
    for batch in loader:
        rows += len(batch["i32"])
    return rows, time.perf_counter() - t0


_FRESH = r"""
import sys, time, json
t0 = time.perf_counter()
kind, path, workers = {kind!r}, {path!r}, {workers}
if kind == "ours":
    from sparkbridge.bridge import StreamingLoader
    it = iter(StreamingLoader(path, batch_size={batch}, shuffle=True, num_workers=workers))
else:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    it = iter(DataLoader(StreamingDataset(local=path, batch_size={batch}, shuffle=True), batch_size={batch}, num_workers=workers))
first = next(it)
t_first = time.perf_counter() - t0
rows = len(first["i32"])
if kind == "ours":
    for b in it:
        rows += len(b["i32"])
t_all = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps(dict(first_batch_s=t_first, total_s=t_all, rows=rows, peak_rss_mb=int(hwm) / 1024)))
"""


def fresh_process(kind: str, path: Path, workers: int = 0) -> dict:
    code = _FRESH.format(repo=str(REPO), kind=kind, path=str(path), workers=workers, batch=BATCH)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=1 << 18, help="rows per shard (default 262144, ~20 MB)")
    parser.add_argument("--stock-batches", type=int, default=40, help="batches to time stock Mosaic on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench-output" / "loader")
    args = parser.parse_args(argv)
    if args.rows < BATCH or args.stock_batches < 1 or args.repeats < 1:
        parser.error(f"--rows must be at least {BATCH}; --stock-batches and --repeats at least 1")

    import torch
    import streaming

    from sparkbridge.bridge import StreamingLoader

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    t = time.perf_counter()
    write_dataset(data, args.rows, shard_rows=args.shard_rows)
    print(f"wrote {args.rows:,} rows ({len(list(data.glob('*.zstd')))} zstd shards) in {time.perf_counter() - t:.1f}s")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, streaming {streaming.__version__}, numpy {np.__version__}")

    results: dict = {}
    for w in (0, 2):
        r = time_stock_isolated(data, args.out, w, args.stock_batches)
        results[f"stock_w{w}"] = r["rows_per_s"]
        print(f"stock Mosaic StreamingDataset+DataLoader workers={w}: {r['rows_per_s']:,.0f} rows/s "
              f"({r['rows']:,} rows in {r['seconds']:.2f}s, first batches of a fresh copy)")

    # in-memory bound table (built from the same shards)
    table = in_memory_table(data, args.rows)
    rng = np.random.default_rng(1)

    for w in (0, 2):
        firsts = []
        for k in range(args.repeats):  # each on a new loader over a fresh copy: nothing decoded yet
            if k:
                loader.close()
            copy = fresh_copy(data, args.out / f"ours-w{w}")
            loader = StreamingLoader(copy, batch_size=BATCH, shuffle=True, num_workers=w)
            rows, dt = ours_epoch(loader)
            assert rows == args.rows, (rows, args.rows)
            firsts.append(rows / dt)
        results[f"ours_w{w}_first"] = float(np.median(firsts))
        print(f"ours workers={w} first epoch (fresh copy, zstd, median of {args.repeats}): "
              f"{results[f'ours_w{w}_first']:,.0f} rows/s (each: {', '.join(f'{v:,.0f}' for v in firsts)})")
        best_ours, best_bound = 0.0, 0.0
        for _ in range(args.repeats):
            rows, dt = ours_epoch(loader)
            best_ours = max(best_ours, rows / dt)
            rows_b, dt_b = bound_epoch(table, rng)
            best_bound = max(best_bound, rows_b / dt_b)
        results[f"ours_w{w}_later"] = best_ours
        results[f"bound_vs_w{w}"] = best_bound
        print(f"ours workers={w} later epochs (best of {args.repeats}): {best_ours:,.0f} rows/s | "
              f"in-memory bound interleaved: {best_bound:,.0f} rows/s | ratio {best_ours / best_bound:.2f}x bound, "
              f"{best_ours / results[f'stock_w{w}']:.0f}x stock")
        loader.close()

    for gap in (0.0, 0.5):
        results[f"ours_first_batch_gap{gap}"] = float(np.median([first_batch_after(data, args.out, gap)
                                                                 for _ in range(args.repeats)]))
        print(f"ours: first batch {results[f'ours_first_batch_gap{gap}']:.3f}s after iter(), when iter() comes "
              f"{gap}s after the loader is built (median of {args.repeats})")
    for kind, w in (("ours", 0), ("stock", 0)):
        copy = fresh_copy(data, args.out / f"fresh-{kind}")
        r = fresh_process(kind, copy, w)
        results[f"{kind}_first_batch_s"] = r["first_batch_s"]
        extra = f", whole epoch {r['total_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB" if kind == "ours" else \
            f", peak RSS {r['peak_rss_mb']:.0f} MB"
        print(f"fresh process, {kind}: first batch after {r['first_batch_s']:.2f}s (imports included){extra}")
    print(f"raw table in RAM for the bound: {sum(v.nbytes for v in table.values()) / 2**20:.0f} MB")
    print("summary: " + json.dumps({k: round(v, 3) for k, v in results.items()}))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"targets (later epochs): >=100x stock: {results['ours_w0_later'] / results['stock_w0']:.0f}x; "
          f">=1.0x bound: {results['ours_w0_later'] / results['bound_vs_w0']:.2f}x (workers=0), "
          f"{results['ours_w2_later'] / results['bound_vs_w2']:.2f}x (workers=2)")
    print(f"first epoch: {results['ours_w0_first'] / results['bound_vs_w0']:.2f}x bound (workers=0), "
          f"{results['ours_w2_first'] / results['bound_vs_w2']:.2f}x (workers=2)")
    rows = []
    for w in (0, 2):
        bound, stock = results[f"bound_vs_w{w}"], results[f"stock_w{w}"]
        for label, key in (("first epoch (cold zstd)", f"ours_w{w}_first"), ("later epochs", f"ours_w{w}_later")):
            v = results[key]
            rows.append([f"StreamingLoader, {w} workers, {label}", f"{v:,.0f}", f"{v / stock:,.0f}x", f"{v / bound:.2f}x"])
        rows.append([f"stock StreamingDataset + DataLoader, {w} workers", f"{stock:,.0f}", "1x", ""])
        rows.append([f"in-memory numpy bound (interleaved with the {w}-worker epochs)", f"{bound:,.0f}", "", "1.00x"])
    md, png = write_report(
        "loader", title=f"loader, {args.rows:,} rows, batch {BATCH}, shuffled: rows/s",
        headers=["reader", "rows/s", "vs stock", "vs in-memory bound"], rows=rows,
        bars={"ours w0 first": results["ours_w0_first"], "ours w0 later": results["ours_w0_later"],
              "ours w2 first": results["ours_w2_first"], "ours w2 later": results["ours_w2_later"],
              "bound (w0 run)": results["bound_vs_w0"], "stock w0": results["stock_w0"],
              "stock w2": results["stock_w2"]},
        bar_label="rows/s", facts=machine_facts(),
        notes=[f"first batch in a fresh process: ours {results['ours_first_batch_s']:.2f} s, "
               f"stock {results['stock_first_batch_s']:.2f} s (imports included)",
               f"first batch after iter(): {results['ours_first_batch_gap0.0']:.3f} s right after building the loader, "
               f"{results['ours_first_batch_gap0.5']:.3f} s when iter() comes 0.5 s after it (a script building its "
               "model meanwhile)"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
