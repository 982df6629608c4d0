"""Order at scale: anonymous memory and rows/s of one shuffled epoch, Mosaic's order vs ``global``.

    python bench/order.py [--rows 4000000 32000000] [--workers 0 2] [--algos py1e global]
    python bench/order.py --fast-path --rows 1000000   # is global (the default) as fast in memory? (later epochs, medians)
    python bench/order.py --fast-path --alone          # the same, each order alone in fresh processes, alternated

The dataset (issue 20's): columns ``id int64, label int32``, zstd shards of ~8 MB decompressed
(500k rows), written with sparkbridge's own MDS format code (no Spark). For each row count, each
``num_workers`` and each ``shuffle_algo``, a fresh child process builds
``StreamingLoader(shuffle=True, batch_size=1024, decoded_cache_bytes=64 MiB)`` and reads one
shuffled epoch. Reported:

* anonymous memory growth: RssAnon + RssShmem (/proc/self/status; shared anonymous memory
  counts: a resident row table in memory is that) at its peak during the epoch (sampled
  every 8 batches) minus RssAnon after the imports, before the loader is built (so the decoded
  budget and a resident row table count), plus the peak private dirty
  memory of its child processes (DataLoader workers, Mosaic's order helper);
* rows/s of the epoch (cold: from ``iter()`` to the last batch, shard loads included), and its
  shuffle score (bench/shuffle.py's: 1.0 = a uniform random permutation), every row once;
* ratios global / Mosaic measured in the same run.

Writes ``bench-output/order.md`` / ``order.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import format_facts, machine_facts, write_report

HERE = Path(__file__).resolve().parent
SHARD_ROWS = 500_000  # 12 B a row + its 4 B offset: ~8 MB decompressed

_CHILD = r"""
import json, os, sys, time
import numpy as np
def anon():
    # RssAnon + RssShmem: private and shared anonymous memory (the resident row table is the latter)
    total = 0.0
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssShmem")):
            total += int(line.split()[1]) / 1024
    return total
def file_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024
from _common import children_private_mb as children_private  # the bench folder is on PYTHONPATH
path, algo, workers, budget, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
import torch
from sparkbridge.bridge import StreamingLoader
n = sum(s["samples"] for s in json.load(open(os.path.join(path, "index.json")))["shards"])
seen = np.zeros(n, dtype=np.uint8)
seen.fill(0)  # this benchmark's own bookkeeping (1 B a row), committed before the baseline
base = anon()  # after the imports, before the loader is built
t_build = time.perf_counter()
loader = StreamingLoader(path, batch_size=1024, shuffle=True, seed=1, shuffle_algo=algo, num_workers=workers,
                         decoded_cache_bytes=budget)
build_s = time.perf_counter() - t_build
pos_sum, rows, peak, kids, done = 0, 0, base, 0.0, True
t0 = time.perf_counter()
for k, batch in enumerate(loader):
    ids = batch["id"].numpy()
    seen[ids] += 1
    pos_sum += int(np.abs(np.arange(rows, rows + len(ids)) - ids).sum())
    rows += len(ids)
    if k % 8 == 0:
        peak = max(peak, anon())
        if k % 256 == 0:
            kids = max(kids, children_private())
        if time.perf_counter() - t0 > timeout:
            done = False
            break
seconds = time.perf_counter() - t0
peak = max(peak, anon())
file_end = file_mb()
kids = max(kids, children_private())
once = bool(done and (seen == 1).all())
loader.close()
print(json.dumps(dict(rows=rows, n=n, finished=done, once=once, seconds=seconds, build_s=build_s,
                      rows_per_s=rows / seconds, score=pos_sum / rows / (n / 3), anon_base_mb=base,
                      anon_growth_mb=peak - base, children_mb=kids, file_end_mb=file_end, total_growth_mb=peak - base + kids)))
