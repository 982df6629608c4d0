"""First epoch side by side with Petastorm's ``BatchedDataLoader``, the fastest peer measured here.

    python bench/peers.py [--rows 1000000] [--repeats 3]

The same rows (18 fixed-width columns) as MDS shards (zstd + xxh64, 4 shards) for ``StreamingLoader``
and as Parquet (4 files, row groups of 64k rows) for Petastorm's ``make_batch_reader`` +
``BatchedDataLoader`` (``shuffle_row_groups=True``, ``shuffling_queue_capacity=100_000``: its partial
shuffle). Each reader runs one epoch in a fresh process, batch 1024, timed from the reader's
construction (imports excluded); medians of ``--repeats``. Petastorm 0.13.1 needs ``pyarrow<15``
(it imports ``pyarrow.filesystem``), so it is installed with pyarrow 14 and numpy 1.26 into
``bench-output/peers-lib`` and only its process puts that folder first on ``sys.path``. Writes
``bench-output/peers.md`` and ``peers.png``.
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

from _common import REPORT_DIR, machine_facts, write_report
from loader import BATCH, COLUMNS, in_memory_table, write_dataset

PEER_PACKAGES = ["petastorm==0.13.1", "dill", "diskcache", "future", "pyarrow==14.0.2", "numpy==1.26.4"]

CHILD = r"""
import json, sys, time
kind, path = sys.argv[1], sys.argv[2]
import torch  # imported before the clock starts, as a training script has it
if kind == "ours":
    from sparkbridge.bridge import StreamingLoader
    t0 = time.perf_counter()
    source = StreamingLoader(path, batch_size=1024, shuffle=True, seed=1)
    close = source.close
else:
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader
    t0 = time.perf_counter()
    reader = make_batch_reader("file://" + path, num_epochs=1, shuffle_row_groups=True, seed=1)
    source = BatchedDataLoader(reader, batch_size=1024, shuffling_queue_capacity=100_000)
    close = lambda: (reader.stop(), reader.join())
rows, first = 0, None
for b in source:
    first = time.perf_counter() - t0 if first is None else first
    rows += len(b["i32"])
total = time.perf_counter() - t0
close()
print(json.dumps(dict(rows=rows, first_batch_s=first, epoch_s=total)))
"""


def install_peers(lib: Path) -> None:
    if (lib / "petastorm").is_dir():
        return
    print(f"installing {' '.join(PEER_PACKAGES)} into {lib} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(lib),
                    *PEER_PACKAGES], check=True)


def write_parquet(table: dict, out: Path, files: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    rows = len(table[COLUMNS[0]])
    step = -(-rows // files)
    for k in range(files):
        part = pa.table({c: table[c][k * step:(k + 1) * step] for c in COLUMNS})
        pq.write_table(part, out / f"part-{k:05d}.parquet", row_group_size=1 << 16)


def child(kind: str, path: Path, lib: Path) -> dict:
    env = dict(os.environ)
    if kind == "petastorm":
        env["PYTHONPATH"] = os.pathsep.join([str(lib), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True,
                          timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} on {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rows < BATCH or args.repeats < 1:
        parser.error(f"--rows must be at least {BATCH}, --repeats at least 1")
    lib = REPORT_DIR / "peers-lib"
    install_peers(lib)
    results: dict[str, list[dict]] = {"ours": [], "petastorm": []}
    with tempfile.TemporaryDirectory(prefix="sparkbridge-bench-peers-") as tmp:
        mds, parquet = Path(tmp) / "mds", Path(tmp) / "parquet"
        write_dataset(mds, args.rows, shard_rows=-(-args.rows // 4))
        write_parquet(in_memory_table(mds, args.rows), parquet)
        for k in range(args.repeats):  # alternated, so both see the same machine
            for kind, path in (("ours", mds), ("petastorm", parquet)):
                r = child(kind, path, lib)
                if r["rows"] != args.rows:
                    raise SystemExit(f"{kind} read {r['rows']} rows, expected {args.rows}")
                results[kind].append(r)
                print(f"{kind:>9} run {k + 1}: first batch {r['first_batch_s']:.3f} s, epoch {r['epoch_s']:.3f} s, "
                      f"{r['rows'] / r['epoch_s']:,.0f} rows/s", flush=True)
    med = {kind: {m: statistics.median(r[m] for r in rs) for m in ("first_batch_s", "epoch_s")}
           for kind, rs in results.items()}
    rate = {kind: args.rows / m["epoch_s"] for kind, m in med.items()}
    ratio = rate["ours"] / rate["petastorm"]
    print(f"first epoch: ours {rate['ours']:,.0f} rows/s, Petastorm {rate['petastorm']:,.0f} rows/s: "
          f"ours {ratio:.2f}x; first batch {med['ours']['first_batch_s']:.3f} s vs "
          f"{med['petastorm']['first_batch_s']:.3f} s")
    facts = machine_facts()
    rows = [[name, f"{rate[kind]:,.0f}", f"{med[kind]['first_batch_s']:.3f}", f"{med[kind]['epoch_s']:.3f}",
             f"{rate[kind] / rate['petastorm']:.2f}x"]
            for kind, name in (("ours", "StreamingLoader (MDS, zstd + xxh64, global shuffle)"),
                               ("petastorm", "Petastorm BatchedDataLoader (Parquet, row-group shuffle + 100k queue)"))]
    md, png = write_report("peers", title=f"first epoch, {args.rows:,} rows, batch {BATCH}, fresh processes",
                           headers=["reader", "rows/s", "first batch (s)", "epoch (s)", "vs Petastorm"], rows=rows,
                           bars={"ours": rate["ours"], "Petastorm": rate["petastorm"]}, bar_label="rows/s, first epoch",
                           facts=facts, notes=[f"medians of {args.repeats} runs each, alternated; clocks start at "
                                               "the reader's construction, imports excluded"])
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
