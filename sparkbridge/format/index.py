"""Entries of an MDS ``index.json`` (version 2): checked before anything trusts them.

An index entry describes one shard: its column layout, its sample count, and the files that hold
it (``raw_data``, and ``zip_data`` when compressed) with sizes and hashes. Entries come from files
a reader did not write — a dataset root, an object store, a cache — so every field a reader will
use is checked here once: types, counts, the layout, and that every file name stays inside the
dataset root (:mod:`sparkbridge.format.paths`). Errors name the entry and the bad value.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

from sparkbridge.errors import ShardFormatError
from sparkbridge.format.mds import ShardLayout
from sparkbridge.format.paths import check_relpath, is_plain

__all__ = ["INDEX_VERSION", "MAX_SHARD_BYTES", "min_raw_bytes", "check_index_entry", "check_index_entries",
           "check_index", "stored_name", "shard_files", "index_bytes", "index_sha256"]

INDEX_VERSION = 2
_MAX_SAMPLES = 1 << 32
#: An MDS shard addresses its samples with uint32 offsets: no raw (or compressed) file is larger.
MAX_SHARD_BYTES = 1 << 32


def _check_file(info: Any, *, where: str, key: str) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise ShardFormatError(f"{where}: {key} must be an object, got {type(info).__name__}")
    name = info.get("basename")
    if not is_plain(name):  # (the error context is formatted only for a name that may fail)
        check_relpath(name, where=f"{where}, {key}")
    size = info.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ShardFormatError(f"{where}: {key}.bytes must be an int >= 0, got {size!r}")
    if size > MAX_SHARD_BYTES:
        raise ShardFormatError(f"{where}: {key}.bytes={size} is more than 4 GiB, which no MDS shard can be "
                               "(its sample offsets are uint32): the index is corrupt or hostile")
    hashes = info.get("hashes") or {}
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise ShardFormatError(f"{where}: {key}.hashes must map hash names to hex strings, got {hashes!r}")
    return info


def _check_columns(entry: dict[str, Any], *, where: str, layouts: Optional[dict]) -> None:
    """Names and encodings are strings and the columns make a valid layout. ``layouts``: the
    column lists of this index already found valid, by value; an entry whose columns equal them
    is not checked again (an index's shards mostly share one layout, and checking each took ~40%
    of opening 10,000 shards) and is given those lists instead of its own, which are equal: 30,000
    fewer lists for the collector to walk at 10,000 shards. A key matches only equal JSON values
    (sizes by repr: 4, 4.0 and True differ)."""
    try:
        key: Any = (tuple(entry["column_names"]), tuple(entry["column_encodings"]), repr(entry["column_sizes"]))
        known = layouts.get(key) if layouts is not None else None
    except TypeError:  # an unhashable name or encoding: refused just below
        key, known = None, None
    if known is not None:
        entry["column_names"], entry["column_encodings"], entry["column_sizes"] = known[:3]
        return
    if not all(isinstance(n, str) for n in entry["column_names"] + entry["column_encodings"]):
        raise ShardFormatError(f"{where}: column names and encodings must be strings")
    try:
        ShardLayout.from_index_entry(entry)
    except ShardFormatError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None
    if layouts is not None and key is not None:
        layouts[key] = (entry["column_names"], entry["column_encodings"], entry["column_sizes"],
                        _min_row_bytes(entry))


def check_index_entry(entry: Any, *, where: str, layouts: Optional[dict] = None) -> dict[str, Any]:
    """``entry`` if it is a well-formed, safe MDS index entry; else ShardFormatError (or
    UnsafePathError for a file name leaving the root) naming ``where``. ``layouts``: a dict shared
    by the entries of one index, which then share their column lists (see :func:`_check_columns`:
    entries are read, never changed in place, by every reader of an index)."""
    if not isinstance(entry, dict):
        raise ShardFormatError(f"{where}: a shard entry must be an object, got {type(entry).__name__}")
    if entry.get("format", "mds") != "mds":
        raise ShardFormatError(f"{where}: shard format {entry.get('format')!r} is not supported (only 'mds')")
    samples = entry.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 0 <= samples < _MAX_SAMPLES:
        raise ShardFormatError(f"{where}: samples must be an int in [0, 2^32), got {samples!r}")
    for key in ("column_names", "column_encodings", "column_sizes"):
        if not isinstance(entry.get(key), list):
            raise ShardFormatError(f"{where}: {key} must be a list, got {entry.get(key)!r}")
    _check_columns(entry, where=where, layouts=layouts)
    _check_file(entry.get("raw_data"), where=where, key="raw_data")
    least = min_raw_bytes(entry)
    if least > entry["raw_data"]["bytes"]:
        raise ShardFormatError(
            f"{where} ({entry['raw_data']['basename']}): samples={samples} cannot fit raw_data.bytes="
            f"{entry['raw_data']['bytes']} (a header of {4 * (samples + 2)} bytes and at least "
            f"{_min_row_bytes(entry)} bytes a sample need {least}): the index is corrupt or hostile")
    if entry.get("zip_data") is not None:
        _check_file(entry["zip_data"], where=where, key="zip_data")
        if not entry.get("compression"):
            raise ShardFormatError(f"{where}: zip_data is set but compression is not")
    return entry


def _min_row_bytes(entry: dict[str, Any]) -> int:
    """The fewest bytes one sample of this layout takes: every fixed-width column, plus a 4-byte
    size for each variable-width one."""
    return sum(4 if size is None else size for size in entry["column_sizes"])


def min_raw_bytes(entry: dict[str, Any]) -> int:
    """The smallest raw shard that can hold ``entry["samples"]`` samples: the sample count, the
    ``samples + 1`` offsets, then the samples. Why: Mosaic materializes every sample id of an
    epoch from the index's counts, so a count must be checked against a size before any order."""
    samples = entry["samples"]
    return 4 * (samples + 2) + samples * _min_row_bytes(entry)


