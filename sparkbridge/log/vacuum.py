"""``vacuum``: delete the files no retained version references, fence writes that stalled.

What may be deleted (only files sparkbridge wrote, see :func:`sparkbridge.log.layout.owner`):

* files of versions older than the retention window: a version stays *retained* while it is the
  latest or while the commit that replaced it is younger than ``retention_seconds`` (so a reader
  mid-epoch on it is not cut off); the oldest retained version is recorded as ``retained_from``;
* files of writes that can no longer commit them: a finished write's unaccepted attempts (failed,
  retried, speculative, zombie), and the files of a write that never committed (or left a
  partitioned write open) and whose newest file is older than the retention window — that write is
  *fenced* first: the vacuum's own log entry names it, any later commit by it is refused, and the
  log replays it as rolled back (its partitions leave the dataset, the shards an overwrite removed
  come back): a fenced write is never served and never replaces data.

Kept: every file of every version from ``retained_from`` to the latest, where ``retained_from`` is
never above the complete version (:meth:`sparkbridge.log.snapshot.LogReader.complete_version`) a
default reader was served inside the window, nor above the one it is served after this vacuum.

Checkpoints (``_log/N.checkpoint.json``, a cache of the replay: entries are never deleted) older
than the *floor* are deleted too: the floor is the newest checkpoint at or below ``retained_from``
that is intact (its checksum verified now) and was written before the window began. Why that one:
a replay of any retained version starts from the newest checkpoint at or below it, which is the
floor or a newer one, all kept; and a reader picks its checkpoint from a listing of ``_log/``, so
one that listed after the floor appeared never picks an older one, while one that listed before
would have been reading for longer than the window (what protects shard files protects
checkpoints). A reader that loses its checkpoint anyway (``retention_seconds=0``) reads an older
one or the entries: slower, never wrong.

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

from sparkbridge.errors import CommitConflictError, DatasetNotFoundError, LogError, SparkbridgeError
from sparkbridge.log.commit import Draft, commit
from sparkbridge.log.derived import sync_derived
from sparkbridge.log.entry import LogEntry, Operation, parse_log_name
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


def _window_start(listing: dict[int, FileInfo], latest_version: int, cutoff: float) -> int:
    """Oldest version a reader may have been handed inside the window: the latest, and every
    version whose successor was committed after ``cutoff`` (store time)."""
    oldest = latest_version
    for v in range(latest_version - 1, -1, -1):
        successor = listing.get(v + 1)
        if successor is None or successor.mtime < cutoff:
            break
        oldest = v
    return oldest


def plan_vacuum(storage: Storage, *, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                reader: Optional[LogReader] = None) -> VacuumPlan:
    """Decide what :func:`vacuum` would delete and fence, without changing anything.

    Raises :class:`LogError` (before anything is committed) when the version default readers
    would be served after this vacuum is no longer retained: an earlier vacuum (sparkbridge before issue 22
    was fixed) may have deleted its files, and committing on top would hide that."""
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

    # 1. writes that may never commit again: not finished in the log and no sign of progress (a
    #    file of theirs, their begin entry) inside the window. Every open write is judged, also one
    #    whose files are all referenced (a failed partitioned write whose staging abort removed).
    by_write: dict[str, list[FileInfo]] = {}
    temp: list[FileInfo] = []
    for f in files:
        who = owner(f.rel)
        if who == "":
            temp.append(f)
        elif who is not None:
            by_write.setdefault(who, []).append(f)
    plan = VacuumPlan(root=storage.root, version=latest.version, retained_from=latest.retained_from)
    finished: set[str] = set(latest.fenced)
    for write_id in sorted(set(by_write) | {w.write_id for w in latest.open_writes}):
        state = latest.writes.get(write_id)
        if write_id in finished or (state is not None and state.state != "open"):
            finished.add(write_id)
            continue
        progress = [f.mtime for f in by_write.get(write_id, [])]
        if state is not None and state.begun_at in log_listing:
            progress.append(log_listing[state.begun_at].mtime)
        if progress and max(progress) >= cutoff:
            plan.kept_active.append(write_id)
        else:
            plan.fence.append(write_id)

    # 2. the state this vacuum's entry makes: every fenced write rolled back
    after = latest  # read only, unless fences change it (a copy of 100,000 shards costs seconds)
    if plan.fence:
        after = latest.copy()
        after.apply(LogEntry(operation=Operation.VACUUM, write_id="vacuum", read_version=latest.version,
                             version=latest.version + 1, fence=tuple(plan.fence)))
    served_after = reader.complete_version(at=after)

    # 3. retained versions: every version a reader may be reading (one handed out inside the window,
    #    and the complete version a default reader was served then), pinned ones included
    window = max(_window_start(log_listing, latest.version, cutoff), latest.retained_from)
    served_then = reader.complete_version(at=reader.snapshot(window) if window < latest.version else None)
    retained_from = window if served_then is None else max(min(window, served_then), latest.retained_from)
    if served_after is not None and served_after < retained_from:
        raise LogError(
            f"{storage.root}: version {served_after}, which default readers and index.json are served, is no "
            f"longer retained (an earlier vacuum recorded versions {latest.retained_from}.. only, and may have "
            f"deleted its files); nothing was changed. Finish the open write(s) "
            f"{', '.join(w.write_id for w in after.open_writes)} with resume=<write id>, or overwrite the dataset")
    plan.retained_from = retained_from
    # (temp files are never named like a shard: only a write's own files are candidates)
    keep = _keep_of_retained(reader, latest, after, retained_from, [f for w, fs in by_write.items()
                                                                    if w in finished or w in plan.fence for f in fs])
    for f in temp:
        if f.rel not in keep and f.mtime < cutoff:  # an abandoned temp file of a derived file or checkpoint
            plan.delete.append(f.rel)
            plan.reasons[f.rel] = "temporary file older than the retention window"
    fenced = set(plan.fence)
    for write_id, wfiles in sorted(by_write.items()):
        if write_id in fenced:
            reason = ("an open partitioned write idle for longer than the retention window (rolled back)"
                      if write_id in latest.writes else
                      "a write that never committed, idle for longer than the retention window")
        elif write_id in finished:
            reason = "not referenced by any retained version (an unaccepted attempt, or a replaced version)"
        else:
            continue  # active: its files are not touched
        for f in wfiles:
            if f.rel not in keep:
                plan.delete.append(f.rel)
                plan.reasons[f.rel] = reason
    for rel, reason in _superseded_checkpoints(reader, files, retained_from=retained_from, cutoff=cutoff,
                                               latest_version=latest.version):
        plan.delete.append(rel)
        plan.reasons[rel] = reason
    plan.delete.sort()
    return plan


def _superseded_checkpoints(reader: LogReader, files: list[FileInfo], *, retained_from: int, cutoff: float,
                            latest_version: int) -> list[tuple[str, str]]:
    """The checkpoints below the floor (see the module doc), with the reason, oldest first. The
    floor's checksum is verified only when there is something below it to delete."""
    checkpoints: dict[int, FileInfo] = {}
    for f in files:
        parsed = parse_log_name(f.rel)
        if parsed and parsed[1] == "checkpoint" and parsed[0] <= latest_version:
            checkpoints[parsed[0]] = f
    for floor in sorted((v for v, f in checkpoints.items() if v <= retained_from and f.mtime < cutoff),
                        reverse=True):
        older = sorted(v for v in checkpoints if v < floor)
        if not older:
            return []
        try:
            reader.verify_checkpoint(floor)
        except (LogError, OSError) as exc:  # a damaged floor supersedes nothing: readers skip it
            logger.warning("vacuum keeps the checkpoints below %s: %s", checkpoints[floor].rel, exc)
            continue
        reason = (f"a checkpoint superseded by {checkpoints[floor].rel} (written before the retention window; "
                  f"every retained version replays from it or a newer one)")
        return [(checkpoints[v].rel, reason) for v in older]
    return []


