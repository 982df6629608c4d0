"""``sparkbridge inspect``, ``validate`` and ``vacuum``: look after an MDS dataset without Spark.

``inspect`` reads the dataset log (or, for a dataset without one, ``index.json``) and shows the
latest version, or ``--version N``. ``validate`` reads every byte of the latest version: it
re-hashes each stored shard with every hash listed, decompresses it, checks the sample count and
offsets, checks every log entry and that ``index.json``/``manifest.json`` match the latest
version, and lists missing shards and orphaned files. ``vacuum`` deletes what no retained version
references (``--dry-run`` lists it, with the reason). All work on local folders and ``s3://``
roots, and on datasets written by stock ``MDSWriter`` (``index.json`` alone).
"""

from __future__ import annotations

import argparse
import os
import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

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
    "add_vacuum_arguments",
    "run_vacuum",
]

log = logging.getLogger(__name__)




def _open(root: str, version=None):
    """(storage, reader, snapshot) of ``root``; DatasetNotFoundError when nothing is committed."""
    from sparkbridge.log.snapshot import LogReader
    from sparkbridge.storage import open_storage

    storage = open_storage(root)
    reader = LogReader(storage)
    return storage, reader, reader.snapshot(version)


def _stored(entry: dict[str, Any]) -> dict[str, Any]:
    """The file the index says is stored: the compressed one when there is one."""
    return entry.get("zip_data") or entry["raw_data"]


# --------------------------------------------------------------------------- inspect


