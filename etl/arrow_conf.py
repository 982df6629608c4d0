"""Spark's Arrow settings for the write's ``mapInArrow`` pass, set around that one query.

Why: Spark (4.x) cuts the Arrow batches it streams to Python at ``maxRecordsPerBatch`` rows or
``maxBytesPerBatch`` bytes, and to enforce the byte limit it re-measures the batch being built
after *every row* (``ArrowWriter.sizeInBytes`` walks every column vector), unless that limit is
``Int.MaxValue``. Profiled with JFR on the ETL benchmark's table (16 float32 + int32 + int64),
that check was ~25% of the JVM's samples, and switching it off halved the JVM's CPU time.

When every column has a fixed width, a batch of ``maxRecordsPerBatch`` rows has a known upper
bound in bytes; when that bound is below ``maxBytesPerBatch`` the byte limit can never end a batch,
so turning it off changes no batch, only the cost. Otherwise (strings, variable arrays, or an
unlimited row count) the user's limit stays. The user's setting is restored afterwards; like any
``spark.conf.set`` it is visible to other queries of the same session while the write runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator, Optional, Sequence

from sparkbridge.etl.types import ColumnPlan
from sparkbridge.format.mds import encoding_size

__all__ = ["MAX_BYTES_KEY", "MAX_RECORDS_KEY", "arrow_row_bound", "parse_bytes", "arrow_stream_conf"]

log = logging.getLogger(__name__)

MAX_BYTES_KEY = "spark.sql.execution.arrow.maxBytesPerBatch"
MAX_RECORDS_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"
_INT_MAX = (1 << 31) - 1  # Spark skips the per-row size check for exactly this value
_DEFAULT_MAX_BYTES = 64 << 20
_DEFAULT_MAX_RECORDS = 10_000
_BYTES_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_bytes(value: Optional[str]) -> Optional[int]:
    """Spark's byte strings (``67108864b``, ``64m``, ``1g``, ``1000``) as an int; None if unreadable."""
    if value is None:
        return None
    m = _BYTES_RE.match(str(value))
    if not m:
        return None
    return int(m.group(1)) << _SHIFT[m.group(2).lower()]


def arrow_row_bound(plans: Sequence[ColumnPlan]) -> Optional[int]:
    """An upper bound of the Arrow bytes one row adds to a batch (values, validity, list offsets,
    the struct ``mapInArrow`` wraps the row in), or None when a column has no fixed width."""
    total = 1  # the row struct's validity bit, rounded up
    for plan in plans:
        width = encoding_size(plan.encoding) if plan.fixed_width else None
        if width is None:
            return None
        if plan.kind == "ndarray_fixed":  # values, their validity bits, list offset and validity
            total += width + width // 8 + 1 + 4 + 1
        else:  # fixed, mask, bool (1 bit in Arrow, 1 byte here): value + validity
            total += width + 1
    return total


def _get(spark: Any, key: str) -> Optional[str]:
    try:
        return spark.conf.get(key, None)
    except Exception:  # a session without this key (older or remote Spark): leave it alone
        return None


@contextlib.contextmanager
def arrow_stream_conf(spark: Any, plans: Sequence[ColumnPlan]) -> Iterator[bool]:
    """Around the ``mapInArrow`` action: switch Spark's per-row Arrow size check off when it can
    never end a batch (see the module doc), and restore the user's setting after. Yields whether
    the setting was changed."""
    user_bytes = _get(spark, MAX_BYTES_KEY)
    limit = parse_bytes(user_bytes) if user_bytes is not None else _DEFAULT_MAX_BYTES
    user_records = _get(spark, MAX_RECORDS_KEY)
    try:
        records = int(user_records) if user_records is not None else _DEFAULT_MAX_RECORDS
    except ValueError:
        records = 0
    row = arrow_row_bound(plans)
    # slack for buffer rounding: 64 bytes per buffer, a few buffers per column
    change = (limit is not None and limit != _INT_MAX and row is not None and records > 0
              and records * row + 256 * (len(plans) + 1) < limit)
    if not change:
        yield False
        return
    spark.conf.set(MAX_BYTES_KEY, str(_INT_MAX))
    log.debug("%s=%d for the write (%d rows of at most %d Arrow bytes stay under %s)",
              MAX_BYTES_KEY, _INT_MAX, records, row, limit)
    try:
        yield True
    finally:
        if user_bytes is None:
            spark.conf.unset(MAX_BYTES_KEY)
        else:
            spark.conf.set(MAX_BYTES_KEY, user_bytes)
