"""Which dataset version a loader reads, decided freshly every time a loader is built.

Why here and not in Mosaic: Mosaic reads ``index.json`` from the cache folder when one is there,
so after an overwrite a loader built with the same ``local=`` served the old data, and its resume
state (the hash of that cached index) accepted it. A loader now asks the dataset itself: the log's
latest version (or the pinned ``version=``) for local and ``s3://`` roots, a fresh ``index.json``
for other remotes Mosaic can download from but sparkbridge cannot list. Under ``torchrun`` rank 0
decides the version and every rank reads that one, so a commit landing while ranks start cannot
give them different data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlparse

from sparkbridge.errors import DatasetNotFoundError, ShardFormatError, UsageError, VersionNotFoundError
from sparkbridge.format.index import check_index
from sparkbridge.format.jsonload import loads
from sparkbridge.log.snapshot import LogReader, Snapshot
from sparkbridge.storage import Storage, open_storage

__all__ = ["Source", "resolve_source", "open_version", "mark_cache", "claim_cache", "CACHE_MARKER"]

#: Written into a ``local=`` cache folder of a remote dataset: what says it is a cache (and of
#: what), so ``sparkbridge clean --cache`` deletes it and never a dataset.
CACHE_MARKER = ".sparkbridge-cache.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where a loader reads from: Mosaic's ``remote``/``local`` pair and the dataset's storage
    (None for a remote scheme sparkbridge cannot list: gs://, azure://, hf://, ...)."""

    remote: Optional[str]
    local: Optional[str]
    storage: Optional[Storage]

    @property
    def name(self) -> str:
        return self.remote or self.local or "?"


def resolve_source(remote_or_local: Union[str, os.PathLike], local: Optional[Union[str, os.PathLike]], *,
                   must_exist: bool = True) -> Source:
    src = os.fspath(remote_or_local)
    if not src:
        raise UsageError("remote_or_local must name a dataset folder or URL")
    if src.startswith("file://"):
        src = urlparse(src).path
    if "://" in src:
        if local is None:
            logger.info("no `local` cache folder given for %s; Mosaic picks one under the temp dir", src)
        storage = open_storage(src) if src.startswith("s3://") else None
        return Source(src, os.fspath(local) if local is not None else None, storage)
    if must_exist and not os.path.isdir(src):
        if os.path.isfile(src):
            raise DatasetNotFoundError(f"{src} is a file; pass the dataset's folder "
                                       f"({os.path.dirname(os.path.abspath(src))}), not one of its files")
        raise DatasetNotFoundError(f"dataset folder {src} does not exist")
    if local is None or os.path.abspath(os.fspath(local)) == os.path.abspath(src):
        return Source(None, src, open_storage(src))
    return Source(src, os.fspath(local), open_storage(src))


def mark_cache(folder: str, remote: str) -> None:
    """Record in ``folder`` that it caches ``remote`` (idempotent, best effort)."""
    path = os.path.join(folder, CACHE_MARKER)
    if os.path.exists(path):
        return
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"cache_of": remote}, f)
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not mark %s as a cache of %s: %s", folder, remote, exc)


