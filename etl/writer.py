"""``write_mds``: a Spark DataFrame → an MDS dataset, exactly once, readable by stock Mosaic.

The driver plans the columns (unsupported types fail here), registers the job, runs one
``mapInArrow`` pass in which every task attempt writes its own shards (see :mod:`etl.task`),
collects the small manifest rows, and commits (see :mod:`etl.commit`). Data is never collected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

from sparkbridge.errors import (
    CommitConflictError,
    ConcurrentWriteError,
    DatasetExistsError,
    NullValuesError,
    SchemaMismatchError,
    UsageError,
    WriteError,
)
from sparkbridge.etl.commit import WriteJob, schema_record
from sparkbridge.log.commit import Superseded
from sparkbridge.log.layout import is_write_id
from sparkbridge.etl.credentials import task_credentials
from sparkbridge.log.vacuum import DEFAULT_RETENTION_SECONDS
from sparkbridge.format.codecs import compression_extension, hash_bytes
from sparkbridge.storage import open_storage
from sparkbridge.etl.types import logical_schema, plan_columns

__all__ = [
    "write_mds",
    "WriteResult",
    "WriteError",
    "NullValuesError",
    "DatasetExistsError",
    "ConcurrentWriteError",
    "CommitConflictError",
    "SchemaMismatchError",
    "parse_size",
]

log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class WriteResult:
    """What a write did. ``bytes`` counts stored shard bytes (compressed when compressed)."""

    rows: int
    shards: int
    bytes: int
    seconds: float
    out: str
    mode: str = "error"
    job_id: str = ""
    columns: tuple[str, ...] = field(default_factory=tuple)
    raw_bytes: int = 0
    partitions: int = 0
    version: int = -1  # the log version this write committed
    skipped: bool = False  # a stream batch already committed (replayed): nothing written

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["columns"] = list(self.columns)
        out["rows_per_second"] = self.rows_per_second
        return out


def parse_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"64MB"``, ``"512KB"``, ``"1.5GiB"`` (powers of 2)."""
    if isinstance(value, bool):
        raise TypeError("shard_size must be an int or a string such as '64MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"shard_size {value!r} is not a size such as '64MB' or '512KB'")
        unit = (m.group(2) or "").lower().replace("i", "").rstrip("b")
        size = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"shard_size must be an int or a string such as '64MB', got {type(value).__name__}")
    if size < 1024:
        raise ValueError(f"shard_size must be at least 1 KiB, got {size} bytes")
    if size >= 1 << 32:
        raise ValueError(f"shard_size must be below 4 GiB (the MDS offset limit), got {size} bytes")
    return size


def _check_options(compression: Optional[str], hashes: Sequence[str]) -> tuple[Optional[str], tuple[str, ...]]:
    if compression is not None:
        if not isinstance(compression, str):
            raise TypeError(f"compression must be a string such as 'zstd' or None, got {compression!r}")
        compression_extension(compression)
    if isinstance(hashes, str):
        hashes = (hashes,)
    hashes = tuple(hashes or ())
    for h in hashes:
        hash_bytes(h, b"")
    return compression, hashes


def _task_error(exc: BaseException) -> Optional[str]:
    from sparkbridge.etl.task import ERROR_TAG

    text = str(exc)
    i = text.find(ERROR_TAG)
    if i < 0:
        return None
    line = text[i + len(ERROR_TAG):].splitlines()[0]
    return line.strip()