def inspect_dataset(root: str, *, version=None) -> dict[str, Any]:
    """Facts about the dataset at ``root`` (latest version, or ``version``) from its log."""
    storage, _, snap = _open(root, version)
    manifest = snap.manifest()
    shards = snap.shards
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
        "version": snap.version if not snap.legacy else None,
        "log": not snap.legacy,
        "open_writes": [w.write_id for w in snap.open_writes],
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
        f"version      {info['version'] if info['log'] else '(no dataset log: index.json only)'}"
        + (f", writes still open: {', '.join(info['open_writes'])}" if info["open_writes"] else ""),
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
    parser.add_argument("--version", type=int, default=None, help="show this version (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_dataset(args.dataset, version=args.version)  # errors: one line from cli.run_command
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
    version: Optional[int] = None
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
            f"OK: {self.root}{'' if self.version is None else f' (version {self.version})'}: {self.rows:,} rows in "
            f"{self.shards} shards; {self.hashes_checked} hashes and "
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


def validate_dataset(root: str, *, workers: int = 4, progress: bool = True,
                     retention_seconds: Optional[float] = None) -> ValidationReport:
    """Check every shard of the latest version, the log, the derived files and every file under
    ``root``; never raises for a bad dataset (problems are listed in the report)."""
    from sparkbridge.errors import SparkbridgeError
    from sparkbridge.format.index import index_sha256
    from sparkbridge.format.manifest import Manifest, ManifestError
    from sparkbridge.log.vacuum import DEFAULT_RETENTION_SECONDS, plan_vacuum

    try:
        storage, reader, snap = _open(root)
    except (FileNotFoundError, ValueError, SparkbridgeError) as exc:
        return ValidationReport(root=root, problems=[str(exc)])
    report = ValidationReport(root=storage.root)
    shards = snap.shards
    report.shards = len(shards)
    report.rows = snap.rows
    report.version = None if snap.legacy else snap.version

    def read(name: str) -> Optional[bytes]:
        try:
            return storage.read_bytes(name)
        except FileNotFoundError:
            return None

    index_raw, manifest_raw = read("index.json"), read("manifest.json")
    manifest = None
    if manifest_raw is not None:
        try:
            manifest = Manifest.from_json(manifest_raw.decode("utf-8", "replace"), source=storage.url("manifest.json"))
        except ManifestError as exc:
            report.problems.append(str(exc))
    if not snap.legacy:
        fix = f"`sparkbridge vacuum {storage.root}` rewrites it"
        complete = reader.complete_version()
        derived = reader.snapshot(complete) if complete is not None else None
        if derived is None:
            report.notes.append("the first write is still open: index.json appears when it completes")
        elif index_raw is None:
            report.problems.append(f"index.json is missing, so stock Mosaic readers cannot open the dataset ({fix})")
        elif hashlib.sha256(index_raw).hexdigest() != index_sha256(derived.shards):
            report.problems.append(f"index.json does not describe the latest complete version {complete}: stock "
                                   f"Mosaic readers see another version ({fix})")
        if derived is not None and manifest is not None and manifest.extra.get("log_version") != complete:
            report.problems.append(f"manifest.json describes version {manifest.extra.get('log_version')}, the latest "
                                   f"complete version is {complete} ({fix})")
        for v in range(snap.version + 1):  # every entry parses and is safe (not only since a checkpoint)
            try:
                reader.read_entry(v, cache=False)
            except SparkbridgeError as exc:
                report.problems.append(str(exc))
        versions = reader.checkpoint_versions()
        for v in versions:  # a damaged one is skipped by readers: say so here
            try:
                # the newest in full (every reader loads it); older ones by their checksum
                reader.verify_checkpoint(v, full=v == versions[-1])
            except FileNotFoundError:
                pass
            except SparkbridgeError as exc:
                report.problems.append(f"{exc} (readers skip it and replay the log; delete the file)")
        for w in snap.open_writes:
            report.notes.append(f"write {w.write_id} ({w.mode}, commit per partition) is open: "
                                f"{len(w.partitions)} partition(s), {w.rows:,} rows committed so far")
    if manifest is not None and (snap.legacy or manifest.extra.get("log_version") == snap.version):
        if manifest.rows != report.rows:
            report.problems.append(f"manifest.json says {manifest.rows} rows, index.json lists {report.rows}")
        if manifest.shards != report.shards:
            report.problems.append(f"manifest.json says {manifest.shards} shards, index.json lists {report.shards}")
        if index_raw is not None and manifest.index_sha256 != hashlib.sha256(index_raw).hexdigest():
            report.problems.append("manifest.json was written for a different index.json (index_sha256 differs)")
        names = set(shards[0]["column_names"]) if shards else set()
        for spec in manifest.columns:
            for col in [spec.name] + ([spec.null_mask] if spec.null_mask else []):
                if shards and col not in names:
                    report.problems.append(f"manifest column {col!r} is not in the shards' columns {sorted(names)}")
    elif not report.problems and snap.schema is None:
        report.notes.append("no manifest.json (stock MDS dataset): rows checked against index.json only")

    seen: dict[str, int] = {}
    for i, entry in enumerate(shards):
        name = _stored(entry)["basename"]
        if name in seen:
            report.problems.append(f"shard {i} ({name}) is listed twice in index.json (also shard {seen[name]}): rows would be read twice")
        seen.setdefault(name, i)
        if not (_stored(entry).get("hashes")):
            report.notes.append(f"shard {i} ({name}): index lists no hash; checked size and sample count only")

    if storage.is_local:  # links are never followed by sparkbridge: one planted here is reported
        real_root = os.path.realpath(storage.root)
        for folder, dirs, files in os.walk(storage.root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    target = os.path.realpath(path)
                    if not (target + os.sep).startswith(real_root + os.sep):
                        report.problems.append(f"symbolic link {path} points outside the dataset root (to {target}); "
                                               "sparkbridge never follows it: remove it")
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

    if snap.legacy:  # no log: anything sparkbridge wrote that the index does not name
        from sparkbridge.log.layout import owner

        keep = snap.files() | {f + ".tmp" for f in snap.files()}
        report.orphans = [rel for rel, _ in listing if owner(rel) and rel not in keep]
        reasons = {rel: "written by sparkbridge, not in index.json" for rel in report.orphans}
    else:
        plan = plan_vacuum(storage, reader=reader, retention_seconds=DEFAULT_RETENTION_SECONDS
                           if retention_seconds is None else retention_seconds)
        report.orphans, reasons = plan.delete, plan.reasons
        for w in plan.kept_active:
            report.notes.append(f"write {w} has files but no commit yet (running, or stopped within the retention "
                                "window; a later vacuum removes them if it never commits)")
    for rel in report.orphans:
        report.problems.append(f"orphan: {storage.url(rel)} ({reasons[rel]}; `sparkbridge vacuum` removes it)")
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


# --------------------------------------------------------------------------- vacuum


def add_vacuum_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="OUT", help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--retention", type=float, default=None, metavar="SECONDS",
                        help="keep versions replaced less than this long ago, and writes active within it "
                             "(default 3600)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted and why; change nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_vacuum(args: argparse.Namespace) -> int:
    from sparkbridge.log.vacuum import DEFAULT_RETENTION_SECONDS, vacuum

    retention = DEFAULT_RETENTION_SECONDS if args.retention is None else args.retention
    if args.retention is None:
        log.info("retention defaults to %.0f s", retention)
    plan = vacuum(args.dataset, retention_seconds=retention, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(asdict(plan), indent=2, sort_keys=True))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(plan.summary().replace("file(s) to delete", f"file(s) {verb}", 1))
    return 0
