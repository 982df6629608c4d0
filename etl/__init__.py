"""Spark side of sparkbridge: read sources, write MDS datasets exactly once (a whole job, a
partition at a time, or a Structured Streaming micro-batch at a time).

Importing ``sparkbridge.etl`` is cheap and does not import pyspark; the names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_ERRORS = ("DatasetExistsError", "SchemaMismatchError", "CommitConflictError", "NullValuesError", "WriteError",
           "UnsupportedTypeError", "SchemaError", "MalformedRecordsError")

__all__ = ["read_source", "write_mds", "mds_sink", "WriteResult", *_ERRORS]

_LAZY = {
    "read_source": "sparkbridge.etl.sources",
    "write_mds": "sparkbridge.etl.writer",
    "WriteResult": "sparkbridge.etl.writer",
    "mds_sink": "sparkbridge.etl.sink",
    **{name: "sparkbridge.errors" for name in _ERRORS},
}

if TYPE_CHECKING:  # pragma: no cover
    from sparkbridge.etl.sources import read_source
    from sparkbridge.etl.sink import mds_sink
    from sparkbridge.etl.writer import WriteResult, write_mds


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'etl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
