"""The commit protocol: job registration, then manifest + ``index.json`` last, then cleanup.

Why this order: a reader sees a dataset only through ``index.json``, so writing it last (one atomic
replace locally, one PUT on S3) makes the whole job atomic. Only shards from the manifest rows the
driver collected (one accepted attempt per partition) are referenced; failed, retried and speculative
attempts' files are removed afterwards. ``overwrite`` keeps the previous version's shards for a
retention period (recorded in ``manifest.json``) so a reader mid-epoch is not cut off — as Delta's
VACUUM does; a later write deletes them once expired.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

from sparkbridge.errors import ConcurrentWriteError, DatasetExistsError, SchemaMismatchError
from sparkbridge.etl.layout import (
    STALE_AFTER_SECONDS,
    STAGING,
    JobInfo,
    find_orphans,
    is_job_id,
    is_live,
    job_file,
    read_index,
    read_jobs,
    read_manifest,
    referenced_files,
    retained_files,
    staging_prefix,
)
from sparkbridge.format.manifest import MANIFEST_BASENAME, ColumnSpec, Manifest
from sparkbridge.format.mds import INDEX_BASENAME

__all__ = [
    "MODES",
    "DatasetExistsError",
    "ConcurrentWriteError",
    "SchemaMismatchError",
    "Job",
    "start_job",
    "check_mode",
    "schema_diff",
    "commit",
]

log = logging.getLogger(__name__)

MODES = ("error", "overwrite", "append")
HEARTBEAT_SECONDS = 15.0


class Job:
    """A registered write job: its descriptor in ``_staging/<job>/`` is refreshed as a heartbeat."""

    def __init__(self, storage: Any, info: JobInfo, base_index_sha: Optional[str]) -> None:
        self.storage = storage
        self.info = info
        self.base_index_sha = base_index_sha
        self.committed = False  # once index.json names this job's shards, abort must keep them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"sparkbridge-heartbeat-{info.job_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def job_id(self) -> str:
        return self.info.job_id

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                info = JobInfo(**{**self.info.__dict__, "heartbeat_at": time.time()})
                self.storage.write_bytes_atomic(job_file(self.job_id), info.to_bytes())
            except Exception as exc:  # a missed heartbeat only makes the job look stale sooner
                log.warning("heartbeat of %s failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def abort(self) -> None:
        """Remove everything this job wrote (its staging and, on S3, its uploaded shards)."""
        self.stop()
        if self.committed:
            return
        self.storage.delete_prefix(f"{self.job_id}/")
        self.storage.delete_prefix(f"{staging_prefix(self.job_id)}/")
        _prune_empty_dirs(self.storage)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_job(storage: Any, job_id: str, mode: str) -> Job:
    """Register the job, refusing when another live job writes the same output."""
    current = read_index(storage)
    info = JobInfo.create(job_id, mode)
    if storage.is_local:
        os.makedirs(storage.local_path(staging_prefix(job_id)), exist_ok=False)
    storage.write_bytes_atomic(job_file(job_id), info.to_bytes())
    # any other live job blocks: two jobs registering together may both fail (the user retries),
    # but never both proceed — comparing start times taken before registering cannot promise that
    blockers = [j for j in read_jobs(storage) if j.job_id != job_id and is_live(j)]
    if blockers:
        storage.delete_prefix(f"{staging_prefix(job_id)}/")
        raise ConcurrentWriteError(
            f"{storage.root} is being written by another {blockers[0].describe()}; wait for it to "
            "finish (or, if it crashed on another host, for its heartbeat to go stale after "
            f"{int(STALE_AFTER_SECONDS)} s) and retry"
        )
    return Job(storage, info, _sha(current[0]) if current else None)


def check_mode(storage: Any, mode: str) -> tuple[Optional[Manifest], Optional[str]]:
    """Apply ``mode`` to what exists; returns the existing manifest (for append/overwrite) and the
    sha256 of the ``index.json`` it was checked against (None when there is no dataset), which the
    writer compares with the job's base once registered: a commit in between must not be missed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    current = read_index(storage)
    if current is None:
        return None, None
    if mode == "error":
        raise DatasetExistsError(
            f"{storage.root} already holds a dataset ({INDEX_BASENAME} exists); pass mode='overwrite' "
            "to replace it or mode='append' to add to it"
        )
    manifest = read_manifest(storage)
    if mode == "append" and manifest is None:
        raise SchemaMismatchError(
            f"{storage.root} has no {MANIFEST_BASENAME}: it was not written by sparkbridge, so its "
            "logical schema is unknown and append cannot check it; use mode='overwrite' or a new output"
        )
    return manifest, _sha(current[0])


