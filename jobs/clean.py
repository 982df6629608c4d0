"""``sparkbridge clean``: remove what crashed or finished runs leave on a training machine.

* Mosaic shared memory (``/dev/shm/NNNNNN_*``): only segments this user owns that **no live
  process maps** and that have not changed for a minute
  (:func:`sparkbridge.bridge.distributed.stale_shared_memory`), so a job running or starting next
  to this command is never touched -- unlike Mosaic's own ``clean_stale_shared_memory``.
* Local shard caches (``--cache DIR``, the ``local=`` folders of remote datasets): a folder
  ``StreamingLoader`` marked as a cache (``.sparkbridge-cache.json``) holding nothing but shard
  files and download temporaries, or a stock Mosaic cache: only files that the cache's
  ``index.json`` lists plus ``index.json``/``manifest.json`` themselves. A folder that does not look like a cache is
  refused, naming the file that says so: no ``index.json``, a file the index does not list, a
  dataset log (``_log/``) or a shard kept only compressed (a loader's cache holds the decompressed
  copy; a dataset written by ``write_mds`` holds the compressed one). A local *uncompressed*
  dataset looks exactly like a cache: ``--dry-run`` lists what would go.
* ``--vacuum DATASET``: old versions of a dataset past their retention (the dataset log's vacuum).

``--dry-run`` says what would be deleted and deletes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sparkbridge.errors import SparkbridgeError, UsageError

import re

__all__ = ["add_clean_arguments", "run_clean", "CacheContents", "scan_cache", "NotACacheError"]

log = logging.getLogger(__name__)

_INDEX = "index.json"
_EXTRA = {"index.json", "manifest.json"}  # what a loader's cache holds besides shards
_TEMP_SUFFIXES = (".tmp",)  # Mosaic downloads to <name>.tmp and renames
_MARKER = ".sparkbridge-cache.json"  # bridge.source.CACHE_MARKER (no torch import for a name)
_SHARD_FILE = re.compile(r"^shard\.\d+\.mds(\.(zstd|gz|bz2|br|snappy))?(\.tmp|\.\d+\.(tmp|part))?$")


class NotACacheError(SparkbridgeError, ValueError):
    """``--cache`` names a folder that does not look like a shard cache; nothing was deleted."""


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", action="append", default=[], metavar="DIR",
                        help="delete this local shard cache (a loader's local= folder, or a folder of them); "
                             "repeatable")
    parser.add_argument("--no-shm", action="store_true", help="leave Mosaic's shared memory alone")
    parser.add_argument("--vacuum", metavar="DATASET", default=None,
                        help="delete files of dataset versions older than the retention (local folder or s3://)")
    parser.add_argument("--retention-hours", type=float, default=None,
                        help="with --vacuum: keep versions younger than this (default: the dataset's own retention)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    parser.add_argument("--json", action="store_true", help="print what was (or would be) deleted as JSON")


# --------------------------------------------------------------------------- caches


@dataclass
class CacheContents:
    """What deleting one cache removes."""

    root: str
    files: list[str] = field(default_factory=list)  # relative paths
    bytes: int = 0
    datasets: list[str] = field(default_factory=list)  # folders holding an index.json (relative)


def _index_files(index_path: Path) -> set[str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotACacheError(f"{index_path} is not a Mosaic index.json ({type(exc).__name__}: {exc}); "
                             "refusing to delete its folder") from None
    names = set()
    for entry in shards:
        for key in ("raw_data", "zip_data"):
            part = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(part, dict) and isinstance(part.get("basename"), str):
                names.add(os.path.normpath(part["basename"]))
    return names


def scan_cache(path: os.PathLike | str, *, option: str = "--cache") -> CacheContents:
    """Check that ``path`` is a shard cache (or a folder of caches) and list what deleting it removes.

    Raises NotACacheError (naming the file that gives it away) otherwise.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotACacheError(f"{option} {path}: no such folder")
    if root.resolve() in (Path("/").resolve(), Path.home().resolve()):
        raise NotACacheError(f"{option} {path}: refusing to delete / or the home folder")
    def is_cache(p: Path) -> bool:
        return (p / _INDEX).is_file() or (p / _MARKER).is_file()

    caches = [root] if is_cache(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_cache(p))
    if not caches:
        raise NotACacheError(f"{option} {path}: refusing to delete a folder that is not a shard cache "
                             "(no cache marker or index.json in it or in its subfolders)")
    out = CacheContents(root=str(root), datasets=[str(c.relative_to(root)) for c in caches])
    for cache in caches:
        if (cache / _MARKER).is_file():
            _scan_marked(cache, root, option, path, out)
            continue
        listed = _index_files(cache / _INDEX)
        if (cache / "_log").exists():
            raise NotACacheError(f"{option} {path}: {cache / '_log'} is a dataset log: {cache} is a dataset, not a "
                                 "cache; refusing to delete it")
        zip_names = {n for n in listed if n.endswith((".zstd", ".gz", ".bz2", ".br", ".snappy"))}
        for folder, dirs, files in os.walk(cache):
            for name in files:
                full = Path(folder) / name
                rel = os.path.normpath(str(full.relative_to(cache)))
                base = rel[: -len(".tmp")] if rel.endswith(_TEMP_SUFFIXES) else rel
                if rel not in _EXTRA and base not in listed:
                    raise NotACacheError(f"{option} {path}: {full} is not a file of the shard cache {cache} "
                                         "(its index.json does not list it); refusing to delete anything")
                if rel in zip_names:
                    raw = rel[: rel.rfind(".")]
                    if not (cache / raw).exists():
                        raise NotACacheError(f"{option} {path}: {full} is stored only compressed, as in a dataset "
                                             f"(a loader's cache keeps the decompressed {raw}): {cache} looks like a "
                                             "dataset, not a cache; refusing to delete it")
                out.files.append(str(full.relative_to(root)))
                out.bytes += full.stat().st_size
    return out


