"""The cache folder for a local dataset's spilled shards, when the caller gave no ``local=``.

A local compressed dataset is read in place: shards are decompressed in memory. When a pass's
working set does not fit ``decoded_cache_bytes`` (or DataLoader workers would each hold a copy),
shards are instead decompressed once into a cache folder and memory-mapped from there; Mosaic
then treats the dataset root as the remote and that folder as its cache (shard states shared by
workers, ``cache_limit`` eviction). Nothing is ever written into the dataset root.

The folder is ``$SPARKBRIDGE_CACHE_DIR`` (default: ``<tempdir>/sparkbridge-<uid>``, made private:
every user can write the temp dir, so a default root that is a symlink, someone else's, or
writable by others is refused rather than written into or read from) /
``<host>-<pid>-<n>-<hash of the root>``, one per loaded dataset (Mosaic refuses two live datasets
sharing a cache folder), chosen by rank 0 under torchrun so that every rank on a node agrees. It
is removed by ``StreamingLoader.close()``; folders left by processes of this host that no longer
run are removed when the next one is made.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import socket
import stat
import tempfile
from typing import Optional

from sparkbridge.errors import UnsafePathError

__all__ = ["spill_root", "private_spill_root", "new_spill_folder", "remove_spill_folder", "remove_stale_spill_folders"]

logger = logging.getLogger(__name__)

_counter = itertools.count()


def spill_root() -> str:
    base = os.environ.get("SPARKBRIDGE_CACHE_DIR")
    if base:
        return base
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"sparkbridge-{uid}")


def private_spill_root() -> str:
    """:func:`spill_root`, made if missing; the default one (in the shared temp dir) checked to
    be this user's own: a real folder (not a symlink), owned by this user, writable by no one
    else. Why: its name is predictable, so another user could plant it, and then shards we
    decompress there, or theirs we would read back as ours. ``$SPARKBRIDGE_CACHE_DIR`` is the
    caller's own choice and is only made."""
    root = spill_root()
    if os.environ.get("SPARKBRIDGE_CACHE_DIR") or not hasattr(os, "getuid"):
        os.makedirs(root, exist_ok=True)
        return root
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder (a symlink or a file)"
    elif st.st_uid != os.getuid():
        problem = f"belongs to user id {st.st_uid}, not to this user ({os.getuid()})"
    elif stat.S_IMODE(st.st_mode) & 0o022:
        problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise UnsafePathError(
            f"the spill folder root {root} {problem}: someone else may have planted it, so shards are not "
            "decompressed into it; remove it, or set SPARKBRIDGE_CACHE_DIR to a folder of your own (or pass local=)")
    return root


def _host() -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())[:40] or "host"


def new_spill_folder(dataset_root: str) -> str:
    """A fresh folder name (not created yet) for this process's reading of ``dataset_root``."""
    digest = hashlib.sha256(os.path.abspath(dataset_root).encode()).hexdigest()[:10]
    return os.path.join(private_spill_root(), f"{_host()}-{os.getpid()}-{next(_counter)}-{digest}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_spill_folders(root: Optional[str] = None) -> int:
    """Remove folders of this host whose process is gone. Returns how many were removed."""
    try:
        root = root or private_spill_root()  # never clean in a root someone else planted
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    host, removed = _host(), 0
    for name in names:
        parts = name.rsplit("-", 3)
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and not _alive(int(parts[1])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d spill folder(s) left in %s by processes that no longer run", removed, root)
    return removed


def remove_spill_folder(path: str) -> None:
    """Remove a folder made by :func:`new_spill_folder` (only below :func:`spill_root`)."""
    root = os.path.realpath(spill_root())
    real = os.path.realpath(path)
    if os.path.dirname(real) == root:
        shutil.rmtree(real, ignore_errors=True)
