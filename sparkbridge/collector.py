"""Pausing Python's cyclic garbage collector while a dataset's metadata is built in bulk.

Why: parsing a log entry or checkpoint of 100,000 shards makes ~600,000 dicts and lists, and
building a loader over them makes as many objects again. Every 700 new containers the collector
runs, and each time the older generations have grown by a quarter it walks every container
alive: ``json.loads`` of one 47 MB entry took 1.18 s with it and 0.39 s without
(``bench/metadata.py``). Those objects are JSON values and readers: they hold no reference
cycles, and reference counting frees them whether the collector runs or not. So the collector is
paused for the bulk work only, and resumes (as it was) when the outermost pause ends.

When it resumed, its first young collection walked every container the pause had made (~1M after
a loader's build at 100,000 shards, ~0.4 s), and the next one again. So what a pause made joins
the oldest generation as it is, without a collection (``gc.freeze()`` then ``gc.unfreeze()``, two
list splices): the next full collection walks it, as it walks every long-lived object. Young
garbage cycles of the moment wait for that full collection too (none is lost). A process that
froze objects itself (before forking workers) is left as it is: the collector just resumes. Only a
bulk pause does this (:data:`BULK_CONTAINERS`); after a small one the collector just resumes.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

__all__ = ["paused_collector", "BULK_CONTAINERS"]

#: A pause that leaves at least this many new containers promotes them (a large index, a loader's
#: build). A smaller one leaves them young: promoting every short pause's objects (the log refreshed
#: every poll of a followed epoch, thousands of small replays) put their garbage cycles out of reach
#: of young collections, and the log's model test ran 1.9x slower at 800 examples.
BULK_CONTAINERS = 50_000

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused_collector() -> Iterator[None]:
    """Run the body with the cyclic collector disabled. Nested and concurrent pauses (a loader's
    fill thread beside its main thread) share one pause: the collector is re-enabled when the
    last one ends, and only if it was enabled when the first began (a caller's own
    ``gc.disable()`` is kept)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                # (a caller's own frozen objects stay frozen; a small pause's objects stay young)
                if gc.get_freeze_count() == 0 and gc.get_count()[0] >= BULK_CONTAINERS:
                    gc.freeze()  # everything tracked, made during the pause or not, to the
                    gc.unfreeze()  # oldest generation as it is: no young collection walks it
                gc.enable()
