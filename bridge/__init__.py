"""Training side of sparkbridge: stream MDS datasets into PyTorch, batch by batch.

Never imports pyspark. Heavy imports (torch, streaming) load when a name is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["StreamingLoader", "LoaderOptions", "ShuffleAlgo", "StateError", "CorruptShardError", "SequencePacker",
           "pad_sequences"]

_LAZY = {
    "StreamingLoader": "sparkbridge.bridge.loader",
    "LoaderOptions": "sparkbridge.bridge.options",
    "ShuffleAlgo": "sparkbridge.bridge.order",
    "StateError": "sparkbridge.bridge.state",
    "CorruptShardError": "sparkbridge.bridge.decode",
    "SequencePacker": "sparkbridge.bridge.sequences",
    "pad_sequences": "sparkbridge.bridge.sequences",
}

if TYPE_CHECKING:  # pragma: no cover
    from sparkbridge.bridge.decode import CorruptShardError
    from sparkbridge.bridge.loader import StreamingLoader
    from sparkbridge.bridge.options import LoaderOptions
    from sparkbridge.bridge.order import ShuffleAlgo
    from sparkbridge.bridge.sequences import SequencePacker, pad_sequences
    from sparkbridge.bridge.state import StateError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
