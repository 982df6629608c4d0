"""GPU check for ``bridge.StreamingLoader(device="cuda")``: pinned memory, non-blocking copies,
one batch prefetched to the GPU. Standalone::

    python bench/gpu_check.py --rows 1000000

Writes the benchmark dataset (16 float32 + int32 + int64 columns), checks that every batch on the
GPU equals the CPU path's batch (same seed, with and without pinning, 0 and 2 workers), then
prints rows/s delivered to the GPU with and without pinned memory, next to an in-memory numpy
table copied to the GPU column by column, and a small MLP training on (features, label) batches.
Later epochs, interleaved, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="dataset folder (default: a temp folder)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    import streaming

    from loader import COLUMNS, FLOATS, write_dataset
    from sparkbridge.bridge import StreamingLoader

    B = args.batch_size
    out = args.out or Path(tempfile.mkdtemp(prefix="sparkbridge-gpu-check-"))
    data = out / "data"
    t = time.perf_counter()
    write_dataset(data, args.rows, shard_rows=1 << 18)
    print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.1f}s to {data}")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | streaming {streaming.__version__} | "
          f"python {platform.python_version()} | numpy {np.__version__}")

    def make(**kw):
        return StreamingLoader(data, batch_size=B, shuffle=True, seed=7, **kw)

    cpu = make()
    variants = {
        "gpu pinned": make(device="cuda", pin_memory=True),
        "gpu unpinned": make(device="cuda", pin_memory=False),
        "gpu pinned 2 workers": make(device="cuda", pin_memory=True, num_workers=2),
    }
    from sparkbridge.bridge.device import _PinnedRing

    _, staged = _PinnedRing(slots=1).stage(torch.zeros(4096, dtype=torch.uint8))
    print(f"pinned staging buffers: {staged.is_pinned()}")

    # 1. values: every GPU batch equals the CPU batch of the same position (first epoch)
    ref = [{k: v.clone() for k, v in b.items()} for b in cpu]
    for name, loader in variants.items():
        n = 0
        for want, got in zip(ref, loader, strict=True):
            for col in COLUMNS:
                g = got[col]
                if g.device.type != "cuda":
                    raise SystemExit(f"{name}: column {col} is on {g.device}, expected cuda")
                if not torch.equal(g.cpu(), want[col]):
                    raise SystemExit(f"{name}: batch {n} column {col} differs from the CPU path")
            n += 1
        print(f"{name}: {n} batches equal the CPU path")

    # 2. speed: later epochs, rows/s delivered to the GPU (synchronized at the end of each epoch)
    table = {c: np.empty(args.rows, dtype=ref[0][c].numpy().dtype) for c in COLUMNS}
    pos = 0
    for b in ref:  # the CPU path's first epoch, as one array per column (order does not matter)
        m = len(b["i32"])
        for c in COLUMNS:
            table[c][pos:pos + m] = b[c].numpy()
        pos += m
    del ref
    rng = np.random.default_rng(0)

    def epoch_ours(loader):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = 0
        for batch in loader:
            rows += batch["i32"].shape[0]
        torch.cuda.synchronize()
        return rows / (time.perf_counter() - t0)

    def epoch_bound():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        perm = rng.permutation(args.rows)
        rows = 0
        for a in range(0, args.rows, B):
            idx = perm[a:a + B]
            batch = {k: torch.from_numpy(v[idx]).to("cuda", non_blocking=True) for k, v in table.items()}
            rows += batch["i32"].shape[0]
        torch.cuda.synchronize()
        return rows / (time.perf_counter() - t0)

    best = {name: 0.0 for name in [*variants, "cpu (no device)", "in-memory numpy -> GPU"]}
    for _ in range(args.repeats):
        for name, loader in variants.items():
            best[name] = max(best[name], epoch_ours(loader))
        best["cpu (no device)"] = max(best["cpu (no device)"], epoch_ours(cpu))
        best["in-memory numpy -> GPU"] = max(best["in-memory numpy -> GPU"], epoch_bound())
    bound = best["in-memory numpy -> GPU"]
    for name, rate in best.items():
        print(f"{name:>24}: {rate:>12,.0f} rows/s  ({rate / bound:.2f}x the in-memory bound to GPU)")
    print(f"pinned vs unpinned: {best['gpu pinned'] / best['gpu unpinned']:.2f}x")

    # 3. a consumer: small MLP training on (features float32 [B, 16], label) batches on the GPU
    xy = make(device="cuda", features=FLOATS, label="i32")
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    for ep in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = 0
        for x, y in xy:
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows += x.shape[0]
        torch.cuda.synchronize()
        print(f"MLP training epoch {ep}: {rows / (time.perf_counter() - t0):,.0f} rows/s, last loss {loss.item():.3g}")
    for loader in (cpu, xy, *variants.values()):
        loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