def _keep_of_retained(reader: LogReader, latest, after, retained_from: int, candidates: list[FileInfo]) -> set:
    """Every file a retained version (or the state this vacuum makes) references, as far as it
    decides about ``candidates`` (the files of finished or fenced writes).

    Why the shortcut: the latest state and the one after this vacuum reference most files; only
    when a candidate is outside both must the versions of the retention window be read (their
    entries, one by one). An append-only log has no such candidate, and every ``write_mds`` runs
    a vacuum: reading each entry of the last hour on every write made a write O(entries)."""
    keep = latest.files() | after.files()
    keep.discard(None)
    keep |= {k + ".tmp" for k in list(keep)}
    if all(f.rel in keep for f in candidates):
        return keep  # the retained versions could only add to a set that already holds them all
    keep = reader.snapshot(retained_from).files() if retained_from < latest.version else set()
    for v in range(retained_from + 1, latest.version + 1):
        entry = reader.read_entry(v)
        for e in entry.add:
            keep.update([(e.get("zip_data") or {}).get("basename"), e["raw_data"]["basename"]])
        if entry.fence:
            # a fence rolls writes back: shards an overwrite had removed are served again without
            # any ``add`` naming them (rare: only vacuum entries fence, so this replay is cheap)
            keep |= reader.snapshot(v).files()
    keep |= latest.files() | after.files()
    keep.discard(None)
    # a reader unpacking a shard right now writes <raw>.tmp beside it
    keep |= {k + ".tmp" for k in list(keep)}
    return keep


def vacuum(root_or_storage, *, retention_seconds: float = DEFAULT_RETENTION_SECONDS, dry_run: bool = False,
           attempts: int = 10, reader: Optional[LogReader] = None) -> VacuumPlan:
    """Delete what :func:`plan_vacuum` finds, after committing the fences and ``retained_from``.
    Also repairs ``index.json``/``manifest.json``. Returns the executed (or, with ``dry_run``, the
    proposed) plan. ``reader``: a reader of this storage to go on from (a write's own: it has
    the log replayed already, so the vacuum after a commit does not open the dataset again)."""
    storage = open_storage(root_or_storage) if isinstance(root_or_storage, (str, os.PathLike)) else root_or_storage
    reader = reader if reader is not None else LogReader(storage)
    for _ in range(attempts):
        plan = plan_vacuum(storage, retention_seconds=retention_seconds, reader=reader)
        if dry_run:
            return plan
        if not plan.delete and not plan.fence and plan.retained_from <= reader.latest().retained_from:
            _sync_derived(storage, reader)
            return plan
        draft = Draft(operation=Operation.VACUUM, write_id=new_write_id(), read_version=plan.version,
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
        _sync_derived(storage, reader)
        if plan.deleted or plan.fence:
            logger.info("vacuum of %s (version %d): deleted %d file(s), fenced %s", storage.root, entry.version,
                        plan.deleted, plan.fence or "no write")
        return plan
    raise CommitConflictError(f"{storage.root}: vacuum kept losing to concurrent commits; try again later")


def _sync_derived(storage: Storage, reader: LogReader) -> None:
    """The derived files after a vacuum: a cache, so a failure is logged, never raised (the plan
    checked before committing that the version they describe is retained)."""
    try:
        sync_derived(storage, reader)
    except (SparkbridgeError, OSError) as exc:
        logger.warning("%s: could not refresh index.json/manifest.json after the vacuum (%s: %s); the next "
                       "commit or vacuum retries", storage.root, type(exc).__name__, exc)


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