def _logical(col: ColumnSpec) -> dict[str, Any]:
    decimal_as = None
    if col.logical == "decimal":
        decimal_as = "float64" if col.encoding == "float64" else "string"
    return {"logical": col.logical, "element": col.element, "null_mask": col.null_mask,
            "decimal_as": decimal_as}


def schema_diff(old: Sequence[ColumnSpec], new: Sequence[ColumnSpec]) -> list[str]:
    """Human-readable differences between two logical schemas (empty when they match)."""
    diffs = []
    old_by = {c.name: c for c in old}
    new_by = {c.name: c for c in new}
    for name in old_by:
        if name not in new_by:
            diffs.append(f"column {name!r} ({old_by[name].logical}) is missing from the new data")
    for name in new_by:
        if name not in old_by:
            diffs.append(f"column {name!r} ({new_by[name].logical}) is not in the existing dataset")
    for name in old_by:
        if name in new_by:
            a, b = _logical(old_by[name]), _logical(new_by[name])
            for key in a:
                if a[key] != b[key]:
                    diffs.append(f"column {name!r}: {key} is {a[key]!r} in the dataset but {b[key]!r} now")
    if not diffs and [c.name for c in old] != [c.name for c in new]:
        diffs.append(f"column order differs: dataset {[c.name for c in old]}, now {[c.name for c in new]}")
    return diffs


def _rename_attempts(storage: Any, job_id: str, attempts: Sequence[str]) -> None:
    """Local outputs: move each accepted attempt folder from staging to ``<job>/``."""
    dest_root = storage.local_path(job_id)
    os.makedirs(dest_root, exist_ok=True)
    src_root = storage.local_path(staging_prefix(job_id))
    for attempt in attempts:
        os.rename(os.path.join(src_root, attempt), os.path.join(dest_root, attempt))


def _prune_empty_dirs(storage: Any) -> None:
    """Remove empty folders left by deletes (local only), never those of a running job."""
    if not storage.is_local or not os.path.isdir(storage.root):
        return
    live = {j.job_id for j in read_jobs(storage) if is_live(j)}
    tops = [n for n in os.listdir(storage.root) if is_job_id(n) and n not in live]
    staging = os.path.join(storage.root, STAGING)
    if os.path.isdir(staging):
        tops += [os.path.join(STAGING, n) for n in os.listdir(staging) if n not in live]
        tops.append(STAGING)
    for top in tops:
        path = os.path.join(storage.root, top)
        for folder, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
            try:
                os.rmdir(folder)
            except OSError:  # not empty
                pass