def claim_cache(folder: str, remote: str, snapshot: Snapshot) -> int:
    """Make ``folder`` this dataset's cache before anything is read from it; returns how many
    cached files were removed.

    Why: the loader reads a decompressed copy in the cache before the dataset's own file, by
    shard name, and stock Mosaic datasets all name their shards ``shard.NNNNN.mds``. A folder
    left by another dataset (its marker names another remote), by a write this dataset replaced
    (a dataset without a log reuses its names: the marker holds another index hash), or by
    someone else (no marker: stock Mosaic, or an older sparkbridge) would be read as this
    dataset's: silently without hashes, as a corrupt shard with them. So the copies of every file
    this version names are removed and fetched again. A dataset with a log never reuses a file
    name, so its cache survives new versions. Under a lock, so the ranks of a node clean once."""
    identity = snapshot.identity
    os.makedirs(folder, exist_ok=True)
    # the marker itself is the lock (a file of its own would be one `sparkbridge clean` does not know)
    with open(os.path.join(folder, CACHE_MARKER), "a+", encoding="utf-8") as f, _locked(f):
        f.seek(0)
        try:
            marker = json.loads(f.read() or "null")
        except ValueError:
            marker = None
        if not isinstance(marker, dict):
            marker = None
        same = (marker is not None and marker.get("cache_of") == remote
                and (marker.get("identity") == identity or (not snapshot.legacy and bool(marker.get("identity")))))
        removed = 0
        if not same:
            from sparkbridge.format.index import shard_files
            from sparkbridge.format.paths import Confiner

            confiner = Confiner(folder)
            for i, entry in enumerate(snapshot.shards):
                for name in shard_files(entry):
                    try:
                        os.unlink(confiner.path(name, where=f"{folder}, shard {i}"))
                        removed += 1
                    except FileNotFoundError:
                        pass
            if removed:
                logger.warning("%s: the cache folder %s held %d file(s) named like this dataset's shards but left by "
                               "%s; removed them (they are fetched again)", remote, folder, removed,
                               f"{marker.get('cache_of')} ({marker.get('identity') or 'identity unknown'})"
                               if marker else "another reader (no sparkbridge marker)")
        if marker != {"cache_of": remote, "identity": identity}:
            f.seek(0)
            f.truncate()
            json.dump({"cache_of": remote, "identity": identity}, f)
            f.flush()
        return removed


@contextlib.contextmanager
def _locked(f: Any) -> Iterator[None]:
    """An exclusive lock on open file ``f`` between the processes of this host (none where fcntl
    is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process per cache folder is the rule there
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fresh_remote_index(source: Source, timeout: float) -> Snapshot:
    """A remote we cannot list: download its ``index.json`` now (never trust a cached copy)."""
    from sparkbridge.bridge.mosaic import download_file

    with tempfile.TemporaryDirectory(prefix="sparkbridge-index-") as tmp:
        path = os.path.join(tmp, "index.json")
        try:
            download_file(f"{source.remote.rstrip('/')}/index.json", path, timeout)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no dataset at {source.remote}: its index.json does not exist") from None
        with open(path, "rb") as f:
            raw = f.read()
    where = f"{source.remote}/index.json"
    try:
        obj = loads(raw)
    except ValueError as exc:
        raise ShardFormatError(f"{where} is not valid JSON ({exc})") from None
    return Snapshot(root=source.remote, version=-1, shards=check_index(obj, where=where),
                    legacy_sha256=hashlib.sha256(raw).hexdigest())


def open_version(source: Source, version: Optional[int], *, download_timeout: float = 60.0) -> Snapshot:
    """The snapshot this loader reads: ``version``, or the latest complete one (no write open) as
    decided by rank 0."""
    from sparkbridge.bridge.distributed import broadcast_from_rank0

    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise UsageError(f"version must be an int >= 0 (a log version), got {version!r}")
    if source.storage is None:
        if version is not None:
            raise VersionNotFoundError(f"{source.remote}: versions can be pinned on local and s3:// datasets only")
        return _fresh_remote_index(source, download_timeout)
    reader = LogReader(source.storage)
    seen: list[Snapshot] = []

    def latest() -> Optional[int]:
        snap = reader.refresh()
        if not snap.exists or snap.legacy:
            seen.append(snap)
            return None
        complete = reader.complete_version()
        if complete is None:
            raise DatasetNotFoundError(
                f"{source.name}: its first write ({', '.join(w.write_id for w in snap.open_writes)}) is still "
                "being committed a partition at a time; pass follow=True to stream it as it lands")
        return complete

    # the reader is this call's own and dropped on return: its state is handed over, not copied
    if version is None:
        version = broadcast_from_rank0(latest)
        if version is None and seen and seen[0].legacy:
            return seen[0]  # this rank just read index.json: read it once, not twice
    return reader.snapshot(version, take=True)
