"""Paths read from ``index.json`` or ``_log/`` entries are untrusted: confine them to the root.

Why: a shard basename is joined to the dataset root (to read it) and to the local cache (to
download it). A basename such as ``../outside/shard.mds``, ``/etc/passwd``, ``C:\\x`` or one that
resolves through a symlink out of the root would make a reader read, or a download write, outside
both. Every basename goes through :func:`check_relpath` when an index or log entry is parsed, and
every local path through :func:`confined_path` when it is built.
"""

from __future__ import annotations

import os
import re

from sparkbridge.errors import UnsafePathError

__all__ = ["check_relpath", "confined_path"]

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_LEN = 1024


def check_relpath(name: object, *, where: str) -> str:
    """``name`` if it is a safe relative path (``/``-separated, no ``..``, ``.``, empty parts,
    backslashes, drive letters, NUL or control characters), else :class:`UnsafePathError` naming
    ``where`` (e.g. ``"_log/00000000000000000003.json, shard 7"``)."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: a shard path must be a non-empty string, got {name!r}")
    if len(name) > _MAX_LEN:
        raise UnsafePathError(f"{where}: shard path of {len(name)} characters is too long")
    if name.startswith("/") or _DRIVE.match(name) or "\\" in name:
        raise UnsafePathError(f"{where}: shard path {name!r} is absolute; paths must be relative to the dataset root")
    if any(ord(ch) < 32 for ch in name):
        raise UnsafePathError(f"{where}: shard path {name!r} contains control characters")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(
                f"{where}: shard path {name!r} has a {part or 'empty'!r} component; paths must stay "
                "inside the dataset root"
            )
    return name


def confined_path(root: str, rel: str, *, where: str) -> str:
    """``root/rel`` after :func:`check_relpath`, refused when it resolves (symlinks included)
    outside ``root``. ``root`` need not exist yet (a cache folder being created)."""
    check_relpath(rel, where=where)
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, *rel.split("/")))
    if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"{where}: shard path {rel!r} resolves to {path}, outside {base}")
    return path
