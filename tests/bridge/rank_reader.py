"""Run under torchrun by test_distributed.py: each rank reads one epoch of each dataset and
writes the sample ids it got, so the test can check disjointness, coverage and batch counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader

    out, datasets = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for path in datasets:
        loader = StreamingLoader(path, batch_size=16, shuffle=True, num_workers=0)
        ids, batches = [], 0
        for batch in loader:
            ids += batch["id"].tolist()
            batches += 1
            # a DDP step: every rank must take part, or the job hangs
            t = torch.ones(1)
            dist.all_reduce(t)
        report[path] = {"ids": ids, "batches": batches, "len": len(loader), "world": loader.world_size,
                        "state": loader.state_dict()}
        loader.close()
        # pad_ranks=False (evaluation): no repeats, so no per-batch collective (batch counts may differ)
        once = StreamingLoader(path, batch_size=16, shuffle=True, num_workers=2, pad_ranks=False)
        report[path + "#once"] = {"ids": [i for b in once for i in b["id"].tolist()], "len": len(once)}
        once.close()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
