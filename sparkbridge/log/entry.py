"""One commit of the dataset log: ``_log/<version>.json``, created put-if-absent.

The vocabulary is :class:`Operation`, one word per concept:

* ``create`` / ``append`` / ``overwrite`` — a write and what it does to the dataset (``write_mds``'s
  ``mode="error"`` creates). ``commit`` says how its rows arrive: ``job`` (default) — all of them
  in this entry; ``partition`` — this entry *opens* the write (with the schema and, for an
  overwrite, the removals) and its rows arrive in ``partition`` entries until ``complete``.
* ``partition`` — one partition's shards of an open write, claimed by ``(write_id, partition)``:
  the first entry for a pair wins, every later one is refused, so retried, speculative and zombie
  attempts never add rows twice.
* ``complete``  — closes an open write with its row count; default readers see it from here on.
* ``stream``    — one micro-batch of a Structured Streaming query, with ``txn`` = the query id and
  batch id (as Delta's ``txnAppId``/``txnVersion``): a replayed batch is recognised and skipped.
* ``import``    — adopts an ``index.json`` written before the log existed (or by stock Mosaic).
* ``vacuum``    — fences writes that may never commit again (``fence``: a fenced open write is
  rolled back by the replay) and records the oldest version whose files are still kept
  (``retained_from``); files are deleted only after this entry is committed.

There is no ``abort`` entry: a failed partitioned write stays open so that ``resume=<write id>``
can finish it, and only a vacuum (a fence) decides that it never will.

Format ``sparkbridge.log/2`` writes these words; ``sparkbridge.log/1`` entries (sparkbridge before
the Operation type: ``operation: "write" | "begin"`` plus ``mode``) are still read, mapped on parse.

Every path inside is checked (:mod:`sparkbridge.format.index`) when an entry is parsed: a hostile
or damaged entry is refused with an error naming the file, never followed outside the root.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from sparkbridge.errors import LogError, ShardFormatError
from sparkbridge.format.index import check_index_entries
from sparkbridge.format.jsonload import loads
from sparkbridge.format.paths import check_relpath
from sparkbridge.log.layout import LOG_DIR

__all__ = [
    "LOG_FORMAT",
    "LOG_FORMATS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_1",
    "Operation",
    "CommitUnit",
    "WRITES",
    "OPERATIONS",
    "MODES",
    "LogEntry",
    "entry_name",
    "checkpoint_name",
    "parse_log_name",
]

LOG_FORMAT = "sparkbridge.log/2"
_LOG_FORMAT_1 = "sparkbridge.log/1"
LOG_FORMATS = (_LOG_FORMAT_1, LOG_FORMAT)  # what this sparkbridge reads
#: Format 2 stores the state's compact JSON and the sha256 of exactly those bytes, so a checkpoint
#: is serialized once to write and parsed once to read (format 1's checksum was over another
#: serialization of the parsed state: at 100,000 shards a second ~0.5 s on every open). Both are read.
CHECKPOINT_FORMAT = "sparkbridge.log.checkpoint/2"
CHECKPOINT_FORMAT_1 = "sparkbridge.log.checkpoint/1"


class Operation(str, Enum):
    """What one log entry does (see the module doc). A ``str`` so that JSON and comparisons with
    the plain word keep working."""

    CREATE = "create"
    APPEND = "append"
    OVERWRITE = "overwrite"
    PARTITION = "partition"
    COMPLETE = "complete"
    STREAM = "stream"
    IMPORT = "import"
    VACUUM = "vacuum"

    def __str__(self) -> str:
        return self.value


class CommitUnit(str, Enum):
    """How a write's rows reach the log: all at once (``job``) or a partition at a time."""

    JOB = "job"
    PARTITION = "partition"

    def __str__(self) -> str:
        return self.value


#: the operations that are a write of their own (and what it does to the dataset)
WRITES = (Operation.CREATE, Operation.APPEND, Operation.OVERWRITE)
OPERATIONS = tuple(o.value for o in Operation)
MODES = tuple(o.value for o in WRITES)
_FORMAT_1_OPERATIONS = ("write", "begin", "partition", "complete", "stream", "import", "vacuum")
_NAME_RE = re.compile(r"^(\d{20})\.(json|checkpoint\.json)$")


def entry_name(version: int) -> str:
    return f"{LOG_DIR}/{version:020d}.json"


def checkpoint_name(version: int) -> str:
    return f"{LOG_DIR}/{version:020d}.checkpoint.json"


def parse_log_name(rel: str) -> Optional[tuple[int, str]]:
    """``(version, "entry" | "checkpoint")`` for a path under ``_log/``, None for anything else."""
    prefix = LOG_DIR + "/"
    if not rel.startswith(prefix):
        return None
    m = _NAME_RE.match(rel[len(prefix):])
    if not m:
        return None
    return int(m.group(1)), ("entry" if m.group(2) == "json" else "checkpoint")


def _int(obj: dict, key: str, where: str, *, optional: bool = False, minimum: int = 0) -> Optional[int]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LogError(f"{where}: {key} must be an int >= {minimum}, got {value!r}")
    return value