"""


def write_dataset(out: Path, rows: int, *, shard_rows: int = SHARD_ROWS) -> None:
    """``id`` int64 (0..rows-1, stored in order), ``label`` int32 (random), zstd + xxh64."""
    from sparkbridge.format.codecs import compress, compression_extension
    from sparkbridge.format.mds import FixedColumn, encode_shard, index_entry, pack_rows, shard_config

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    config = shard_config(column_names=["id", "label"], column_encodings=["int64", "int32"], compression="zstd",
                          hashes=["xxh64"], size_limit=None)
    shards = []
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        data, sizes = pack_rows([FixedColumn(np.arange(start, start + n, dtype=np.int64)),
                                 FixedColumn(rng.integers(0, 1000, n, dtype=np.int32))])
        raw = encode_shard(config, data, sizes)
        zipped = compress("zstd", raw)
        raw_name = f"shard.{k:05d}.mds"
        zip_name = f"{raw_name}.{compression_extension('zstd')}"
        (out / zip_name).write_bytes(zipped)
        shards.append(index_entry(config, samples=n, raw_basename=raw_name, raw=raw, zip_basename=zip_name,
                                  zipped=zipped))
    (out / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def run_child(path: Path, algo: str, workers: int, budget: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE.parent}{os.pathsep}{HERE}")
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), algo, str(workers), str(budget), str(timeout)],
                             capture_output=True, text=True, check=True, timeout=timeout * 2 + 300, env=env)
    except subprocess.CalledProcessError as exc:
        return {"error": exc.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        return {"error": "killed after the timeout"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fast_path(rows: int, data_root: Path, workers: int, rounds: int = 5) -> list[list]:
    """bench/loader.py's workload (18 fixed-width columns, ~20 MB shards, default budget: the
    in-memory row table): later epochs of Mosaic's ``py1e`` and ``global``, interleaved, ``rounds``
    each, in this process; the question is whether ``global`` (the default since branch global3) is as
    fast as ``py1e`` there. The ratio is
    of the medians: on this shared machine either order sometimes reads one epoch ~2x faster than
    its others (9-10M rows/s against ~5M), and a best-of ratio follows those outliers."""
    import statistics
    import time

    sys.path.insert(0, str(HERE))
    from loader import write_dataset as write_loader_dataset

    from sparkbridge.bridge import StreamingLoader

    data = data_root / f"loader-{rows}"
    if not (data / "index.json").exists():
        write_loader_dataset(data, rows, shard_rows=1 << 18)
    loaders = {algo: StreamingLoader(data, batch_size=1024, shuffle=True, shuffle_algo=algo, num_workers=workers)
               for algo in ("py1e", "global")}
    rates: dict[str, list[float]] = {algo: [] for algo in loaders}
    for algo, loader in loaders.items():  # the first epoch fills the table
        for _ in loader:
            pass
    for _ in range(rounds):
        for algo, loader in loaders.items():
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["i32"])
            rates[algo].append(n / (time.perf_counter() - t0))
    for loader in loaders.values():
        loader.close()
    med = {algo: statistics.median(r) for algo, r in rates.items()}
    best = {algo: max(r) for algo, r in rates.items()}
    print(f"fast path, {rows:,} rows, workers={workers}: later epochs (median of {rounds}) py1e {med['py1e']:,.0f} "
          f"rows/s, global {med['global']:,.0f} rows/s: global/py1e {med['global'] / med['py1e']:.2f}x "
          f"(best: {best['global'] / best['py1e']:.2f}x)", flush=True)
    return [[f"{rows:,}", workers, f"{med['py1e']:,.0f}", f"{med['global']:,.0f}",
             f"{med['global'] / med['py1e']:.2f}x", f"{best['global'] / best['py1e']:.2f}x"]]


_ALONE = r"""
import json, statistics, sys, time
from sparkbridge.bridge import StreamingLoader
path, algo, workers, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loader = StreamingLoader(path, batch_size=1024, shuffle=True, shuffle_algo=algo, num_workers=workers)
for _ in loader:  # the first epoch fills the table
    pass
rates = []
for _ in range(rounds):
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["i32"])
    rates.append(n / (time.perf_counter() - t0))
