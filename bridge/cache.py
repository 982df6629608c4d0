"""The decoded-shard cache of one process: bounded in anonymous bytes and in live file maps.

Anonymous (decompressed-in-memory) shards count against ``max_bytes`` (``decoded_cache_bytes``);
file-backed (mapped) shards cost page cache, which the OS manages, and count against
``max_maps`` only (every map is a kernel mapping; a bound keeps us far from ``vm.max_map_count``
and keeps evicted cache files from holding disk space). Eviction takes shards marked *dead*
first — the pass being read will not need them again (see :mod:`bridge.working_set`) — then the
least recently used. The shard inserted last is never evicted, so one shard larger than the
bound still works. Safe for a foreground thread and a read-ahead thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterable, Optional

from sparkbridge.bridge.decode import DecodedShard

__all__ = ["ShardCache", "DEFAULT_DECODED_CACHE"]

#: ``decoded_cache_bytes`` when not given: the bound of each process's decoded shards, and of the
#: resident row table.
DEFAULT_DECODED_CACHE = 1 << 30


class ShardCache:
    def __init__(self, max_bytes: int, *, max_maps: int = 1024) -> None:
        if max_bytes <= 0:
            raise ValueError(f"decoded shard cache needs a positive byte bound, got {max_bytes}")
        if max_maps < 1:
            raise ValueError(f"decoded shard cache needs at least one map, got {max_maps}")
        self.max_bytes = int(max_bytes)
        self.max_maps = int(max_maps)
        self._items: "OrderedDict[int, DecodedShard]" = OrderedDict()
        self._loading: dict[int, threading.Event] = {}
        self._dead: set[int] = set()
        self._bytes = 0
        self._maps = 0
        self._lock = threading.Lock()
        self.loads = 0  # how many shards were loaded (decoded or mapped) so far

    def __contains__(self, shard_id: int) -> bool:
        return shard_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def anon_bytes(self) -> int:
        return self._bytes

    @property
    def maps(self) -> int:
        return self._maps

    def peek(self, shard_id: int) -> Optional[DecodedShard]:
        return self._items.get(shard_id)

    def get(self, shard_id: int, load: Callable[[], DecodedShard]) -> DecodedShard:
        """The decoded shard, loading it once even when two threads ask at the same time."""
        while True:
            with self._lock:
                item = self._items.get(shard_id)
                if item is not None:
                    self._items.move_to_end(shard_id)
                    return item
                event = self._loading.get(shard_id)
                if event is None:
                    event = self._loading[shard_id] = threading.Event()
                    break
            event.wait()  # then look again: loaded, or failed (and this thread retries the load)
        try:
            item = load()
        except BaseException:
            with self._lock:
                self._loading.pop(shard_id).set()
            raise
        with self._lock:
            self.loads += 1
            self._items[shard_id] = item
            self._dead.discard(shard_id)
            self._account(item, +1)
            self._evict(keep=shard_id)
            self._loading.pop(shard_id).set()
        return item

    def _account(self, item: DecodedShard, sign: int) -> None:
        self._bytes += sign * item.nbytes
        if item.mapped:
            self._maps += sign

    def _over(self) -> bool:
        return self._bytes > self.max_bytes or self._maps > self.max_maps

    def _evict(self, keep: int) -> None:
        if not self._over():
            return
        for victim in [k for k in self._items if k in self._dead and k != keep]:
            self._account(self._items.pop(victim), -1)
            self._dead.discard(victim)
            if not self._over():
                return
        while self._over() and len(self._items) > 1:
            victim = next(iter(self._items))
            if victim == keep:
                self._items.move_to_end(victim)
                victim = next(iter(self._items))
            self._account(self._items.pop(victim), -1)
            self._dead.discard(victim)

    def mark_dead(self, shard_ids: Iterable[int]) -> None:
        """These shards will not be needed again in this pass: evict them before any other."""
        with self._lock:
            self._dead.update(int(s) for s in shard_ids)

    def revive_all(self) -> None:
        """A new pass starts: every cached shard may be needed again."""
        with self._lock:
            self._dead.clear()

    def drop(self, shard_id: int) -> None:
        with self._lock:
            item = self._items.pop(shard_id, None)
            if item is not None:
                self._account(item, -1)
            self._dead.discard(shard_id)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._dead.clear()
            self._bytes = 0
            self._maps = 0