def commit(
    storage: Any,
    job: Job,
    *,
    mode: str,
    tasks: Sequence[dict[str, Any]],
    columns: Sequence[ColumnSpec],
    old_manifest: Optional[Manifest],
    nulls: str,
    compression: Optional[str],
    hashes: Sequence[str],
    retention_seconds: float,
    schema_fingerprint: str,
    extra: dict[str, Any],
) -> tuple[Manifest, dict[str, Any]]:
    """Reference the accepted attempts' shards, write manifest then index, then clean up."""
    tasks = sorted(tasks, key=lambda t: t["partition"])
    entries = []
    for task in tasks:
        for entry in task["entries"]:
            entry = dict(entry)
            for key in ("raw_data", "zip_data"):
                if entry.get(key):
                    entry[key] = dict(entry[key], basename=f"{job.job_id}/{task['attempt']}/{entry[key]['basename']}")
            entries.append(entry)
    current = read_index(storage)
    current_sha = _sha(current[0]) if current else None
    if current_sha != job.base_index_sha:
        raise ConcurrentWriteError(
            f"{storage.url(INDEX_BASENAME)} changed while this job was writing (another writer committed "
            "meanwhile); nothing was committed, retry the write"
        )
    now = time.time()
    retained = []
    expired_files: list[str] = []
    for record in retained_files(old_manifest):
        (expired_files.extend(record.get("files", [])) if record.get("expires_at", 0) <= now
         else retained.append(record))
    old_entries = current[1]["shards"] if current else []
    if mode == "append" and current:
        all_entries = list(old_entries) + entries  # array encodings were kept by the writer's plan
    else:
        all_entries = entries
        if current:
            old_files = sorted(referenced_files(current[1]) - {INDEX_BASENAME, MANIFEST_BASENAME})
            if old_files:
                retained.append({"files": old_files, "expires_at": now + retention_seconds,
                                 "replaced_at": now})
    if storage.is_local:
        _rename_attempts(storage, job.job_id, [t["attempt"] for t in tasks if t["entries"]])
    index = {"shards": all_entries, "version": 2}
    index_bytes = json.dumps(index, sort_keys=True).encode("utf-8")
    manifest = Manifest(
        rows=int(sum(e["samples"] for e in all_entries)),
        shards=len(all_entries),
        columns=list(columns),
        index_sha256=_sha(index_bytes),
        schema_fingerprint=schema_fingerprint,
        nulls=nulls,
        compression=compression,
        hashes=list(hashes),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        extra={**extra, "retained": retained, "retention_seconds": retention_seconds,
               "job_id": job.job_id},
    )
    _write_manifest_then_index(storage, manifest.to_json().encode("utf-8"), index_bytes)
    job.committed = True
    job.stop()
    _cleanup(storage, job, expired_files)
    return manifest, index


def _write_manifest_then_index(storage: Any, manifest_bytes: bytes, index_bytes: bytes) -> None:
    """Manifest first, then the index (the commit point); if the index write fails, the previous
    manifest is put back so ``manifest.json`` never describes a version that was not committed."""
    try:
        old_manifest_bytes: Optional[bytes] = storage.read_bytes(MANIFEST_BASENAME)
    except FileNotFoundError:
        old_manifest_bytes = None
    storage.write_bytes_atomic(MANIFEST_BASENAME, manifest_bytes)
    try:
        storage.write_bytes_atomic(INDEX_BASENAME, index_bytes)
    except BaseException:
        try:
            if old_manifest_bytes is None:
                storage.delete([MANIFEST_BASENAME])
            else:
                storage.write_bytes_atomic(MANIFEST_BASENAME, old_manifest_bytes)
        except Exception as exc:  # the index write's error is the one to report
            log.warning("could not restore %s after the index write failed: %s",
                        storage.url(MANIFEST_BASENAME), exc)
        raise


def _cleanup(storage: Any, job: Job, expired_files: Sequence[str]) -> None:
    """After the commit: this job's staging, expired retained files, then every orphan."""
    try:
        storage.delete_prefix(f"{staging_prefix(job.job_id)}/")
        if expired_files:
            storage.delete(list(expired_files) + [f + ".tmp" for f in expired_files])
            log.info("deleted %d files of versions whose retention expired", len(expired_files))
        orphans = find_orphans(storage)
        if orphans:
            storage.delete(orphans)
            log.info("deleted %d orphaned files (failed/speculative attempts, crashed runs)", len(orphans))
        _prune_empty_dirs(storage)
    except Exception as exc:  # the commit already happened; leftovers are reported by validate
        log.warning("cleanup after committing %s failed: %s (run `sparkbridge validate`)", storage.root, exc)