def _scan_marked(cache: Path, root: Path, option: str, path: Any, out: CacheContents) -> None:
    """A cache a loader marked: the marker and shard files (and their temporaries) only."""
    if (cache / "_log").exists():
        raise NotACacheError(f"{option} {path}: {cache / '_log'} is a dataset log: {cache} is a dataset, not a "
                             "cache; refusing to delete it")
    for folder, _dirs, files in os.walk(cache):
        for name in files:
            full = Path(folder) / name
            if not (name == _MARKER or _SHARD_FILE.match(name)):
                raise NotACacheError(f"{option} {path}: {full} is not a file of the shard cache {cache} (not a "
                                     "shard or its download temporary); refusing to delete anything")
            out.files.append(str(full.relative_to(root)))
            out.bytes += full.stat().st_size


def _delete_cache(contents: CacheContents) -> None:
    root = Path(contents.root)
    for rel in contents.files:
        try:
            (root / rel).unlink()
        except FileNotFoundError:
            pass
    # Folders left empty by the files above (the cache's own tree), deepest first.
    for folder, _dirs, _files in os.walk(root, topdown=False):
        if not os.listdir(folder):
            os.rmdir(folder)


# --------------------------------------------------------------------------- vacuum


def _vacuum(dataset: str, *, retention_hours: Optional[float], dry_run: bool) -> Any:
    """The dataset log's vacuum (see :mod:`sparkbridge.log.vacuum`): the plan it carried out, or
    with ``dry_run`` the one it would."""
    from sparkbridge.log.vacuum import DEFAULT_RETENTION_SECONDS, vacuum

    retention = DEFAULT_RETENTION_SECONDS if retention_hours is None else retention_hours * 3600.0
    return vacuum(dataset, retention_seconds=retention, dry_run=dry_run)


# --------------------------------------------------------------------------- the command


def run_clean(args: argparse.Namespace) -> int:
    if args.retention_hours is not None and args.retention_hours < 0:
        raise UsageError(f"--retention-hours must be >= 0, got {args.retention_hours}")
    if args.retention_hours is not None and not args.vacuum:
        raise UsageError("--retention-hours goes with --vacuum DATASET")
    caches = [scan_cache(c) for c in args.cache]  # every check before the first deletion
    report: dict[str, Any] = {"dry_run": bool(args.dry_run), "shared_memory": [], "caches": [], "vacuum": None}
    verb = "would delete" if args.dry_run else "deleted"
    lines = []
    if not args.no_shm:
        from sparkbridge.bridge.distributed import clean_stale_shared_memory, stale_shared_memory

        stale = stale_shared_memory()
        report["shared_memory"] = stale
        if stale and not args.dry_run:
            removed = clean_stale_shared_memory()  # looks again: a segment may have been mapped since
            report["shared_memory_removed"] = removed
        lines.append(f"shared memory: {verb} {len(stale)} stale Mosaic segment(s)"
                     + (f" ({', '.join(stale[:6])}{', ...' if len(stale) > 6 else ''})" if stale else ""))
    for contents in caches:
        report["caches"].append({"root": contents.root, "files": contents.files, "bytes": contents.bytes})
        if not args.dry_run:
            _delete_cache(contents)
        lines.append(f"cache {contents.root}: {verb} {len(contents.files)} file(s), {contents.bytes / 1e6:,.1f} MB "
                     f"({len(contents.datasets)} dataset cache(s))")
        if args.dry_run:
            lines += [f"  {rel}" for rel in contents.files[:20]]
            if len(contents.files) > 20:
                lines.append(f"  ... and {len(contents.files) - 20} more")
    if args.vacuum:
        result = _vacuum(args.vacuum, retention_hours=args.retention_hours, dry_run=args.dry_run)
        report["vacuum"] = {"delete": result.delete, "fence": result.fence, "retained_from": result.retained_from,
                            "version": result.version, "deleted": result.deleted}
        lines.append(f"vacuum {result.summary().replace('file(s) to delete', f'file(s) {verb}', 1)}")
    print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else "\n".join(lines))
    return 0
