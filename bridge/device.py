"""Moving packed batches to a device: pinned host memory, non-blocking copies, one batch ahead.

A batch is one byte buffer (see :mod:`bridge.batch`), so a GPU batch costs one pinned buffer and
one ``cudaMemcpyAsync`` on a side stream; the columns are views of the device buffer. While the
caller trains on batch k, batch k+1's copy is already in flight.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterable, Iterator, Optional

from bridge.batch import BatchPlan, PackedBatch

__all__ = ["resolve_device", "to_batches"]

logger = logging.getLogger(__name__)


def resolve_device(device: Any) -> Optional[Any]:
    """``None``/"cpu" stay on the host; anything else must be a usable torch device."""
    if device is None:
        return None
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but torch sees no CUDA device")
    return dev


def to_batches(
    packed: Iterable[PackedBatch],
    plan: BatchPlan,
    *,
    device: Optional[Any],
    pin_memory: bool,
    prefetch: int,
) -> Iterator[Any]:
    """Tensors for each packed batch, on ``device`` when given."""
    if device is None:
        for batch in packed:
            yield plan.to_tensors(batch)
        return
    import torch

    if device.type != "cuda":
        for batch in packed:
            host = _host_tensor(batch)
            yield plan.to_tensors(batch, host.to(device))
        return
    stream = torch.cuda.Stream(device=device)
    queue: deque = deque()
    for batch in packed:
        host = _host_tensor(batch)
        if pin_memory and not host.is_pinned():
            host = host.pin_memory()
        with torch.cuda.stream(stream):
            dev_buf = host.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        queue.append((batch, host, dev_buf, event))
        if len(queue) > max(1, prefetch):
            yield _ready(plan, queue.popleft())
    while queue:
        yield _ready(plan, queue.popleft())


def _host_tensor(batch: PackedBatch):
    import torch

    return batch.buf if isinstance(batch.buf, torch.Tensor) else torch.from_numpy(batch.buf)


def _ready(plan: BatchPlan, item) -> Any:
    import torch

    batch, _host, dev_buf, event = item
    # The copy was issued one batch ago and is normally done: waiting for it here keeps the host
    # buffer alive until the DMA has read it, whatever allocator that buffer came from.
    event.synchronize()
    dev_buf.record_stream(torch.cuda.current_stream(dev_buf.device))
    return plan.to_tensors(batch, dev_buf)
