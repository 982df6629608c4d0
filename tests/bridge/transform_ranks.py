"""Run under torchrun by test_transform.py: each rank reads one shuffled epoch through a transform
running in a worker process and writes the ids it got, so the test can check that the ranks'
shares are disjoint, complete and of equal length (as without a transform)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def tagged(batch):
    return {"id": batch["id"] + 1, "pid": os.getpid()}


def main() -> None:
    import torch
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader

    out, path = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = StreamingLoader(path, batch_size=16, shuffle=True, seed=8, num_workers=0, transform=tagged,
                             transform_workers=1)
    ids, pids, batches = [], set(), 0
    for out_batch in loader:
        ids += (out_batch["id"] - 1).tolist()
        pids.add(out_batch["pid"])
        batches += 1
        t = torch.ones(1)
        dist.all_reduce(t)  # a DDP step: every rank must take part, or the job hangs
    loader.close()
    (out / f"rank{rank}.json").write_text(json.dumps({"ids": ids, "batches": batches, "len": len(loader),
                                                      "in_worker": os.getpid() not in pids}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
