"""``commit="partition"``: a task commits its own partition to the dataset log as soon as it is done.

Why in the task: the driver only sees task results when the whole job ends, and the point of a
partition commit is that a reader can train on partition 3 while partition 40 is still being
written. Exactly once: the log entry claims ``(write id, partition)``, and the first entry for a
pair wins (:mod:`sparkbridge.log.commit`); a retried, speculative or zombie attempt that finishes
later finds the claim, deletes its own files and adds nothing. A task whose partition is already
claimed when it starts (a retry after a crash past the commit, ``resume=True``) writes nothing.

Steps of one task, and what a crash after each leaves: write shards (orphans) → publish them
(local: fsync, rename out of staging; orphans) → commit the partition entry (committed exactly
once, or not at all) → return the manifest row to the driver (a retry finds the claim).
"""

from __future__ import annotations

import os
from typing import Any

from sparkbridge import _faults
from sparkbridge.log.commit import Draft, Superseded, commit
from sparkbridge.log.entry import Operation
from sparkbridge.log.layout import staging_prefix
from sparkbridge.log.snapshot import LogReader
from sparkbridge.storage import publish_folders

__all__ = ["claimed", "commit_partition", "attempt_entries"]


def claimed(cfg: Any, partition: int) -> bool:
    """Whether this write's ``partition`` is already committed (or the write is no longer open)."""
    snap = LogReader(cfg.storage).refresh()
    w = snap.writes.get(cfg.job_id)
    return w is not None and (partition in w.partitions or w.state != "open")


def attempt_entries(write_id: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's index entries with basenames relative to the dataset root (``W/<attempt>/...``)."""
    out = []
    for entry in row["entries"]:
        entry = dict(entry)
        for key in ("raw_data", "zip_data"):
            if entry.get(key):
                entry[key] = dict(entry[key], basename=f"{write_id}/{row['attempt']}/{entry[key]['basename']}")
        out.append(entry)
    return out


def _publish(cfg: Any, attempt: str) -> None:
    storage = cfg.storage
    if not storage.is_local:
        return  # S3 attempts upload straight to W/<attempt>/
    # this attempt's files only: the write's folder holds every partition published before it
    publish_folders(storage.local_path(staging_prefix(cfg.job_id)), [attempt], storage.local_path(cfg.job_id))


def commit_partition(cfg: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Publish and commit one finished attempt's shards; returns ``row`` with ``version`` (the log
    version of its entry) or ``superseded`` (another attempt had claimed the partition)."""
    attempt, partition = row["attempt"], row["partition"]
    _publish(cfg, attempt)
    _faults.point(f"etl.partition.before_log.p{partition}.a{row['attempt_number']}")
    draft = Draft(operation=Operation.PARTITION, write_id=cfg.job_id, read_version=cfg.read_version, partition=partition,
                  add=tuple(attempt_entries(cfg.job_id, row)), info={"attempt": attempt, "rows": row["rows"]})
    try:
        entry = commit(cfg.storage, draft)
    except Superseded:
        cfg.storage.delete_prefix(f"{cfg.job_id}/{attempt}/")
        if cfg.storage.is_local:
            try:
                os.rmdir(cfg.storage.local_path(f"{cfg.job_id}/{attempt}"))
            except OSError:
                pass
        return dict(row, entries=[], superseded=True)
    _faults.point(f"etl.partition.after_log.p{partition}.a{row['attempt_number']}")
    return dict(row, version=entry.version)