def _plain_file(info: Any) -> bool:
    """Whether :func:`_check_file` accepts ``info``, decided for the common case only (exact
    types, a plain name): False sends it to the full check, which names what is wrong."""
    if type(info) is not dict:
        return False
    name, size = info.get("basename"), info.get("bytes")
    if type(size) is not int or not 0 <= size <= MAX_SHARD_BYTES or not is_plain(name):
        return False
    hashes = info.get("hashes")
    if hashes:
        if type(hashes) is not dict:
            return False
        for k, v in hashes.items():
            if type(k) is not str or type(v) is not str:
                return False
    return True


def _plain_entry(entry: Any, layouts: dict) -> bool:
    """Whether :func:`check_index_entry` accepts ``entry``, decided without formatting an error
    context, for entries of a layout ``layouts`` already holds (checked in full once), exact JSON
    types and plain names; it then shares that layout's lists as the full check does. False
    (anything unusual) sends the entry to the full check. Why: an entry or checkpoint of 100,000
    shards spent ~0.6 s in the full check (bench/metadata.py)."""
    if type(entry) is not dict or entry.get("format", "mds") != "mds":
        return False
    samples = entry.get("samples")
    names, encodings, sizes = entry.get("column_names"), entry.get("column_encodings"), entry.get("column_sizes")
    if type(samples) is not int or not 0 <= samples < _MAX_SAMPLES or type(names) is not list \
            or type(encodings) is not list or type(sizes) is not list:
        return False
    try:
        known = layouts.get((tuple(names), tuple(encodings), repr(sizes)))
    except TypeError:  # an unhashable name or encoding
        return False
    if known is None:
        return False
    raw = entry.get("raw_data")
    if not _plain_file(raw) or 4 * (samples + 2) + samples * known[3] > raw["bytes"]:
        return False
    zipped = entry.get("zip_data")
    if zipped is not None and (not _plain_file(zipped) or not entry.get("compression")):
        return False
    entry["column_names"], entry["column_encodings"], entry["column_sizes"] = known[:3]
    return True


def check_index_entries(entries: Sequence[Any], *, where: str, label: str = "shard",
                        layouts: Optional[dict] = None) -> list[dict[str, Any]]:
    """Every entry checked as :func:`check_index_entry` checks it (errors name ``where, label i``),
    sharing one ``layouts``; the common entries take a fast path that accepts nothing the full
    check refuses."""
    layouts = {} if layouts is None else layouts
    out = []
    for i, e in enumerate(entries):
        if not _plain_entry(e, layouts):
            check_index_entry(e, where=f"{where}, {label} {i}", layouts=layouts)
        out.append(e)
    return out


def check_index(obj: Any, *, where: str) -> list[dict[str, Any]]:
    """The shard entries of a parsed ``index.json``, every one checked."""
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise ShardFormatError(f"{where}: not an MDS index (no 'shards' list)")
    if obj.get("version") != INDEX_VERSION:
        raise ShardFormatError(f"{where}: index version {obj.get('version')!r} is not supported (expected 2)")
    return check_index_entries(obj["shards"], where=where)


def stored_name(entry: dict[str, Any]) -> str:
    """The file that holds the shard in the dataset: the compressed one when there is one."""
    return (entry.get("zip_data") or entry["raw_data"])["basename"]


def shard_files(entry: dict[str, Any]) -> list[str]:
    """Every file an entry stands for: the stored file and the raw shard a reader may unpack."""
    out = []
    for key in ("zip_data", "raw_data"):
        info = entry.get(key)
        if info and info.get("basename"):
            out.append(info["basename"])
    return out


def index_bytes(shards: list[dict[str, Any]]) -> bytes:
    """The canonical ``index.json`` for these entries (what sparkbridge writes and hashes)."""
    return json.dumps({"shards": shards, "version": INDEX_VERSION}, sort_keys=True).encode("utf-8")


def index_sha256(shards: list[dict[str, Any]], raw: Optional[bytes] = None) -> str:
    return hashlib.sha256(raw if raw is not None else index_bytes(shards)).hexdigest()
