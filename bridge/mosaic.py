"""The one place that touches Mosaic Streaming's internals.

sparkbridge keeps Mosaic for what it does well (sample order, partitioning over ranks and workers,
download and cache-limit eviction, elastic resumption) and replaces the per-sample fetch. That
needs a few names Mosaic does not document as public; every such use is here, so a Mosaic upgrade
touches this file and ``tests/bridge/test_mosaic_adapter.py``, which pins the behaviour relied on.

* :class:`SnapshotStream` — a ``Stream`` whose shards come from a dataset version (the log), not
  from ``index.json`` in the cache folder. Why: Mosaic reuses a cached ``index.json`` if one
  exists, so after an overwrite a loader with the same ``local=`` served the old data silently.
* ``generate_work``, ``get_partitions``, ``ShardState``, ``World``, ``maybe_init_dist``.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from streaming import Stream
from streaming.base.batching import generate_work
from streaming.base.dataset import _ShardState as ShardState
from streaming.base.distributed import maybe_init_dist
from streaming.base.format import reader_from_json
from streaming.base.partition import get_partitions
from streaming.base.world import World

from sparkbridge.errors import ShardFormatError

__all__ = ["SnapshotStream", "generate_work", "get_partitions", "ShardState", "World", "maybe_init_dist"]


class SnapshotStream(Stream):
    """A stream over the shard entries of one dataset version.

    ``remote``/``local`` mean what they mean to Mosaic (a remote root and its cache, or a local
    root alone); the entries were checked (paths confined to the root) before they got here."""

    def __init__(self, *, remote: Optional[str], local: Optional[str], shards: Sequence[dict], name: str) -> None:
        super().__init__(remote=remote, local=local)
        self._shards_json = [dict(s) for s in shards]
        self._index_size = len(json.dumps({"shards": self._shards_json, "version": 2}))
        self._name = name

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        shards = []
        for info in self._shards_json:
            shard = reader_from_json(self.local, self.split, info)
            try:
                shard.validate(allow_unsafe_types)
            except ValueError as exc:
                raise ShardFormatError(
                    f"{self._name}: {str(exc).split('. To proceed')[0]}; pickle can run arbitrary code, so "
                    "sparkbridge refuses it (rewrite the column as json, str or ndarray)") from None
            shards.append(shard)
        return shards

    def get_index_size(self) -> int:
        return self._index_size
