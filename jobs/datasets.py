"""``sparkbridge inspect`` and ``sparkbridge validate``: look at an MDS dataset without Spark.

``inspect`` reads only ``index.json`` and ``manifest.json``. ``validate`` reads every byte: it
re-hashes each stored shard with every hash the index lists, decompresses it, checks the sample
count and offsets against the index and the manifest, and lists missing shards and orphaned files.
Both work on local folders and ``s3://`` roots, and on datasets written by stock ``MDSWriter``
(``index.json`` alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkbridge.errors import DatasetNotFoundError

__all__ = [
    "DatasetNotFoundError",
    "inspect_dataset",
    "validate_dataset",
    "ValidationReport",
    "add_inspect_arguments",
    "run_inspect",
    "add_validate_arguments",
    "run_validate",
]

log = logging.getLogger(__name__)




def _open(root: str):
    from sparkbridge.etl.layout import read_index
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    found = read_index(storage)
    if found is None:
        raise DatasetNotFoundError(f"no MDS dataset at {storage.root}: {storage.url('index.json')} does not exist")
    return storage, found[0], found[1]


def _stored(entry: dict[str, Any]) -> dict[str, Any]:
    """The file the index says is stored: the compressed one when there is one."""
    return entry.get("zip_data") or entry["raw_data"]


# --------------------------------------------------------------------------- inspect


def inspect_dataset(root: str) -> dict[str, Any]:
    """Facts about the dataset at ``root`` from its index and (when present) its manifest."""
    from sparkbridge.etl.layout import read_manifest

    storage, _, index = _open(root)
    manifest = read_manifest(storage)
    shards = index["shards"]
    first = shards[0] if shards else {}
    index_columns = dict(zip(first.get("column_names", []), first.get("column_encodings", [])))
    columns: list[dict[str, Any]] = []
    if manifest is not None:
        for spec in manifest.columns:
            columns.append({
                "name": spec.name,
                "logical": spec.logical,
                "mds": spec.encoding,
                "spark_type": spec.spark_type,
                "nullable": spec.nullable,
                "null_mask": spec.null_mask,
                "shape": spec.shape,
            })
        listed = {c["name"] for c in columns} | {c["null_mask"] for c in columns if c["null_mask"]}
        for name, enc in index_columns.items():  # anything the manifest does not describe
            if name not in listed:
                columns.append({"name": name, "logical": None, "mds": enc, "spark_type": None,
                                "nullable": None, "null_mask": None, "shape": None})
    else:
        columns = [{"name": n, "logical": None, "mds": e, "spark_type": None, "nullable": None,
                    "null_mask": None, "shape": None} for n, e in index_columns.items()]
    compressions = sorted({str(e.get("compression")) for e in shards})
    hashes = sorted({h for e in shards for h in e.get("hashes", [])})
    return {
        "root": storage.root,
        "rows": int(sum(e["samples"] for e in shards)),
        "shards": len(shards),
        "bytes": int(sum(_stored(e)["bytes"] for e in shards)),
        "raw_bytes": int(sum(e["raw_data"]["bytes"] for e in shards)),
        "compression": compressions[0] if len(compressions) == 1 else compressions,
        "hashes": hashes,
        "columns": columns,
        "manifest": manifest is not None,
        "nulls": manifest.nulls if manifest else None,
        "created_at": manifest.created_at if manifest else None,
        "manifest_rows": manifest.rows if manifest else None,
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _format_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"dataset      {info['root']}",
        f"rows         {info['rows']:,}",
        f"shards       {info['shards']}",
        f"bytes        {info['bytes']:,} stored ({_human(info['bytes'])}), {info['raw_bytes']:,} uncompressed",
        f"compression  {info['compression']}",
        f"hashes       {', '.join(info['hashes']) or '(none)'}",
        f"manifest     {'yes, created ' + str(info['created_at']) + ', nulls=' + str(info['nulls']) if info['manifest'] else 'no (stock MDS dataset: index.json only)'}",
        "",
    ]
    rows = [("column", "logical", "mds", "spark", "null mask")] + [
        (c["name"], c["logical"] or "-", c["mds"], c["spark_type"] or "-", c["null_mask"] or "-")
        for c in info["columns"]
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="OUT", help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_dataset(args.dataset)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sparkbridge inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else _format_inspect(info))
    return 0


# --------------------------------------------------------------------------- validate


@dataclass
class ValidationReport:
    """Everything ``validate`` found. ``ok`` is False when ``problems`` is not empty."""

    root: str
    rows: int = 0
    shards: int = 0
    bytes_checked: int = 0
    hashes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        head = (
            f"OK: {self.root}: {self.rows:,} rows in {self.shards} shards; {self.hashes_checked} hashes and "
            f"{_human(self.bytes_checked)} checked; no missing shards, no orphans"
            if self.ok
            else f"FAILED: {self.root}: {len(self.problems)} problem(s)"
        )
        lines = [head] + [f"  - {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_shard(storage: Any, i: int, entry: dict[str, Any], present: dict[str, int]) -> tuple[list[str], int, int]:
    """Problems of one shard, bytes read, hashes compared. Runs in a thread (I/O, zstd, xxhash)."""
    from sparkbridge.format.mds import ShardFormatError, sample_offsets
    from sparkbridge.format.codecs import decompress, hash_bytes

    problems: list[str] = []
    stored = _stored(entry)
    name = stored["basename"]
    where = f"shard {i} ({name})"
    if name not in present:
        return [f"{where}: missing (listed in index.json, not found under the root)"], 0, 0
    if present[name] != stored["bytes"]:
        problems.append(f"{where}: {present[name]} bytes, index says {stored['bytes']}")
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        return [f"{where}: missing (removed while validating)"], 0, 0
    n_hashes = 0
    for algo, expected in (stored.get("hashes") or {}).items():
        n_hashes += 1
        actual = hash_bytes(algo, data)
        if actual != expected:
            problems.append(f"{where}: {algo} hash is {actual}, index says {expected} (corrupt)")
    raw = data
    if entry.get("zip_data"):
        try:
            raw = decompress(entry.get("compression"), data)
        except Exception as exc:  # any codec error means the stored bytes are damaged
            return problems + [f"{where}: cannot decompress with {entry.get('compression')}: {exc}"], len(data), n_hashes
        raw_info = entry["raw_data"]
        if len(raw) != raw_info["bytes"]:
            problems.append(f"{where}: decompresses to {len(raw)} bytes, index says {raw_info['bytes']}")
        for algo, expected in (raw_info.get("hashes") or {}).items():
            n_hashes += 1
            if hash_bytes(algo, raw) != expected:
                problems.append(f"{where}: decompressed {algo} hash differs from the index")
    try:
        offsets = sample_offsets(raw, name=where)
        samples = len(offsets) - 1
        if samples != entry["samples"]:
            problems.append(f"{where}: holds {samples} samples, index says {entry['samples']}")
    except ShardFormatError as exc:
        problems.append(str(exc))
    # A reader's unpacked copy beside a compressed shard is used instead of it: check it too.
    cache = entry["raw_data"]["basename"] if entry.get("zip_data") else None
    if cache and cache in present:
        if present[cache] != entry["raw_data"]["bytes"]:
            problems.append(f"{where}: unpacked cache {cache} has {present[cache]} bytes, index says "
                            f"{entry['raw_data']['bytes']} (delete it; readers would use it)")
        elif cache != name:
            cached = storage.read_bytes(cache)
            if cached != raw:
                problems.append(f"{where}: unpacked cache {cache} differs from the shard (delete it; readers would use it)")
    return problems, len(data), n_hashes


def _check_shard_safely(storage: Any, i: int, entry: dict[str, Any],
                        present: dict[str, int]) -> tuple[list[str], int, int]:
    """``_check_shard``, with anything unexpected (a file removed mid-run, an unknown hash name in
    the index) recorded as a problem line: validate reports, it never crashes on a bad dataset."""
    try:
        return _check_shard(storage, i, entry, present)
    except Exception as exc:
        stored = (entry.get("zip_data") or entry.get("raw_data")) if isinstance(entry, dict) else None
        name = stored.get("basename", "?") if isinstance(stored, dict) else "?"
        return [f"shard {i} ({name}): could not be checked: {type(exc).__name__}: {exc}"], 0, 0


def validate_dataset(root: str, *, workers: int = 4, progress: bool = True) -> ValidationReport:
    """Check every shard, the counts and the files under ``root``; never raises for a bad dataset."""
    from sparkbridge.etl.layout import find_orphans, read_manifest
    from sparkbridge.format.manifest import ManifestError

    try:
        storage, index_bytes, index = _open(root)
    except (FileNotFoundError, ValueError) as exc:
        return ValidationReport(root=root, problems=[str(exc)])
    report = ValidationReport(root=storage.root)
    shards = index["shards"]
    report.shards = len(shards)
    report.rows = int(sum(e["samples"] for e in shards))

    try:
        manifest = read_manifest(storage)
    except ManifestError as exc:
        manifest = None
        report.problems.append(str(exc))
    if manifest is not None:
        if manifest.rows != report.rows:
            report.problems.append(f"manifest.json says {manifest.rows} rows, index.json lists {report.rows}")
        if manifest.shards != report.shards:
            report.problems.append(f"manifest.json says {manifest.shards} shards, index.json lists {report.shards}")
        actual_sha = hashlib.sha256(index_bytes).hexdigest()
        if manifest.index_sha256 != actual_sha:
            report.problems.append("manifest.json was written for a different index.json (index_sha256 differs)")
        names = set(shards[0]["column_names"]) if shards else set()
        for spec in manifest.columns:
            for col in [spec.name] + ([spec.null_mask] if spec.null_mask else []):
                if shards and col not in names:
                    report.problems.append(f"manifest column {col!r} is not in the shards' columns {sorted(names)}")
    elif not report.problems:
        report.notes.append("no manifest.json (stock MDS dataset): rows checked against index.json only")

    seen: dict[str, int] = {}
    for i, entry in enumerate(shards):
        name = _stored(entry)["basename"]
        if name in seen:
            report.problems.append(f"shard {i} ({name}) is listed twice in index.json (also shard {seen[name]}): rows would be read twice")
        seen.setdefault(name, i)
        if not (_stored(entry).get("hashes")):
            report.notes.append(f"shard {i} ({name}): index lists no hash; checked size and sample count only")

    listing = storage.list_files("")
    present = dict(listing)
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_check_shard_safely, storage, i, e, present) for i, e in enumerate(shards)]
        bar = tqdm(total=len(futures), desc="validate", unit="shard", disable=not progress or None, file=sys.stderr)
        for fut in futures:
            problems, n_bytes, n_hashes = fut.result()
            report.problems.extend(problems)
            report.bytes_checked += n_bytes
            report.hashes_checked += n_hashes
            bar.update(1)
        bar.close()

    report.orphans = find_orphans(storage, listing=listing)
    for rel in report.orphans:
        report.problems.append(f"orphan: {storage.url(rel)} (written by sparkbridge, referenced by no version or running job)")
    if len(report.notes) > 20:
        report.notes = report.notes[:20] + [f"... and {len(report.notes) - 20} more notes"]
    return report


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="OUT", help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--workers", type=int, default=4, help="shards checked at once (default 4)")


def run_validate(args: argparse.Namespace) -> int:
    report = validate_dataset(args.dataset, workers=args.workers, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else report.format())
    return 0 if report.ok else 1
