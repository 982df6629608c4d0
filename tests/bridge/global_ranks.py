"""Run under torchrun by test_global_order.py: each rank reads with ``shuffle_algo="global"``
and writes what it got, so the test can check disjoint, complete rank shares and an elastic
resume (a state saved by 2 ranks, resumed by 1 process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    from sparkbridge.bridge import ShuffleAlgo, StreamingLoader

    out, path, stop = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for workers in (0, 2):
        loader = StreamingLoader(path, batch_size=16, shuffle=True, seed=3, shuffle_algo=ShuffleAlgo.GLOBAL,
                                 num_workers=workers, decoded_cache_bytes=1 << 14)
        ids, batches = [], 0
        for batch in loader:
            ids += batch["id"].tolist()
            batches += 1
            t = torch.ones(1)
            dist.all_reduce(t)  # a DDP step: every rank must take part
        report[f"epoch{workers}"] = {"ids": ids, "batches": batches, "len": len(loader), "world": loader.world_size}
        loader.close()
    # stopped after `stop` batches of epoch 0: the state, to be resumed by one process
    loader = StreamingLoader(path, batch_size=16, shuffle=True, seed=3, shuffle_algo="global", num_workers=2)
    ids = []
    for k, batch in enumerate(loader):
        ids += batch["id"].tolist()
        if k + 1 == stop:
            break
    report["stopped"] = {"ids": ids, "state": loader.state_dict()}
    loader.close()
    once = StreamingLoader(path, batch_size=16, shuffle=True, shuffle_algo="global", num_workers=2, pad_ranks=False)
    report["once"] = {"ids": [i for b in once for i in b["id"].tolist()], "len": len(once)}
    once.close()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
