"""sparkbridge: Spark ETL → MDS shards → PyTorch training, streamed and exactly once.

The everyday names live here::

    from sparkbridge import read_source, write_mds, StreamingLoader, SparkbridgeError

``sparkbridge.etl`` is the Spark side (never imports torch), ``sparkbridge.bridge`` the training
side (never imports pyspark), ``sparkbridge.format`` the on-disk formats both share, and
``sparkbridge.log`` the versioned dataset log. Importing this package is cheap: the Spark- and
torch-facing names load on first use, the errors at once (they are plain Python).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparkbridge.errors import *  # noqa: F401,F403 - the error classes are part of the public face
from sparkbridge.errors import __all__ as _errors

__version__ = "0.2.0"

_LAZY = {
    "read_source": "sparkbridge.etl.sources",
    "write_mds": "sparkbridge.etl.writer",
    "WriteResult": "sparkbridge.etl.writer",
    "mds_sink": "sparkbridge.etl.sink",
    "open_dataset": "sparkbridge.log.snapshot",
    "vacuum": "sparkbridge.log.vacuum",
    "StreamingLoader": "sparkbridge.bridge.loader",
}

__all__ = ["__version__", *_LAZY, *_errors]

if TYPE_CHECKING:  # pragma: no cover
    from sparkbridge.bridge.loader import StreamingLoader
    from sparkbridge.etl.sources import read_source
    from sparkbridge.etl.sink import mds_sink
    from sparkbridge.etl.writer import WriteResult, write_mds
    from sparkbridge.log.snapshot import open_dataset
    from sparkbridge.log.vacuum import vacuum


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparkbridge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
