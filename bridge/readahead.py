"""The read-ahead thread: loads (downloads through Mosaic, checks, decompresses) the shards a
worker will need, in the order it first needs them, at most ``window`` samples ahead of the batch
being gathered. Decompression, hashing and file I/O release the GIL, so this overlaps with the
gather loop. On an error it stops; the foreground then loads the same shard itself and raises
the error there, naming the shard.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import numpy as np

__all__ = ["ReadAhead"]

logger = logging.getLogger(__name__)

_TICK = 0.002


class ReadAhead(threading.Thread):
    """``plan()`` returns (shards in first-need order, the position of each one's first use); it
    runs in this thread (it costs a pass over the sample ids). ``load(shard)`` loads one shard.
    The foreground advances :attr:`position` (the index into the pass's ids it has reached)."""

    def __init__(self, plan: Callable[[], tuple[np.ndarray, np.ndarray]], load: Callable[[int], None], *,
                 window: int, skip: Optional[Callable[[int], bool]] = None) -> None:
        super().__init__(name="sparkbridge-read-ahead", daemon=True)
        self._plan = plan
        self._load = load
        self._skip = skip
        self.window = int(window)
        self.position = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            order, first = self._plan()
            for shard, pos in zip(order.tolist(), first.tolist()):
                while pos > self.position + self.window:
                    if self._halt.wait(_TICK):
                        return
                if self._halt.is_set():
                    return
                if self._skip is not None and self._skip(shard):
                    continue
                self._load(shard)
        except Exception as exc:  # the foreground raises it when it needs the shard
            logger.debug("read-ahead stopped: %s", exc)
