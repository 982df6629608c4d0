"""``index.json`` and ``manifest.json``: snapshots of the latest version for stock Mosaic readers.

"Latest" means the newest version with no write open: a write committed a partition at a time
(``commit="partition"``) reaches stock readers only once complete, at its end.

They are derived, never the commit point: a crash after a log entry and before these files leaves
them at an earlier version (stock readers see that earlier, consistent version; sparkbridge reads
the log), and the next commit, ``sparkbridge vacuum`` or :func:`sync_derived` repairs them.

Two writers finishing together must not leave an older version on top of a newer one. Each
write is a compare-and-swap (``If-Match`` on S3, a lock file beside it locally) of content derived
from the latest version *read after* the previous file was seen; a writer that loses re-reads and
tries again, and stops as soon as the files already describe the latest version or a newer one.
``manifest.json`` is written first (it records the version), ``index.json`` last, as before.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from sparkbridge.format.index import index_sha256
from sparkbridge.format.manifest import MANIFEST_BASENAME
from sparkbridge.format.mds import INDEX_BASENAME
from sparkbridge.log.snapshot import LogReader, Snapshot
from sparkbridge.storage import Storage

__all__ = ["sync_derived", "derived_version"]

logger = logging.getLogger(__name__)


def derived_version(manifest_bytes: Optional[bytes]) -> int:
    """The log version a ``manifest.json`` was derived from (-1 when unknown)."""
    if not manifest_bytes:
        return -1
    try:
        return int(json.loads(manifest_bytes).get("extra", {}).get("log_version", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


def sync_derived(storage: Storage, reader: Optional[LogReader] = None, *, attempts: int = 20) -> Optional[int]:
    """Bring ``index.json`` and ``manifest.json`` to the latest complete version; returns that
    version, or None when there is none yet or another writer keeps winning (the files are then at
    least as new as when called)."""
    from sparkbridge import _faults

    reader = reader or LogReader(storage)
    for _ in range(attempts):
        m_bytes, m_token = storage.read_token(MANIFEST_BASENAME)
        i_bytes, i_token = storage.read_token(INDEX_BASENAME)
        version = reader.complete_version()
        if version is None or version < 0:
            return None  # nothing complete yet (or no log): nothing to derive
        # only read here: the reader's own state is used, not a copy (copying 100,000 shard
        # entries took longer than deriving both files), and the index is serialized once
        current = reader.latest()
        latest: Snapshot = current if current.version == version else reader.snapshot(version)
        have = derived_version(m_bytes)
        index = latest.index_bytes()
        digest = index_sha256([], index)
        in_sync = i_bytes is not None and index_sha256([], i_bytes) == digest
        if have >= latest.version and in_sync:
            return latest.version
        if have > latest.version:  # a newer writer's files (we read an older log): leave them
            return have
        manifest = latest.manifest(index_digest=digest)
        if manifest is not None and have < latest.version:
            if not storage.swap(MANIFEST_BASENAME, manifest.to_json().encode("utf-8"), m_token):
                continue
        _faults.point("log.derived.between_manifest_and_index")
        if not in_sync and not storage.swap(INDEX_BASENAME, index, i_token):
            continue
        return latest.version
    logger.warning("%s: index.json/manifest.json kept changing under this writer; left them to the others",
                   storage.root)
    return None
