"""Training side of sparkbridge: stream MDS datasets into PyTorch, batch by batch.

Never imports pyspark. Heavy imports (torch, streaming) load when a name is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["StreamingLoader", "StateError", "CorruptShardError"]

_LAZY = {
    "StreamingLoader": "bridge.loader",
    "StateError": "bridge.state",
    "CorruptShardError": "bridge.decode",
}

if TYPE_CHECKING:  # pragma: no cover
    from bridge.decode import CorruptShardError
    from bridge.loader import StreamingLoader
    from bridge.state import StateError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