def write_mds(
    df: Any,
    out: str,
    *,
    mode: str = "error",
    columns: Optional[Sequence[str]] = None,
    nulls: str = "error",
    compression: Optional[str] = "zstd",
    hashes: Sequence[str] = ("xxh64",),
    shard_size: Union[int, str] = "64MB",
    decimals: str = "string",
    retention_seconds: float = DEFAULT_RETENTION_SECONDS,
    commit: str = "job",
    resume: Union[bool, str] = False,
    _txn: Optional[dict] = None,
) -> WriteResult:
    """Write ``df`` to ``out`` (local folder or ``s3://bucket/prefix``) as an MDS dataset.

    ``mode``: ``error`` (refuse an existing dataset), ``append`` (same logical schema required; the
    new index lists the old shards then the new ones), ``overwrite`` (the new index replaces the old
    one atomically; the old version's shards stay readable for ``retention_seconds``, default one
    hour, so a reader mid-epoch is not cut off — they are listed under ``retained`` in
    ``manifest.json``, never reported as orphans, and deleted by the first write after they expire).
    ``nulls``: ``error`` (one error naming each column and its null count, nothing committed),
    ``fill`` (0, false, "", 1970-01-01, the epoch, empty or zero arrays, ``{}``/``[]`` for json;
    recorded per column in the manifest), ``mask`` (same values plus a ``<col>__null`` uint8 column).
    ``decimals``: ``string`` (exact ``str_decimal``) or ``float`` (float64). ``columns``: which
    columns to write, in this order. ``shard_size``: bytes per uncompressed shard, int or "64MB".
    ``commit``: ``job`` (default: one log entry when every task is done) or ``partition`` (each
    partition is committed by the task that wrote it, as soon as it is done, exactly once — a
    ``StreamingLoader(..., follow=True)`` trains on it while the job still runs; ``index.json``
    and default loaders see it at the end, when the write is marked complete). A failed
    partitioned write stays open (its error's note names it): rerun the same job with
    ``resume="<write id>"`` (same input, same partitioning: claimed partitions are skipped, the
    rest are written, then the write completes); ``resume=True`` takes the only open write and is
    refused when several are. A write idle past ``retention_seconds`` is fenced by a vacuum and
    rolled back: never served, and an overwrite's old rows stay.
    S3 outputs use the driver's ``S3_ENDPOINT_URL``/``AWS_*`` (sent with the tasks, sealed: see
    :mod:`sparkbridge.etl.credentials`), on a classic and a Spark Connect session alike.
    """
    started = time.perf_counter()
    compression, hashes = _check_options(compression, hashes)
    size_limit = parse_size(shard_size)
    if not isinstance(retention_seconds, (int, float)) or retention_seconds < 0:
        raise UsageError(f"retention_seconds must be a number >= 0, got {retention_seconds!r}")
    if commit not in ("job", "partition"):
        raise UsageError(f"commit must be 'job' or 'partition', got {commit!r}")
    if not isinstance(resume, bool) and not (isinstance(resume, str) and is_write_id(resume)):
        raise UsageError(f"resume must be True/False or a write id such as 'j20260101T120000-1a2b3c4d' (a failed "
                         f"partitioned write names its own), got {resume!r}")
    if resume and commit != "partition":
        raise UsageError("resume=True continues a write committed per partition: pass commit='partition'")
    if _txn is not None and (mode != "append" or commit != "job"):
        raise UsageError("a streaming micro-batch (mds_sink) is always appended with commit='job'")
    storage = open_storage(out)
    plans = plan_columns(df.schema, columns=columns, nulls=nulls, decimals=decimals)
    job = WriteJob(storage, mode, resume=resume)  # reads the latest version and applies the mode
    if _txn is not None:  # a batch of another checkpoint under this app_id: refused before "already committed"
        from sparkbridge.log.commit import stream_mismatch

        mismatch = stream_mismatch(_txn, job.base.txn_queries.get(_txn["app_id"]), storage.root)
        if mismatch:
            raise CommitConflictError(mismatch)
    if _txn is not None and job.base.txns.get(_txn["app_id"], -1) >= _txn["batch_id"]:
        log.info("%s: batch %d of stream %s is already committed (a replay after a restart): skipped",
                 storage.root, _txn["batch_id"], _txn["app_id"])
        return WriteResult(rows=0, shards=0, bytes=0, seconds=time.perf_counter() - started, out=storage.root,
                           mode=mode, job_id="", skipped=True, version=job.base.version)

    from sparkbridge.etl.arrow_conf import arrow_stream_conf
    from sparkbridge.etl.prepare import measure_array_shapes, prepare_frame
    from sparkbridge.etl.task import MANIFEST_FIELD, TaskConfig, task_function

    existing = job.columns if mode == "append" else None
    keep = None
    if existing is not None:
        keep = {c.name: c.shape for c in existing if c.logical in ("array", "vector")}
        keep = {name: shape for name, shape in keep.items()
                if any(p.name == name and p.kind == "ndarray_var" for p in plans)}
    plans = measure_array_shapes(df, plans, keep=keep)
    order = list(columns) if columns is not None else [f.name for f in df.schema.fields]
    specs = sorted((p.spec for p in plans if p.spec is not None), key=lambda c: order.index(c.name))
    job.check_schema(specs)
    fingerprint = hashlib.sha256(json.dumps(logical_schema(plans), sort_keys=True).encode()).hexdigest()
    # an append keeps the dataset's own schema record (it matched above); anything else records this one
    schema = (job.base.schema if existing is not None and job.base.schema is not None else
              schema_record(columns=specs, fingerprint=fingerprint, nulls=nulls, compression=compression,
                            hashes=hashes))
    prepared = prepare_frame(df, plans, nulls=nulls, decimals=decimals)
    if commit == "partition":
        job.begin(schema=schema, info={"writer": "sparkbridge.etl.write_mds"})
    job.start()
    log.info("write_mds: %d columns to %s (mode=%s, nulls=%s, compression=%s, shard_size=%d, write %s)",
             len(plans), storage.root, mode, nulls, compression, size_limit, job.write_id)
    cfg = TaskConfig(storage=storage, job_id=job.write_id, plans=tuple(plans), compression=compression,
                     hashes=hashes, shard_size=size_limit, nulls=nulls, commit=commit,
                     read_version=-1 if job.begin_version is None else job.begin_version, run=job.run_id)
    try:
        try:
            with task_credentials(df.sparkSession, storage) as key, arrow_stream_conf(df.sparkSession, plans):
                result_rows = prepared.mapInArrow(task_function(cfg, key), f"{MANIFEST_FIELD} string").collect()
        except Exception as exc:
            message = _task_error(exc)
            if message is not None:
                raise WriteError(message) from None
            raise
        tasks = [json.loads(r[0]) for r in result_rows]
        totals: dict[str, int] = {}
        for t in tasks:
            for k, v in t["nulls"].items():
                totals[k] = totals.get(k, 0) + int(v)
        if totals:
            detail = ", ".join(f"{k!r}: {v} null{'s' if v != 1 else ''}" for k, v in sorted(totals.items()))
            raise NullValuesError(
                f"nulls='error' and the data has nulls ({detail}); nothing was written. Pass "
                "nulls='fill' or nulls='mask', or clean these columns first"
            )
        if commit == "partition":
            entry = job.complete(tasks, partitions=len(tasks))
        else:
            entry = job.finish(tasks, schema=schema, txn=_txn,
                               info={"writer": "sparkbridge.etl.write_mds", "partitions": len(tasks)})
    except Superseded as exc:  # a replayed stream batch committed meanwhile by its first run
        job.abort(exc)
        return WriteResult(rows=0, shards=0, bytes=0, seconds=time.perf_counter() - started, out=storage.root,
                           mode=mode, job_id=job.write_id, skipped=True,
                           version=exc.entry.version if exc.entry is not None else -1)
    except BaseException as exc:
        job.abort(exc)
        raise
    job.after_commit(retention_seconds=retention_seconds)
    new_entries = [e for t in tasks if not t.get("superseded") for e in t["entries"]]
    stored = sum((e["zip_data"] or e["raw_data"])["bytes"] for e in new_entries)
    raw = sum(e["raw_data"]["bytes"] for e in new_entries)
    result = WriteResult(
        rows=int(entry.rows) if commit == "partition" else sum(t["rows"] for t in tasks), shards=len(new_entries),
        bytes=stored,
        seconds=time.perf_counter() - started, out=storage.root, mode=mode, job_id=job.write_id,
        columns=tuple(p.name for p in plans), raw_bytes=raw, partitions=len(tasks), version=entry.version,
    )
    if result.rows == 0 and _txn is None:
        log.warning("the DataFrame was empty: %s holds a committed dataset with 0 rows", result.out)
    log.info("wrote %d rows in %d shards (%d bytes) to %s in %.2f s", result.rows, result.shards,
             result.bytes, result.out, result.seconds)
    return result
