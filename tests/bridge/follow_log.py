"""A partitioned write through the dataset log, without Spark: what ``write_mds(commit="partition")``
commits (a ``begin``, one ``partition`` entry per partition with its shards, a ``complete``), with
shards written by stock ``streaming.MDSWriter``. Followed-epoch tests use it to land partitions of
chosen sizes at chosen moments (hundreds of cases in one torchrun job); the end-to-end tests with
real Spark live in test_follow.py.

Rows are ``id`` int64 (numbered in commit order from ``first``) and ``x`` float64 = id / 4."""

from __future__ import annotations

import json
import os
import uuid
from typing import Optional

import numpy as np

from sparkbridge.log import Draft, LogReader, commit
from sparkbridge.storage import open_storage

__all__ = ["PartitionedWrite", "SCHEMA"]

SCHEMA = {
    "columns": [
        {"name": "id", "logical": "int64", "encoding": "int64", "spark_type": "bigint", "nullable": False},
        {"name": "x", "logical": "float64", "encoding": "float64", "spark_type": "double", "nullable": False},
    ],
    "fingerprint": "follow-log-test-id-x", "nulls": "error", "compression": None, "hashes": ["xxh64"],
}


class PartitionedWrite:
    """One open write to ``root``: :meth:`partition` commits the next ``rows`` ids, :meth:`complete`
    closes it. ``compression``/``size_limit`` shape the shards (``size_limit`` small: many shards)."""

    def __init__(self, root: str, *, compression: Optional[str] = None, size_limit: int = 1 << 16,
                 mode: str = "create", first: int = 0) -> None:
        self.root = str(root)
        self.storage = open_storage(self.root)
        self.reader = LogReader(self.storage)
        self.write_id = f"j20260101T000000-{uuid.uuid4().hex[:8]}"
        self.compression, self.size_limit = compression, size_limit
        self.next_id = first
        self.partitions = 0
        base = self.reader.refresh()
        remove = tuple((s.get("zip_data") or s["raw_data"])["basename"] for s in base.shards) \
            if mode == "overwrite" else ()
        self.begun = commit(self.storage, Draft(operation="begin", mode=mode, write_id=self.write_id,
                                                read_version=base.version, remove=remove, schema=SCHEMA),
                            reader=self.reader)

    def _shards(self, folder: str, ids: np.ndarray) -> list[dict]:
        from streaming import MDSWriter

        path = os.path.join(self.root, folder)
        with MDSWriter(out=path, columns={"id": "int64", "x": "float64"}, compression=self.compression,
                       hashes=["xxh64"], size_limit=self.size_limit) as w:
            for i in ids.tolist():
                w.write({"id": np.int64(i), "x": np.float64(i) / 4})
        index = os.path.join(path, "index.json")
        with open(index, encoding="utf-8") as f:
            shards = json.load(f)["shards"]
        os.remove(index)  # a partition's folder holds shards only, as write_mds leaves it
        for s in shards:
            for key in ("raw_data", "zip_data"):
                if s.get(key):
                    s[key]["basename"] = f"{folder}/{s[key]['basename']}"
        return shards

    def partition(self, rows: int, *, damaged: bool = False) -> int:
        """Commit the next ``rows`` ids as one partition (no shard when ``rows`` is 0); its version.
        ``damaged``: one byte of its first shard file is flipped before the commit (its hash fails)."""
        ids = np.arange(self.next_id, self.next_id + rows, dtype=np.int64)
        k = self.partitions
        add = tuple(self._shards(f"{self.write_id}/p{k:05d}-a0", ids)) if rows else ()
        if damaged:
            path = os.path.join(self.root, (add[0].get("zip_data") or add[0]["raw_data"])["basename"])
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[len(data) // 2] ^= 0xFF
                f.seek(0)
                f.write(bytes(data))
        read = self.reader.refresh().version
        entry = commit(self.storage, Draft(operation="partition", write_id=self.write_id, read_version=read,
                                           partition=k, add=add), reader=self.reader)
        self.next_id += rows
        self.partitions += 1
        return entry.version

    def complete(self) -> int:
        read = self.reader.refresh().version
        entry = commit(self.storage, Draft(operation="complete", write_id=self.write_id, read_version=read,
                                           rows=self.next_id), reader=self.reader)
        return entry.version
