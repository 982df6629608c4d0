"""The one place that touches torch's ``DataLoader`` internals (the counterpart of
:mod:`bridge.mosaic`): stopping persistent worker processes now rather than at garbage collection.

``tests/bridge/test_mosaic_adapter.py`` pins the behaviour relied on.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["shutdown_workers", "in_worker", "worker_id"]

logger = logging.getLogger(__name__)


def shutdown_workers(dataloader: Any) -> bool:
    """Stop a ``DataLoader``'s persistent workers (torch keeps them in ``_iterator`` and stops
    them in ``_shutdown_workers``; without it they live until the loader is collected).
    Returns whether there were workers to stop."""
    it = getattr(dataloader, "_iterator", None)
    stop = getattr(it, "_shutdown_workers", None)
    if stop is None:
        return False
    stop()
    dataloader._iterator = None
    return True


def in_worker() -> bool:
    """Whether this code runs in a DataLoader worker process."""
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def worker_id() -> int:
    """This DataLoader worker's id (-1 outside workers)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return -1 if info is None else int(info.id)