loader.close()
print(json.dumps(rates))
"""


def fast_path_alone(rows: int, data_root: Path, workers: int, rounds: int = 9, repeats: int = 3) -> list[list]:
    """The same workload, each order alone in a fresh process (a training run has one loader):
    ``repeats`` processes of each, alternated, ``rounds`` later epochs each; medians. Why: in one
    process an order's background work (Mosaic's next orders in its helper, ~85 ms of CPU an epoch
    at 1M rows; a global order's next chunk) also runs during the other order's epochs."""
    import statistics

    sys.path.insert(0, str(HERE))
    from loader import write_dataset as write_loader_dataset

    data = data_root / f"loader-{rows}"
    if not (data / "index.json").exists():
        write_loader_dataset(data, rows, shard_rows=1 << 18)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE.parent}{os.pathsep}{HERE}")
    per: dict[str, list[float]] = {"py1e": [], "global": []}
    for _ in range(repeats):
        for algo in per:
            out = subprocess.run([sys.executable, "-c", _ALONE, str(data), algo, str(workers), str(rounds)],
                                 capture_output=True, text=True, check=True, timeout=600, env=env, cwd="/")
            per[algo].append(statistics.median(json.loads(out.stdout.strip().splitlines()[-1])))
    med = {algo: statistics.median(r) for algo, r in per.items()}
    print(f"fast path alone, {rows:,} rows, workers={workers}: later epochs (median of {repeats} processes' medians "
          f"of {rounds}) py1e {med['py1e']:,.0f} rows/s [{' '.join(f'{r / 1e6:.2f}M' for r in per['py1e'])}], global "
          f"{med['global']:,.0f} rows/s [{' '.join(f'{r / 1e6:.2f}M' for r in per['global'])}]: global/py1e "
          f"{med['global'] / med['py1e']:.2f}x", flush=True)
    return [[f"{rows:,}", workers, f"{med['py1e']:,.0f}", f"{med['global']:,.0f}",
             f"{med['global'] / med['py1e']:.2f}x", "alone"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4_000_000, 32_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--algos", nargs="+", default=["py1e", "global"])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "sparkbridge-bench-order")
    parser.add_argument("--out", type=Path, default=HERE.parent / "bench-output")
    parser.add_argument("--fast-path", action="store_true",
                        help="instead: bench/loader.py's 1M-row in-memory workload, later epochs, py1e vs global")
    parser.add_argument("--alone", action="store_true",
                        help="with --fast-path: each order alone in fresh processes, alternated (not interleaved)")
    args = parser.parse_args(argv)
    if args.fast_path:
        rows = []
        for w in args.workers:
            rows += fast_path_alone(args.rows[0], args.data, w) if args.alone else fast_path(args.rows[0], args.data, w)
        args.out.mkdir(parents=True, exist_ok=True)
        write_report("order_fast_path", title="later epochs of bench/loader.py's workload: py1e vs global",
                     headers=["rows", "workers", "py1e rows/s (median)", "global rows/s (median)", "global / py1e",
                              "global / py1e (best; or alone)"], rows=rows,
                     bars={f"w{r[1]} global/py1e": float(r[4][:-1]) for r in rows}, bar_label="ratio",
                     facts=machine_facts(), out_dir=args.out)
        return 0
    facts = machine_facts()
    print(format_facts(facts), flush=True)
    results, table, bars = [], [], {}
    for n in args.rows:
        data = args.data / f"rows-{n}"
        if not (data / "index.json").exists():
            write_dataset(data, n)
        per = {}
        for w in args.workers:
            for algo in args.algos:
                r = run_child(data, algo, w, args.budget_mib << 20, args.timeout)
                r.update(rows_total=n, workers=w, algo=algo)
                results.append(r)
                per[(w, algo)] = r
                if "error" in r:
                    print(f"{n:>11,} rows, workers={w}, {algo}: FAILED {r['error'][-400:]}", flush=True)
                    table.append([f"{n:,}", w, algo, "failed", "-", "-", "-", "-", "-", "-", "-"])
                    continue
                print(f"{n:>11,} rows, workers={w}, {algo:>6}: {'finished' if r['finished'] else 'TIMED OUT'}, "
                      f"once={r['once']}, {r['rows_per_s']:,.0f} rows/s, anon growth {r['anon_growth_mb']:.0f} MB "
                      f"+ children {r['children_mb']:.0f} MB, score {r['score']:.2f}", flush=True)
                table.append([f"{n:,}", w, algo, "yes" if r["finished"] else "timeout", "yes" if r["once"] else "no",
                              f"{r['rows_per_s']:,.0f}", f"{r['anon_growth_mb']:.0f}", f"{r['children_mb']:.0f}",
                              f"{r['total_growth_mb']:.0f}", f"{r.get('file_end_mb', 0):.0f}", f"{r['score']:.2f}"])
                bars[f"{n // 1_000_000}M w{w} {algo}"] = r["total_growth_mb"]
            mosaic, ours = per.get((w, args.algos[0])), per.get((w, args.algos[-1]))
            if len(args.algos) > 1 and mosaic and ours and "error" not in mosaic and "error" not in ours:
                print(f"{n:>11,} rows, workers={w}: {args.algos[-1]}/{args.algos[0]}: memory growth "
                      f"{ours['total_growth_mb'] / max(mosaic['total_growth_mb'], 1):.3f}x, rows/s "
                      f"{ours['rows_per_s'] / mosaic['rows_per_s']:.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "order.json").write_text(json.dumps(results, indent=2))
    write_report("order", title=f"one shuffled epoch, decoded_cache_bytes={args.budget_mib} MiB: memory and speed by order",
                 headers=["rows", "workers", "shuffle_algo", "finished", "every row once", "rows/s",
                          "anon growth MB", "children private MB", "total growth MB", "file-backed MB (end)",
                          "shuffle score"],
                 rows=table, bars=bars, bar_label="anonymous memory growth incl. children (MB)", facts=facts,
                 notes=["growth: peak RssAnon+RssShmem during the epoch minus the same before the loader is built, sampled "
                        "every 8 batches; children: peak private dirty memory of the loader's child processes",
                        "file-backed: RssFile at the end (page cache mapped by the process: the mapped row table)",
                        "rows/s: one cold epoch from iter() to its last batch (shard loads included)"],
                 out_dir=args.out)
    print(f"wrote {args.out / 'order.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
