"""Images through the transform stage: JPEG decode + resize + flip, ours vs Mosaic vs the decode bound.

    python bench/media.py [--rows 20000] [--batch 256] [--workers 0 2]

``--rows`` JPEGs of 96x96 (~3 KB each) are written as an MDS ``bytes`` column. Each reader takes
one epoch and produces ``[B, 3, 64, 64]`` uint8 tensors (``torchvision.io.decode_jpeg``, resize to
64x64, a random horizontal flip), every image exactly once:

* the bound: the same decode over the same bytes held in memory, spread over the same number of
  processes (forked, each a share of the batches);
* ``StreamingLoader(transform=decode, num_workers=N)``: the decode in the transform stage;
* ``StreamingLoader`` decoding in the training loop (the only way before the transform stage);
* Mosaic: a ``StreamingDataset`` subclass decoding in ``__getitem__`` + ``DataLoader(num_workers=N)``
  (in a child process: an abandoned stock iteration leaves Mosaic's threads spinning).

Writes ``bench-output/media.md`` and ``media.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_facts, write_report

REPO = Path(__file__).resolve().parents[1]
SIDE, OUT_SIDE = 96, 64


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Smooth synthetic pictures (gradients, a disc, noise): JPEG sizes like small photos'."""
    import torch
    from torchvision.io import encode_jpeg

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    out = []
    for _ in range(n):
        a, b, c = rng.random(3)
        cy, cx, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.1]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        img = np.stack([a * yy + (1 - a) * xx, b * disc + (1 - b) * yy, c * xx * yy + disc * (1 - c)])
        img = np.clip(img * 200 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        out.append(encode_jpeg(torch.from_numpy(img), quality=85).numpy().tobytes())
    return out


def write_dataset(out: Path, jpegs: list[bytes]) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"id": "int64", "jpeg": "bytes"}, size_limit="8MB") as w:
        for k, blob in enumerate(jpegs):
            w.write({"id": np.int64(k), "jpeg": blob})


def decode_batch(batch) -> dict:
    """The user's transform: a dict with ``id`` and ``jpeg`` (a list of bytes) -> image tensors."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["jpeg"]]
    imgs = torch.stack(decode_jpeg(datas))  # [B, 3, 96, 96]
    imgs = F.interpolate(imgs.float(), size=(OUT_SIDE, OUT_SIDE), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp_(0, 255).to(torch.uint8)
    flip = torch.rand(imgs.shape[0]) < 0.5
    imgs[flip] = imgs[flip].flip(-1)
    return {"id": batch["id"], "image": imgs}


def _bound_share(args) -> int:
    jpegs, batch, k, workers = args
    import torch

    torch.set_num_threads(1)
    n = 0
    for start in range(k * batch, len(jpegs), batch * workers):
        n += decode_batch({"id": None, "jpeg": jpegs[start:start + batch]})["image"].shape[0]
    return n


def time_bound(jpegs: list[bytes], batch: int, workers: int) -> dict:
    t0 = time.perf_counter()
    if workers == 0:  # this process, with its default threads, as the loop of the 0-worker loaders
        n = sum(decode_batch({"id": None, "jpeg": jpegs[s:s + batch]})["image"].shape[0]
                for s in range(0, len(jpegs), batch))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            n = sum(pool.map(_bound_share, [(jpegs, batch, k, workers) for k in range(workers)]))
    return {"images": n, "seconds": time.perf_counter() - t0}


def time_ours(data: str, batch: int, workers: int, *, in_loop: bool) -> dict:
    from sparkbridge.bridge import StreamingLoader

    kw = {} if in_loop else {"transform": decode_batch}
    loader = StreamingLoader(data, batch_size=batch, shuffle=True, seed=1, num_workers=workers, **kw)
    t0 = time.perf_counter()
    ids = []
    for out in loader:
        if in_loop:
            out = decode_batch(out)
        ids.append(out["id"].numpy())
    dt = time.perf_counter() - t0
    loader.close()
    seen = np.concatenate(ids)
    return {"images": int(seen.size), "distinct": int(np.unique(seen).size), "seconds": dt}


def time_mosaic(data: str, batch: int, workers: int) -> dict:
    import torch
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    class Images(StreamingDataset):
        def __getitem__(self, idx):
            row = super().__getitem__(idx)
            out = decode_batch({"id": torch.tensor([row["id"]]), "jpeg": [row["jpeg"]]})
            return {"id": int(row["id"]), "image": out["image"][0]}

    ds = Images(local=data, batch_size=batch, shuffle=True, shuffle_seed=1)
    dl = DataLoader(ds, batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    ids = []
    for b in dl:
        ids.append(b["id"].numpy())
    seen = np.concatenate(ids)
    return {"images": int(seen.size), "distinct": int(np.unique(seen).size), "seconds": time.perf_counter() - t0}


def time_mosaic_isolated(data: str, batch: int, workers: int) -> dict:
    code = ("import sys, json; sys.path.insert(0, {bench!r}); from media import time_mosaic; "
            "print(json.dumps(time_mosaic({data!r}, {b}, {w})))").format(
        bench=str(REPO / "bench"), data=data, b=batch, w=workers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", "--images", dest="images", type=int, default=20_000, help="images (default 20,000)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)
    jpegs = make_jpegs(args.images)
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(f"{args.images:,} JPEGs of {SIDE}x{SIDE}, {mean_kb:.1f} KB each", flush=True)
    rows, bars = [], {}
    with tempfile.TemporaryDirectory(prefix="sb-media-") as tmp:
        data = str(Path(tmp) / "ds")
        write_dataset(Path(data), jpegs)
        for w in args.workers:
            runs = {
                "decode bound (bytes in memory)": time_bound(jpegs, args.batch, w),
                "StreamingLoader(transform=decode)": time_ours(data, args.batch, w, in_loop=False),
                "StreamingLoader, decode in the loop": time_ours(data, args.batch, w, in_loop=True),
                "Mosaic StreamingDataset subclass + DataLoader": time_mosaic_isolated(data, args.batch, w),
            }
            for name, r in runs.items():
                if r["images"] != args.images or r.get("distinct", args.images) != args.images:
                    raise SystemExit(f"{name}, {w} workers: {r} (expected every one of {args.images:,} once)")
            bound = args.images / runs["decode bound (bytes in memory)"]["seconds"]
            mosaic = args.images / runs["Mosaic StreamingDataset subclass + DataLoader"]["seconds"]
            for name, r in runs.items():
                rate = args.images / r["seconds"]
                rows.append([name, w, f"{rate:,.0f}", f"{rate / bound:.2f}x", f"{rate / mosaic:.1f}x"])
                bars[f"{name}, {w} workers"] = rate
                print(f"{w} workers  {name:48s} {rate:9,.0f} images/s  {rate / bound:5.2f}x bound  "
                      f"{rate / mosaic:5.1f}x Mosaic", flush=True)
    md, _ = write_report(
        "media", title=f"JPEG decode + resize + flip, {args.images:,} images of {SIDE}x{SIDE}, batch {args.batch}",
        headers=["reader", "workers", "images/s", "vs bound", "vs Mosaic"], rows=rows, bars=bars,
        bar_label="images / s", facts=machine_facts(),
        notes=["bound: the same decode over the same bytes in memory, in as many forked processes as workers "
               "(0 workers: this process)", "every image exactly once in each run"])
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