def _check_added(add: tuple[dict, ...], where: str) -> None:
    """Each file named once: a shard listed twice would be read twice. (Sizes were checked with
    the entries, by :func:`sparkbridge.format.index.check_index_entries`.)"""
    seen: dict[str, int] = {}
    for i, e in enumerate(add):
        name = (e.get("zip_data") or e["raw_data"])["basename"]
        if name in seen:
            raise LogError(f"{where}: shard {name} is listed twice in add (shards {seen[name]} and {i}); its rows "
                           "would be read twice")
        seen[name] = i


def _check_schema(schema: dict, where: str) -> None:
    """``schema.columns`` must rebuild :class:`sparkbridge.format.manifest.ColumnSpec` objects:
    refused here, not as a TypeError when ``manifest.json`` is derived."""
    from sparkbridge.format.manifest import ColumnSpec

    columns = schema.get("columns", [])
    if not isinstance(columns, list):
        raise LogError(f"{where}: schema.columns must be a list of column objects, got {type(columns).__name__}")
    for i, c in enumerate(columns):
        if not isinstance(c, dict):
            raise LogError(f"{where}: schema.columns[{i}] must be an object, got {c!r}")
        try:
            spec = ColumnSpec(**c)
        except TypeError as exc:
            raise LogError(f"{where}: schema.columns[{i}] is not a column description ({exc})") from None
        if not all(isinstance(getattr(spec, k), str) for k in ("name", "logical", "encoding", "spark_type")):
            raise LogError(f"{where}: schema.columns[{i}]: name, logical, encoding and spark_type must be strings")
    for key in ("nulls", "compression"):
        if schema.get(key) is not None and not isinstance(schema[key], str):
            raise LogError(f"{where}: schema.{key} must be a string, got {schema[key]!r}")
    if not isinstance(schema.get("hashes", []), list) or not all(isinstance(h, str) for h in schema.get("hashes", [])):
        raise LogError(f"{where}: schema.hashes must be a list of hash names, got {schema.get('hashes')!r}")


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """A parsed, checked log entry (see the module doc for the operations). Before it is
    committed it has no version yet (``-1``): :class:`sparkbridge.log.commit.Draft`.

    ``mode`` is not stored: it repeats a write's operation (``create``/``append``/``overwrite``,
    None for the others) for readers of the state. Constructing with the words of format 1
    (``operation="write"|"begin"`` and ``mode=``) still works and is mapped here, once."""

    operation: Operation
    write_id: str
    read_version: int
    version: int = -1
    commit_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timestamp: float = 0.0
    mode: Optional[str] = None
    commit: Optional[CommitUnit] = None
    add: tuple[dict, ...] = ()
    remove: tuple[str, ...] = ()
    schema: Optional[dict] = None
    partition: Optional[int] = None
    rows: Optional[int] = None
    txn: Optional[dict] = None
    fence: tuple[str, ...] = ()
    retained_from: Optional[int] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        op, commit = self.operation, self.commit
        if op in ("write", "begin"):  # format 1's words
            if self.mode not in MODES:
                raise LogError(f"a {op} entry needs a mode, one of {MODES}; got {self.mode!r}")
            op, commit = self.mode, (CommitUnit.JOB if op == "write" else CommitUnit.PARTITION)
        try:
            op = Operation(op)
        except ValueError:
            raise LogError(f"unknown operation {op!r} (expected one of {OPERATIONS})") from None
        if op in WRITES:
            commit = CommitUnit(commit or CommitUnit.JOB)
        elif commit is not None:
            raise LogError(f"a {op} entry has no commit unit (only {MODES} do), got {commit!r}")
        object.__setattr__(self, "operation", op)
        object.__setattr__(self, "commit", commit)
        object.__setattr__(self, "mode", op.value if op in WRITES else None)

    @property
    def name(self) -> str:
        return entry_name(self.version)

    @property
    def opens(self) -> bool:
        """Whether this entry opens a write whose rows arrive a partition at a time."""
        return self.commit is CommitUnit.PARTITION

    @property
    def changes_data(self) -> bool:
        return bool(self.add or self.remove) or self.replaces

    @property
    def replaces(self) -> bool:
        """Whether this entry replaces the dataset (an overwrite or an import)."""
        return self.operation in (Operation.IMPORT, Operation.OVERWRITE)

    def describe(self) -> str:
        what = f"{self.operation} (per partition)" if self.opens else str(self.operation)
        extra = f", partition {self.partition}" if self.partition is not None else ""
        if self.txn:
            extra += f", stream {self.txn.get('app_id')} batch {self.txn.get('batch_id')}"
        return f"version {self.version}: {what} by {self.write_id}{extra}"

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": LOG_FORMAT, "version": self.version, "operation": self.operation.value,
            "commit_id": self.commit_id, "write_id": self.write_id, "timestamp": self.timestamp,
            "read_version": self.read_version,
        }
        optional = {"commit": None if self.commit is None else self.commit.value, "schema": self.schema, "partition": self.partition, "rows": self.rows,
                    "txn": self.txn, "retained_from": self.retained_from}
        obj.update({k: v for k, v in optional.items() if v is not None})
        if self.add:
            obj["add"] = list(self.add)
        if self.remove:
            obj["remove"] = list(self.remove)
        if self.fence:
            obj["fence"] = list(self.fence)
        if self.info:
            obj["info"] = dict(self.info)
        return obj

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, obj: Any, *, where: str, expect_version: Optional[int] = None) -> "LogEntry":
        if not isinstance(obj, dict):
            raise LogError(f"{where}: a log entry must be a JSON object")
        fmt = obj.get("format")
        if fmt not in LOG_FORMATS:
            raise LogError(f"{where}: log format {fmt!r} is not supported by this sparkbridge "
                           f"(it reads {' and '.join(LOG_FORMATS)}); upgrade sparkbridge to read this dataset")
        version = _int(obj, "version", where)
        if expect_version is not None and version != expect_version:
            raise LogError(f"{where}: the entry says version {version}, its file name says {expect_version}")
        operation = obj.get("operation")
        mode = commit = None
        if fmt == _LOG_FORMAT_1:  # operation write|begin + mode, read as the operation the mode names
            if operation not in _FORMAT_1_OPERATIONS:
                raise LogError(f"{where}: unknown operation {operation!r} (expected one of {_FORMAT_1_OPERATIONS})")
            mode = obj.get("mode")
            if mode is not None and mode not in MODES:
                raise LogError(f"{where}: unknown mode {mode!r}")
            if operation in ("write", "begin") and mode is None:
                raise LogError(f"{where}: a {operation} entry needs a mode")
        else:
            if operation not in OPERATIONS:
                raise LogError(f"{where}: unknown operation {operation!r} (expected one of {OPERATIONS})")
            commit = obj.get("commit")
            if operation in MODES and commit not in [c.value for c in CommitUnit]:
                raise LogError(f"{where}: a {operation} entry needs commit 'job' or 'partition', got {commit!r}")
            if operation not in MODES and commit is not None:
                raise LogError(f"{where}: a {operation} entry has no commit unit, got {commit!r}")
        for key in ("commit_id", "write_id"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise LogError(f"{where}: {key} must be a non-empty string")
        timestamp = obj.get("timestamp")
        if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or not math.isfinite(timestamp) \
                or timestamp < 0:
            raise LogError(f"{where}: timestamp must be a finite number of seconds >= 0, got {timestamp!r}")
        read_version = _int(obj, "read_version", where, minimum=-1)
        add = obj.get("add") or []
        remove = obj.get("remove") or []
        fence = obj.get("fence") or []
        if not isinstance(add, list) or not isinstance(remove, list) or not isinstance(fence, list):
            raise LogError(f"{where}: add, remove and fence must be lists")
        try:  # the entry's shards share their column lists, as an index's do
            add = tuple(check_index_entries(add, where=where, label="added shard"))
        except ShardFormatError as exc:
            raise LogError(str(exc)) from None
        _check_added(add, where)
        remove = tuple(check_relpath(r, where=f"{where}, removed shard {i}") for i, r in enumerate(remove))
        if not all(isinstance(w, str) for w in fence):
            raise LogError(f"{where}: fence must list write ids")
        schema = obj.get("schema")
        if schema is not None and (not isinstance(schema, dict) or not isinstance(schema.get("fingerprint"), str)):
            raise LogError(f"{where}: schema must be an object with a fingerprint")
        if schema is not None:
            _check_schema(schema, where)
        txn = obj.get("txn")
        if txn is not None and (not isinstance(txn, dict) or not isinstance(txn.get("app_id"), str)
                                or not isinstance(txn.get("batch_id"), int)):
            raise LogError(f"{where}: txn must be {{'app_id': str, 'batch_id': int}}, got {txn!r}")
        if txn is not None and txn.get("query_id") is not None and not isinstance(txn["query_id"], str):
            raise LogError(f"{where}: txn.query_id must be a string (the Spark query id), got {txn['query_id']!r}")
        if operation == "partition" and obj.get("partition") is None:
            raise LogError(f"{where}: a partition entry needs a partition number")
        info = obj.get("info") or {}
        if not isinstance(info, dict):
            raise LogError(f"{where}: info must be an object")
        return cls(
            version=version, operation=operation, commit_id=obj["commit_id"], write_id=obj["write_id"],
            timestamp=float(timestamp), read_version=read_version, mode=mode, commit=commit, add=add, remove=remove,
            schema=schema, partition=_int(obj, "partition", where, optional=True),
            rows=_int(obj, "rows", where, optional=True), txn=txn, fence=tuple(fence),
            retained_from=_int(obj, "retained_from", where, optional=True), info=info,
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str, expect_version: Optional[int] = None) -> "LogEntry":
        try:
            obj = loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LogError(f"{where}: not valid JSON ({exc}); the log entry is damaged") from None
        return cls.from_json(obj, where=where, expect_version=expect_version)
