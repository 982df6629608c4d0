"""``vacuum``: delete the files no retained version references, fence writes that stalled.

What may be deleted (only files sparkbridge wrote, see :func:`sparkbridge.log.layout.owner`):

* files of versions older than the retention window: a version stays *retained* while it is the
  latest or while the commit that replaced it is younger than ``retention_seconds`` (so a reader
  mid-epoch on it is not cut off); the oldest retained version is recorded as ``retained_from``;
* files of writes that can no longer commit them: a finished write's unaccepted attempts (failed,
  retried, speculative, zombie), and the files of a write that never committed (or left a
  partitioned write open) and whose newest file is older than the retention window — that write is
  *fenced* first: the vacuum's own log entry names it, and any later commit by it is refused.

Order, and why it is safe without trusting anybody's liveness: the vacuum commits its entry
(fences, ``retained_from``) *before* deleting anything. A writer that commits before that entry
is seen by the vacuum's re-read (its files are then referenced and kept); a writer that commits
after it either was fenced (its commit is refused: it can leave orphans at worst, which the next
vacuum removes) or was active inside the window (its files are not touched). Ages compare
modification times from the store with the store's clock, never two machines' clocks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from sparkbridge.errors import CommitConflictError, DatasetNotFoundError
from sparkbridge.log.commit import Draft, commit
from sparkbridge.log.derived import sync_derived
from sparkbridge.log.entry import parse_log_name
from sparkbridge.log.layout import LOG_DIR, STAGING, new_write_id, owner
from sparkbridge.log.snapshot import LogReader
from sparkbridge.storage import FileInfo, Storage, open_storage

__all__ = ["DEFAULT_RETENTION_SECONDS", "VacuumPlan", "plan_vacuum", "vacuum"]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_SECONDS = 3600.0


@dataclass
class VacuumPlan:
    """What a vacuum deletes and why (``reasons[path]``), which writes it fences, what it keeps."""

    root: str
    version: int
    retained_from: int
    delete: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    fence: list[str] = field(default_factory=list)
    kept_active: list[str] = field(default_factory=list)  # writes still inside the window
    committed_version: Optional[int] = None
    deleted: int = 0

    def summary(self) -> str:
        head = (f"{self.root}: {len(self.delete)} file(s) to delete, {len(self.fence)} write(s) to fence; "
                f"versions {self.retained_from}..{self.version} retained")
        lines = [head] + [f"  {p}  ({self.reasons[p]})" for p in self.delete[:200]]
        if len(self.delete) > 200:
            lines.append(f"  ... and {len(self.delete) - 200} more")
        lines += [f"  fence write {w} (no progress within the retention window)" for w in self.fence]
        lines += [f"  keep write {w} (active within the retention window)" for w in self.kept_active]
        return "\n".join(lines)


def _retained_from(reader: LogReader, listing: dict[int, FileInfo], latest_version: int, cutoff: float) -> int:
    """Oldest version still retained: the latest, and every version whose successor was committed
    after ``cutoff`` (store time)."""
    oldest = latest_version
    for v in range(latest_version - 1, -1, -1):
        successor = listing.get(v + 1)
        if successor is None or successor.mtime < cutoff:
            break
        oldest = v
    return max(oldest, reader.latest().retained_from)


def plan_vacuum(storage: Storage, *, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                reader: Optional[LogReader] = None) -> VacuumPlan:
    """Decide what :func:`vacuum` would delete and fence, without changing anything."""
    if retention_seconds < 0:
        raise ValueError(f"retention_seconds must be >= 0, got {retention_seconds}")
    reader = reader or LogReader(storage)
    latest = reader.refresh()
    if latest.version < 0:
        raise DatasetNotFoundError(f"{storage.root} has no dataset log to vacuum (nothing was committed with one)")
    files = storage.list_info("")
    now = storage.now()
    cutoff = now - retention_seconds
    log_listing = {}
    for f in files:
        parsed = parse_log_name(f.rel)
        if parsed and parsed[1] == "entry":
            log_listing[parsed[0]] = f
    retained_from = _retained_from(reader, log_listing, latest.version, cutoff)
    keep = reader.snapshot(retained_from).files() if retained_from < latest.version else set()
    for v in range(retained_from + 1, latest.version + 1):
        for e in reader.read_entry(v).add:
            keep.update([(e.get("zip_data") or {}).get("basename"), e["raw_data"]["basename"]])
    keep |= latest.files()
    keep.discard(None)
    # a reader unpacking a shard right now writes <raw>.tmp beside it
    keep |= {k + ".tmp" for k in list(keep)}

    by_write: dict[str, list[FileInfo]] = {}
    plan = VacuumPlan(root=storage.root, version=latest.version, retained_from=retained_from)
    for f in files:
        who = owner(f.rel)
        if who is None or f.rel in keep:
            continue
        if who == "":
            if f.mtime < cutoff:  # an abandoned temp file of a derived file or checkpoint
                plan.delete.append(f.rel)
                plan.reasons[f.rel] = "temporary file older than the retention window"
            continue
        by_write.setdefault(who, []).append(f)
    for write_id, wfiles in sorted(by_write.items()):
        state = latest.writes.get(write_id)
        finished = state is not None and state.state in ("complete", "fenced")
        finished = finished or write_id in latest.fenced
        if not finished:
            newest = max(f.mtime for f in wfiles)
            if newest >= cutoff:
                plan.kept_active.append(write_id)
                continue
            plan.fence.append(write_id)
            reason = ("an open partitioned write idle for longer than the retention window" if state is not None
                      else "a write that never committed, idle for longer than the retention window")
        else:
            reason = "not referenced by any retained version (an unaccepted attempt, or a replaced version)"
        for f in wfiles:
            plan.delete.append(f.rel)
            plan.reasons[f.rel] = reason
    plan.delete.sort()
    return plan


def vacuum(root_or_storage, *, retention_seconds: float = DEFAULT_RETENTION_SECONDS, dry_run: bool = False,
           attempts: int = 10) -> VacuumPlan:
    """Delete what :func:`plan_vacuum` finds, after committing the fences and ``retained_from``.
    Also repairs ``index.json``/``manifest.json``. Returns the executed (or, with ``dry_run``, the
    proposed) plan."""
    storage = open_storage(root_or_storage) if isinstance(root_or_storage, (str, os.PathLike)) else root_or_storage
    reader = LogReader(storage)
    for _ in range(attempts):
        plan = plan_vacuum(storage, retention_seconds=retention_seconds, reader=reader)
        if dry_run:
            return plan
        if not plan.delete and not plan.fence and plan.retained_from <= reader.latest().retained_from:
            sync_derived(storage, reader)
            return plan
        draft = Draft(operation="vacuum", write_id=new_write_id(), read_version=plan.version,
                      fence=tuple(plan.fence), retained_from=plan.retained_from,
                      info={"deleted": len(plan.delete), "retention_seconds": retention_seconds})
        try:
            entry = commit(storage, draft, reader=reader, max_attempts=1)
        except CommitConflictError:
            logger.info("%s: a commit landed while vacuum planned; planning again", storage.root)
            continue
        plan.committed_version = entry.version
        storage.delete(plan.delete)
        plan.deleted = len(plan.delete)
        _prune_empty_dirs(storage, plan)
        sync_derived(storage, reader)
        if plan.deleted or plan.fence:
            logger.info("vacuum of %s (version %d): deleted %d file(s), fenced %s", storage.root, entry.version,
                        plan.deleted, plan.fence or "no write")
        return plan
    raise CommitConflictError(f"{storage.root}: vacuum kept losing to concurrent commits; try again later")


def _prune_empty_dirs(storage: Storage, plan: VacuumPlan) -> None:
    """Local roots: remove the folders the deletes emptied (never a folder of an active write)."""
    if not storage.is_local:
        return
    folders = {os.path.dirname(storage.local_path(rel)) for rel in plan.delete}
    active = set(plan.kept_active)
    for folder in sorted(folders, key=len, reverse=True):
        rel = os.path.relpath(folder, storage.root).replace(os.sep, "/")
        path = folder
        while rel not in (".", "", LOG_DIR) and not any(rel.startswith(w) or rel.startswith(f"{STAGING}/{w}")
                                                        for w in active):
            try:
                os.rmdir(path)
            except OSError:
                break
            path = os.path.dirname(path)
            rel = os.path.dirname(rel)
