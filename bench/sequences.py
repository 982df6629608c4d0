"""Token sequences into dense batches: ours (padded, packed) vs Mosaic's per-sample path, one run.

    python bench/sequences.py [--rows 20000] [--batch 64] [--length 2048] [--workers 0]

``--rows`` sequences of int32 token ids, lengths uniform in 16..2048, are written as
``ndarray:int32`` MDS shards. Each reader takes one shuffled epoch and produces ``[B, L]`` token
tensors:

* Mosaic: ``StreamingDataset`` + ``DataLoader(batch_size=B)``, one ``__getitem__`` per row, padded
  by a collate function (what a Mosaic user writes), in a child process (an abandoned stock
  iteration leaves Mosaic's threads spinning and slows everything after it);
* ours, padded: ``StreamingLoader`` + :func:`sparkbridge.bridge.sequences.pad_sequences` to ``L``;
* ours, packed: ``StreamingLoader`` + :class:`sparkbridge.bridge.sequences.SequencePacker`
  (``B × L`` blocks, no padding but the last block's).

The figure is real (non-padding) tokens per second; the padding share shows what each layout
spends on padding. Writes ``bench-output/sequences.md`` and ``sequences.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_facts, write_report

REPO = Path(__file__).resolve().parents[1]


def write_dataset(out: Path, rows: int, *, length: int, seed: int = 0) -> int:
    """Rows with ``id`` and ``tokens``; returns the total number of tokens."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    lens = rng.integers(16, length + 1, size=rows)
    with MDSWriter(out=str(out), columns={"id": "int64", "tokens": "ndarray:int32"}, compression="zstd",
                   size_limit="8MB") as w:
        for k, n in enumerate(lens.tolist()):
            w.write({"id": np.int64(k), "tokens": rng.integers(0, 50_000, size=n, dtype=np.int32)})
    return int(lens.sum())


def time_mosaic(data: str, batch: int, length: int, workers: int) -> dict:
    import torch
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    def collate(rows):
        ids = torch.zeros((len(rows), length), dtype=torch.int32)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            t = torch.from_numpy(r["tokens"])
            ids[i, :t.numel()] = t
            mask[i, :t.numel()] = True
        return {"input_ids": ids, "attention_mask": mask}

    ds = StreamingDataset(local=data, batch_size=batch, shuffle=True, shuffle_seed=3)
    dl = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
    tokens = slots = 0
    t0 = time.perf_counter()
    for b in dl:
        tokens += int(b["attention_mask"].sum())
        slots += b["input_ids"].numel()
    return {"tokens": tokens, "slots": slots, "seconds": time.perf_counter() - t0}


def time_mosaic_isolated(data: str, batch: int, length: int, workers: int) -> dict:
    code = ("import sys, json; sys.path.insert(0, {bench!r}); from sequences import time_mosaic; "
            "print(json.dumps(time_mosaic({data!r}, {b}, {l}, {w})))").format(
        bench=str(REPO / "bench"), data=data, b=batch, l=length, w=workers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_ours(data: str, batch: int, length: int, workers: int, *, packed: bool) -> dict:
    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.bridge.sequences import SequencePacker, pad_sequences

    loader = StreamingLoader(data, batch_size=batch, shuffle=True, seed=3, num_workers=workers,
                             columns=["tokens"])
    tokens = slots = 0
    t0 = time.perf_counter()
    if packed:
        for blk in SequencePacker(loader, column="tokens", length=length, rows=batch):
            tokens += int(blk["cu_seqlens"][-1])
            slots += blk["input_ids"].numel()
    else:
        for b in loader:
            out = pad_sequences(b["tokens"], length=length)
            tokens += int(out["lengths"].sum())
            slots += out["input_ids"].numel()
    dt = time.perf_counter() - t0
    loader.close()
    return {"tokens": tokens, "slots": slots, "seconds": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sb-seq-") as tmp:
        data = str(Path(tmp) / "ds")
        total = write_dataset(Path(data), args.rows, length=args.length)
        print(f"{args.rows:,} sequences, {total:,} tokens (mean {total / args.rows:,.0f})", flush=True)
        runs = {
            "Mosaic StreamingDataset + DataLoader, padded by collate": time_mosaic_isolated(
                data, args.batch, args.length, args.workers),
            "StreamingLoader + pad_sequences": time_ours(data, args.batch, args.length, args.workers, packed=False),
            "StreamingLoader + SequencePacker": time_ours(data, args.batch, args.length, args.workers, packed=True),
        }
    for name, r in runs.items():
        if r["tokens"] != total:
            raise SystemExit(f"{name} read {r['tokens']:,} tokens, expected {total:,}")
    base = next(iter(runs.values()))
    base_rate = base["tokens"] / base["seconds"]
    rows, bars = [], {}
    for name, r in runs.items():
        rate = r["tokens"] / r["seconds"]
        pad_share = 1 - r["tokens"] / r["slots"]
        rows.append([name, f"{rate / 1e6:,.2f}M", f"{rate / base_rate:.1f}x", f"{pad_share:.1%}"])
        bars[name] = rate / 1e6
        print(f"{name:58s} {rate / 1e6:8.2f}M tokens/s  {rate / base_rate:6.1f}x Mosaic  padding {pad_share:.1%}")
    md, _ = write_report(
        "sequences", title=f"Token sequences (16..{args.length} tokens), batch {args.batch}, "
        f"{args.workers} workers: real tokens/s",
        headers=["reader", "tokens/s", "vs Mosaic", "padding share"], rows=rows, bars=bars,
        bar_label="million real tokens / s", facts=machine_facts(),
        notes=[f"{args.rows:,} sequences, {total:,} tokens, one shuffled epoch each, every token counted"])
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
