"""Spark side of sparkbridge: read sources, write MDS datasets exactly once.

Importing ``etl`` is cheap and does not import pyspark, so the training side can use the shared
format modules (:mod:`sparkbridge.format.mds`, :mod:`sparkbridge.format.manifest`); the Spark-facing names load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["read_source", "write_mds", "WriteResult"]

_LAZY = {
    "read_source": "sparkbridge.etl.sources",
    "write_mds": "sparkbridge.etl.writer",
    "WriteResult": "sparkbridge.etl.writer",
}

if TYPE_CHECKING:  # pragma: no cover
    from sparkbridge.etl.sources import read_source
    from sparkbridge.etl.writer import WriteResult, write_mds


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'etl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
