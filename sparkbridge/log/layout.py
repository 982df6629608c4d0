"""Where everything lives inside a dataset root.

Layout (``W`` is a write id such as ``j20260101T120000-1a2b3c4d``)::

    _log/00000000000000000000.json      version 0: the commit point of every change (put-if-absent)
    _log/00000000000000000032.checkpoint.json   the replayed state at version 32 (a cache)
    index.json, manifest.json           derived from the latest version, for stock Mosaic readers
    W/p00003-r1a2b3c4d-a17/shard.00000.mds.zstd   shards of write W (partition 3, driver run r1a2b3c4d,
                                        task attempt 17)
    _staging/W/_job.json                write W's descriptor (host, pid, start) — information only
    _staging/W/p00003-r…-a17/...        local outputs: attempt folders until their commit

Why: attempt ids are unique only within one Spark application, so every write gets its own id and
folder, and every driver run of a write (a resumed write may run in several applications at once: a
duplicate submission, a straggler of the crashed run) its own run id in the attempt folder names; local attempts are created with ``os.mkdir`` under ``_staging/W`` so a failed attempt's
writer that outlives the job cannot write once staging is removed. Only names matching this layout
are ever deleted (:func:`owner` says which write a file belongs to), so a dataset root that also
holds a user's own files is safe.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Optional

__all__ = [
    "LOG_DIR",
    "STAGING",
    "JOB_FILE",
    "new_write_id",
    "is_write_id",
    "new_run_id",
    "attempt_name",
    "staging_prefix",
    "job_file",
    "owner",
]

LOG_DIR = "_log"
STAGING = "_staging"
JOB_FILE = "_job.json"
_WRITE_RE = re.compile(r"^[js]\d{8}T\d{6}-[0-9a-f]{8}$")
_TMP_RE = re.compile(r"^\.(index\.json|manifest\.json|\d{20}\.json|\d{20}\.checkpoint\.json)\..*\.tmp$")


def new_write_id(kind: str = "j") -> str:
    """Sortable by start time, unique across hosts: ``j…`` for a batch write, ``s…`` for a stream."""
    if kind not in ("j", "s"):
        raise ValueError(f"write id kind must be 'j' or 's', got {kind!r}")
    return time.strftime(f"{kind}%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def is_write_id(name: str) -> bool:
    return bool(_WRITE_RE.match(name))


def new_run_id() -> str:
    """Unique per ``write_mds`` call (per driver run of a write): task attempt ids restart at 0 in
    every Spark application, so two applications resuming one write would otherwise share attempt
    folder names, and the loser's cleanup would delete the winner's committed shards."""
    return "r" + uuid.uuid4().hex[:8]


def attempt_name(partition: int, task_attempt_id: int, run: str = "") -> str:
    """``p00003-r1a2b3c4d-a17``: partition, the driver run (:func:`new_run_id`), the task attempt."""
    return f"p{partition:05d}-{run}-a{task_attempt_id}" if run else f"p{partition:05d}-a{task_attempt_id}"


def staging_prefix(write_id: str) -> str:
    return f"{STAGING}/{write_id}"


def job_file(write_id: str) -> str:
    return f"{STAGING}/{write_id}/{JOB_FILE}"


def owner(rel: str) -> Optional[str]:
    """The write a file belongs to (its id), ``""`` for sparkbridge's own temp files, or None when
    sparkbridge did not write it (never deleted)."""
    parts = rel.split("/")
    if parts[0] == STAGING and len(parts) > 2 and is_write_id(parts[1]):
        return parts[1]
    if len(parts) > 1 and is_write_id(parts[0]):
        return parts[0]
    if _TMP_RE.match(parts[-1]) and (len(parts) == 1 or (len(parts) == 2 and parts[0] == LOG_DIR)):
        return ""
    return None
