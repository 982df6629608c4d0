"""Import the parts of Mosaic Streaming the loader uses without ``streaming/__init__.py``.

Why: ``import streaming`` executes ``streaming/__init__.py``, which imports ``streaming.text``,
``streaming.vision`` and ``streaming.multimodal`` (transformers, torchvision: ~6 s and ~100 MB in a
fresh process), and ``streaming/base/__init__.py`` imports the ``StreamingDataLoader``
(transformers again). The loader needs ``streaming.base.dataset`` and a few siblings, none of
which import those.

How: :func:`load_streaming_base` registers the two packages, ``streaming`` and
``streaming.base``, as module objects made from their real specs (so ``__path__``, ``__file__``
and the submodule search work as usual) *without executing* their ``__init__``; submodules then
import normally. The first access to any other attribute of such a package (``streaming.
StreamingDataset``, ``from streaming import MDSWriter``, ``streaming.__version__``,
``import streaming.text`` is just a submodule) executes the real ``__init__`` in place, so user
code that imports ``streaming`` afterwards gets the complete package, the same module object.
If ``streaming`` was already imported, nothing is changed. If the layout is not what this expects
(a future Mosaic), it falls back to the plain ``import streaming``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from types import ModuleType

__all__ = ["load_streaming_base", "is_deferred"]

logger = logging.getLogger(__name__)

_PACKAGES = ("streaming", "streaming.base")
_PROBES = frozenset({"__wrapped__", "__file__", "__path__", "__spec__", "__loader__", "__package__", "__cached__",
                     "__builtins__", "__test__", "__name__", "__dict__", "__class__"})
_lock = threading.RLock()
_DEFERRED = "__sparkbridge_deferred_init__"


def is_deferred(name: str) -> bool:
    """Whether package ``name`` is registered but its ``__init__`` has not run yet."""
    mod = sys.modules.get(name)
    return mod is not None and _DEFERRED in mod.__dict__


def _complete(mod: ModuleType) -> None:
    with _lock:
        spec = mod.__dict__.pop(_DEFERRED, None)
        if spec is None:
            return
        mod.__dict__.pop("__getattr__", None)
        logger.debug("executing %s/__init__.py (an attribute outside the submodules was used)", mod.__name__)
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            mod.__dict__[_DEFERRED] = spec
            mod.__dict__["__getattr__"] = _make_getattr(mod)
            raise


def _make_getattr(mod: ModuleType):
    def __getattr__(attr: str):
        if attr in _PROBES:
            raise AttributeError(attr)
        if _DEFERRED in mod.__dict__ and not attr.startswith("__"):
            sub = f"{mod.__name__}.{attr}"
            try:
                found = importlib.util.find_spec(sub) is not None
            except (ImportError, ValueError):
                found = False
            if found:  # `from streaming.base import distributed` names a submodule
                return importlib.import_module(sub)
        _complete(mod)
        try:
            return mod.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {mod.__name__!r} has no attribute {attr!r}") from None

    return __getattr__


def _defer(name: str) -> ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not a package here")
    mod = importlib.util.module_from_spec(spec)
    mod.__dict__[_DEFERRED] = spec
    mod.__dict__["__getattr__"] = _make_getattr(mod)
    sys.modules[name] = mod
    return mod


def load_streaming_base(submodules: tuple[str, ...]) -> None:
    """Import ``submodules`` (e.g. ``"streaming.base.dataset"``) without running the package
    ``__init__`` files when ``streaming`` is not imported yet; else a plain import."""
    with _lock:
        if "streaming" not in sys.modules:
            added = []
            try:
                top = _defer("streaming")
                added.append("streaming")
                base = _defer("streaming.base")
                added.append("streaming.base")
                top.__dict__["base"] = base
                for name in submodules:
                    importlib.import_module(name)
                return
            except Exception as exc:  # an unexpected layout: the normal import, slower but sound
                logger.debug("deferred import of streaming failed (%s); importing the whole package", exc)
                for name in added:
                    sys.modules.pop(name, None)
        importlib.import_module("streaming")
        for name in submodules:
            importlib.import_module(name)
