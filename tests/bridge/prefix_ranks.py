"""Run under torchrun by test_mosaic_adapter.py: each rank builds a loader over argv[2] and
records what it raised (the leader's shared-memory registration is made to fail by the test)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


def main() -> None:
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, raised, started = dist.get_rank(), None, time.monotonic()
    try:
        StreamingLoader(sys.argv[2], batch_size=16).close()
    except Exception as exc:
        raised = {"type": type(exc).__name__, "message": str(exc)}
    Path(sys.argv[1], f"rank{rank}.json").write_text(
        json.dumps({"raised": raised, "seconds": time.monotonic() - started}))
    os._exit(0)  # after a failed build the process group's teardown is not the point


if __name__ == "__main__":
    main()
