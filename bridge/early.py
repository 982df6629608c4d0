"""The resident table's fill, started before Mosaic is imported and its dataset built.

Why: a loader built in a fresh process imports Mosaic's dataset modules and builds its
``StreamingDataset`` (~60 ms of the construction, 1M rows in 4 shards on 2 cores), and no shard
was read meanwhile. What filling the resident table from a local dataset needs is Mosaic-free:
the version's shard list (:class:`bridge.shards.ShardTable`), the table
(:class:`bridge.resident.ResidentRows`) and a :class:`bridge.fetch.ShardReader`. The loader starts
them right after it opened the version (:func:`start_early_fill`), and the
:class:`bridge.dataset.BatchDataset` built next adopts them.

Only for a dataset on local disk, read in place: a remote one's shards are downloaded by Mosaic.
The fill never raises (see :mod:`bridge.prefill`): a shard it cannot load is left to the pass,
which loads it again and raises naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from sparkbridge.bridge.cache import DEFAULT_DECODED_CACHE
from sparkbridge.bridge.fetch import ShardReader, check_hash_names
from sparkbridge.bridge.prefill import Prefill, start_prefill
from sparkbridge.bridge.resident import ResidentRows, fits
from sparkbridge.bridge.shards import ShardTable
from sparkbridge.log.snapshot import Snapshot

__all__ = ["EarlyFill", "start_early_fill"]


@dataclass
class EarlyFill:
    """A table, its reader and the prefill filling it (None when a thread would not pay)."""

    table: ShardTable
    reader: ShardReader
    prefill: Optional[Prefill]

    def stop(self) -> None:
        """Stop the prefill and wait for the shard it is loading (the dataset was not built)."""
        prefill, self.prefill = self.prefill, None
        if prefill is not None:
            prefill.stop()
            prefill.join()


def start_early_fill(snapshot: Snapshot, *, remote: Optional[str], local: Optional[str], origin: Optional[str],
                     validate_hash: Union[str, bool, None], decoded_cache_bytes: Optional[int]) -> Optional[EarlyFill]:
    """The fill of the resident table of a local dataset (``local``, or ``origin`` read in place
    through the cache folder ``local``), with the options the dataset gets; None when the
    dataset is remote or its rows do not fit one table. Raises what the dataset would for a
    ``validate_hash`` some shard lacks."""
    if local is None or not snapshot.rows or (remote is not None and remote != origin):
        return None
    source = origin or local
    table = ShardTable(snapshot.shards, cache_root=os.path.join(local, ""), origin_root=origin,
                       where=f"{source}, version {snapshot.version}")
    budget = int(decoded_cache_bytes or DEFAULT_DECODED_CACHE)
    if not fits(table, budget):
        return None
    table.check_declared_sizes(budget)
    check_hash_names(table, validate_hash, str(source))
    reader = ShardReader(dataset=None, table=table, validate_hash=validate_hash, remote=remote, source=str(source),
                         cache_limit=None, budget=budget, resident=ResidentRows.for_table(table))
    return EarlyFill(table=table, reader=reader, prefill=start_prefill(table, reader))
