"""Where everything lives inside a dataset root, and which files a committed version owns.

Layout (``J`` is a job id such as ``j20260101T120000-1a2b3c4d``)::

    index.json                      the commit point, written last
    manifest.json                   logical schema, retention records
    J/p00003-a17/shard.00000.mds.zstd   committed shards of job J (partition 3, task attempt 17)
    _staging/J/_job.json            job J's descriptor (host, pid, heartbeat) while it runs
    _staging/J/p00003-a17/...       local outputs: attempt folders until commit renames them

Why: attempt ids are unique only within one Spark application, so every job gets its own id and
folder; attempts are created with ``os.mkdir`` under ``_staging/J`` so a failed attempt's writer that
outlives the job cannot write once staging is removed. Only names matching this layout are ever
called orphans or deleted, so a dataset root that also holds a user's own files is safe.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from sparkbridge.format.manifest import MANIFEST_BASENAME, Manifest
from sparkbridge.format.mds import INDEX_BASENAME

__all__ = [
    "STAGING",
    "JOB_FILE",
    "STALE_AFTER_SECONDS",
    "shard_files",
    "new_job_id",
    "is_job_id",
    "attempt_name",
    "staging_prefix",
    "job_file",
    "JobInfo",
    "read_jobs",
    "is_live",
    "referenced_files",
    "retained_files",
    "find_orphans",
    "read_index",
    "read_manifest",
]

STAGING = "_staging"
JOB_FILE = "_job.json"
#: A job whose heartbeat is older than this (and not provably alive on this host) is dead.
STALE_AFTER_SECONDS = 120.0
_JOB_RE = re.compile(r"^j\d{8}T\d{6}-[0-9a-f]{8}$")


def new_job_id() -> str:
    """Sortable by start time, unique across hosts."""
    return time.strftime("j%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def is_job_id(name: str) -> bool:
    return bool(_JOB_RE.match(name))


def attempt_name(partition: int, task_attempt_id: int) -> str:
    return f"p{partition:05d}-a{task_attempt_id}"


def staging_prefix(job_id: str) -> str:
    return f"{STAGING}/{job_id}"


def job_file(job_id: str) -> str:
    return f"{STAGING}/{job_id}/{JOB_FILE}"


@dataclass(frozen=True)
class JobInfo:
    """A running (or crashed) job's descriptor, rewritten by its driver as a heartbeat."""

    job_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    mode: str = ""

    @classmethod
    def create(cls, job_id: str, mode: str) -> "JobInfo":
        now = time.time()
        return cls(job_id, socket.gethostname(), os.getpid(), now, now, mode)

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"job {self.job_id} (host {self.host}, pid {self.pid}, started {started})"


def read_jobs(storage: Any) -> list[JobInfo]:
    """Descriptors of every job with a staging folder (unreadable ones are skipped)."""
    jobs = []
    for rel, _ in storage.list_files(STAGING + "/"):
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == JOB_FILE and is_job_id(parts[1]):
            try:
                obj = json.loads(storage.read_bytes(rel))
                jobs.append(JobInfo(**obj))
            except (FileNotFoundError, ValueError, TypeError):
                continue
    return jobs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(job: JobInfo, *, now: Optional[float] = None) -> bool:
    """Alive: heartbeat recent and, when it ran on this host, its driver process still exists."""
    now = time.time() if now is None else now
    if now - job.heartbeat_at > STALE_AFTER_SECONDS:
        return False
    if job.host == socket.gethostname():
        return _pid_alive(job.pid)
    return True


def read_index(storage: Any) -> Optional[tuple[bytes, dict[str, Any]]]:
    """The committed ``index.json`` (raw bytes and parsed), or None when there is no dataset."""
    try:
        raw = storage.read_bytes(INDEX_BASENAME)
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{storage.url(INDEX_BASENAME)} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or "shards" not in obj:
        raise ValueError(f"{storage.url(INDEX_BASENAME)} is not an MDS index (no 'shards' list)")
    return raw, obj


def read_manifest(storage: Any) -> Optional[Manifest]:
    try:
        text = storage.read_bytes(MANIFEST_BASENAME).decode("utf-8")
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, source=storage.url(MANIFEST_BASENAME))


def shard_files(entry: dict[str, Any]) -> list[str]:
    """Files one index entry stands for: the stored file and the raw shard a reader may unpack."""
    out = []
    for key in ("zip_data", "raw_data"):
        info = entry.get(key)
        if info and info.get("basename"):
            out.append(info["basename"])
    return out


def referenced_files(index: dict[str, Any]) -> set[str]:
    """Every file a committed version references (stored shards and their unpacked caches)."""
    out = {INDEX_BASENAME, MANIFEST_BASENAME}
    for entry in index.get("shards", []):
        out.update(shard_files(entry))
    return out


def retained_files(manifest: Optional[Manifest]) -> list[dict[str, Any]]:
    """Retention records of earlier versions: ``[{"files": [...], "expires_at": t}, ...]``."""
    if manifest is None:
        return []
    return list(manifest.extra.get("retained", []))


def _owned(rel: str) -> bool:
    """Whether a path is one sparkbridge writes (anything else in the root is left alone)."""
    top = rel.split("/", 1)[0]
    if top == STAGING or is_job_id(top):
        return True
    base = rel.rsplit("/", 1)[-1]
    return base.startswith((f".{INDEX_BASENAME}.", f".{MANIFEST_BASENAME}.")) and base.endswith(".tmp")


def find_orphans(storage: Any, *, listing: Optional[Iterable[tuple[str, int]]] = None) -> list[str]:
    """Files written by sparkbridge that no committed version, retention record or running job
    owns: leftovers of failed, retried or speculative attempts and of crashed runs. Sorted.

    Order matters: list the files first, then the running jobs, then the committed version. A job
    that registers after the listing has no file in it; one that commits after the jobs were read
    was live when they were; so no file of a running or just-committed job is called an orphan."""
    files = list(storage.list_files("") if listing is None else listing)
    live = {job.job_id for job in read_jobs(storage) if is_live(job)}
    current = read_index(storage)
    keep = referenced_files(current[1]) if current else {INDEX_BASENAME, MANIFEST_BASENAME}
    for record in retained_files(read_manifest(storage) if current else None):
        keep.update(record.get("files", []))
    keep.update(f + ".tmp" for f in list(keep))  # a reader unpacking a shard right now
    orphans = []
    for rel, _ in files:
        if rel in keep or not _owned(rel):
            continue
        parts = rel.split("/")
        job = parts[1] if parts[0] == STAGING and len(parts) > 1 else parts[0]
        if job in live:
            continue
        orphans.append(rel)
    return sorted(orphans)
