"""Run by test_train_job: one rank of a 2-process gloo group calling resume_for_all_ranks with its
OWN checkpoint path (rank 1's does not exist, as on a node without rank 0's filesystem)."""

import json
import sys

import torch.distributed as dist

from sparkbridge.jobs.checkpoint import resume_for_all_ranks

rank, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
state, source = resume_for_all_ranks(path)
print(json.dumps({"rank": rank, "step": state["step"] if state else None, "source": str(source) if source else None,
                  "w": state["model"]["w"].tolist() if state else None}))
dist.destroy_process_group()
