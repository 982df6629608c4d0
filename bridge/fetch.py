"""A snapshot's shards for one process: :class:`~sparkbridge.bridge.shard_source.ShardSource` over a
version's :class:`~sparkbridge.bridge.shards.ShardTable`, fetched by Mosaic, through a bounded cache.

Where a shard is read from, how it is checked and decoded, is :mod:`sparkbridge.bridge.shard_source`
(the one place a shard file is opened, shared with the followed epoch). This adds what a pinned
version read with Mosaic's order needs: Mosaic prepares a shard that is on no local disk (download,
``cache_limit`` eviction; a local dataset's shard is decompressed from the dataset root into the
cache folder, never into the root), the process's decoded-shard cache, and the resident table.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

from sparkbridge.bridge.cache import ShardCache
from sparkbridge.bridge.resident import LOADED, LOADING, ResidentRows
from sparkbridge.bridge.shard_source import ShardSource, check_hash_names, pick_hash
from sparkbridge.bridge.shards import ShardTable
from sparkbridge.bridge.smallshard import SmallShards

__all__ = ["ShardReader", "check_hash_names", "pick_hash"]

logger = logging.getLogger(__name__)

_MAX_MAPS = 1024
_CLAIM_WAIT_S = 30.0


class ShardReader(ShardSource):
    """Loads shards for one process (each DataLoader worker builds its own).

    ``dataset`` (the :class:`bridge.dataset.BatchDataset`) is needed only where Mosaic prepares a
    shard (a remote one, or a local one that is missing): a reader built before it
    (:mod:`bridge.early`) gets it when the dataset adopts the reader, and Mosaic is imported only
    then, so this module never imports it."""

    def __init__(self, *, dataset: Any, table: ShardTable, validate_hash: Union[str, bool, None], remote: Optional[str],
                 source: str, cache_limit: Optional[int], budget: int, resident: Optional[ResidentRows],
                 retry: int = 7) -> None:
        super().__init__(table=table, validate_hash=validate_hash, retry=retry)
        self.dataset = dataset
        self.remote = remote
        self.source = source
        self.cache_limit = cache_limit
        self.cache = ShardCache(budget, max_maps=_MAX_MAPS)
        self.resident = resident
        self.small = SmallShards(table, self.hash_names)

    @property
    def zip_when_spilling(self) -> bool:  # type: ignore[override]
        """A remote (or cache-folder) dataset that spills is decompressed into Mosaic's cache by
        :meth:`fetch`; only a local dataset read in place decompresses in memory."""
        return self.remote is None

    def found(self, kind: str, where: str) -> None:
        self.small.found(kind, where)

    def fetch(self, i: int) -> None:
        t = self.table
        if self.remote is None:
            missing = (t.zip_candidates(i) or t.raw_candidates(i))[0]
            raise FileNotFoundError(
                f"shard {t.name(i)!r} is listed in {self.source}/index.json but is missing ({missing}); "
                "the dataset is incomplete")
        if self.dataset is None:  # built early (bridge.early) and not adopted yet: the pass loads it
            raise RuntimeError(f"shard {t.name(i)!r} is not on local disk and the dataset is not built yet")
        from sparkbridge.bridge import mosaic

        mosaic.prepare_shard(self.dataset, i, blocking=True, name=t.name(i), source=self.source)

    def evicted(self, i: int) -> str:
        return (f"shard {self.table.name(i)!r} was evicted again before it could be read {1 + self.retry} times: "
                f"cache_limit={self.cache_limit} is too small for the read-ahead window")

    def decoded(self, i: int, *, spill: bool = False) -> DecodedShard:
        """The shard through this process's cache (loading it when absent)."""
        i = int(i)
        shard = self.cache.get(i, lambda: self.load(i, spill=spill))
        if self.cache_limit and self.remote is not None:
            from sparkbridge.bridge import mosaic

            if shard.mapped and mosaic.shard_states(self.dataset)[i] != mosaic.ShardState.LOCAL:
                # Mosaic evicted the file (cache_limit): drop the map so the disk space is freed
                self.cache.drop(i)
                shard = self.cache.get(i, lambda: self.load(i, spill=spill))
            mosaic.touch_shard(self.dataset, i)  # Mosaic evicts the least recently used first
        return shard

    # ------------------------------------------------------------------ the resident table

    def load_resident(self, i: int, *, wait: bool) -> None:
        """Put shard ``i``'s rows in the resident table. ``wait``: when another thread or process
        is loading it, wait for it (the foreground); else leave it to them (read-ahead)."""
        res = self.resident
        i = int(i)
        if res.state[i] == LOADED:
            return
        if not res.claim(i):
            if not wait:
                return
            deadline = time.monotonic() + _CLAIM_WAIT_S
            while res.state[i] == LOADING and time.monotonic() < deadline:
                time.sleep(0.0005)
            if res.state[i] == LOADED:
                return
            res.claim(i)  # its loader failed or died: load it here
        try:
            rows = self.small.rows(i)  # most small shards; else (and for every error) the general path
            res.fill(i, int(self.table.starts[i]), self.load(i, spill=False).rows if rows is None else rows)
        except BaseException:
            res.unclaim(i)
            raise

    def drop(self) -> None:
        self.cache.clear()

