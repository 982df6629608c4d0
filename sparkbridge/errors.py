"""Every error sparkbridge raises on purpose, under one root: :class:`SparkbridgeError`.

Why one module: a caller (a training script, a notebook, the CLI) catches ``SparkbridgeError`` to
tell "sparkbridge refused this, and the message says why" from a bug. Each class also keeps the
builtin base a caller would naturally catch (``ValueError`` for bad values, ``FileNotFoundError``
for a missing dataset, ...), so ``except ValueError`` keeps working. Standard library only: both
the Spark side and the training side import it, and importing it costs nothing.

Messages name the file, column, shard or log entry and say what to do; the CLI prints them as one
line (the traceback only with ``-v``).
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "SparkbridgeError",
    "UsageError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "VersionNotFoundError",
    "SchemaMismatchError",
    "CommitConflictError",
    "ConcurrentWriteError",
    "UnsupportedTypeError",
    "SchemaError",
    "NullValuesError",
    "MalformedRecordsError",
    "WriteError",
    "ShardFormatError",
    "CorruptShardError",
    "ManifestError",
    "LogError",
    "UnsafePathError",
    "StateError",
    "TransformError",
    "FollowTimeoutError",
    "RankFailedError",
    "CheckpointError",
]


class SparkbridgeError(Exception):
    """Root of every error sparkbridge raises deliberately."""


class UsageError(SparkbridgeError, ValueError):
    """An option or argument has a value sparkbridge cannot use (the CLI exits 2 on these)."""


class DatasetNotFoundError(SparkbridgeError, FileNotFoundError):
    """No committed dataset at the given root (no ``_log/`` entry and no ``index.json``)."""


class DatasetExistsError(SparkbridgeError, FileExistsError):
    """``mode="error"`` and a dataset is already committed at the output."""


class VersionNotFoundError(SparkbridgeError, LookupError):
    """A pinned version does not exist, or is no longer retained (vacuumed)."""


class SchemaMismatchError(SparkbridgeError, ValueError):
    """Data whose logical schema differs from the dataset's (append, or a conflicting commit)."""


class CommitConflictError(SparkbridgeError, RuntimeError):
    """Another writer committed a change this commit cannot be reconciled with (an overwrite, a
    schema change, or a claimed partition); nothing of this commit became visible."""


#: The first protocol's name for :class:`CommitConflictError`, kept for callers that catch it.
ConcurrentWriteError = CommitConflictError


class UnsupportedTypeError(SparkbridgeError, TypeError):
    """A column's Spark type has no MDS mapping; raised on the driver before any task runs."""


class SchemaError(SparkbridgeError, ValueError):
    """A requested column does not exist, or a generated column name collides with a user's."""


class NullValuesError(SparkbridgeError, ValueError):
    """``nulls="error"`` and the data has nulls; the message lists each column and its count."""


class MalformedRecordsError(SparkbridgeError, ValueError):
    """``bad_records="fail"`` and the source has rows that do not parse (file and line named)."""

    def __init__(self, message: str, *, count: int = 0, examples: Optional[list] = None) -> None:
        super().__init__(message)
        self.count = count
        self.examples = list(examples or [])  # (file, line number or None, record text)


class WriteError(SparkbridgeError, RuntimeError):
    """A Spark task could not write its shards; the message names the column, file or partition."""


class ShardFormatError(SparkbridgeError, ValueError):
    """A shard's bytes or an index entry do not follow the MDS format."""


class CorruptShardError(ShardFormatError):
    """A shard's bytes fail their hash, do not decompress, or break the MDS layout."""


class ManifestError(SparkbridgeError, ValueError):
    """``manifest.json`` is missing a field, has a newer version, or disagrees with the index."""


class LogError(SparkbridgeError, ValueError):
    """A ``_log/`` entry is unreadable, from a newer format, or inconsistent with the others."""


class UnsafePathError(SparkbridgeError, ValueError):
    """A path in an index or log entry would leave the dataset root or the cache (``..``, an
    absolute path, a drive, a symlink out): refused, naming the entry."""


class StateError(SparkbridgeError, ValueError):
    """A saved loader state does not fit this loader (other data, other order, bad fields)."""


class TransformError(SparkbridgeError, RuntimeError):
    """A loader's ``transform`` raised (the original exception is the ``__cause__``) or one of its
    worker processes died; the message names the epoch and batch."""


class FollowTimeoutError(SparkbridgeError, TimeoutError):
    """``follow=True`` waited longer than its timeout for a dataset or for new commits."""


class RankFailedError(SparkbridgeError, RuntimeError):
    """Another rank of a distributed job failed: with an error that cannot travel as itself (it
    does not pickle), or (``jobs/train.py``) as the cause of this rank's broken collective; the
    message names that rank and repeats its error, so every rank's log says why the job ended."""


class CheckpointError(SparkbridgeError, ValueError):
    """A training checkpoint is unreadable, not sparkbridge's, or written for another model/data;
    the message names the file(s) and says how to start over."""
