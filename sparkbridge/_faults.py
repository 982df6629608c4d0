"""Fault hooks: named points in the commit path where a test can crash or break a process.

Why in the library: the guarantees of the dataset log are about what survives a crash *between*
two steps, and the only honest test is a real process dying at that exact step. A point costs one
dictionary lookup when no fault is armed.

Arm faults with the environment variable ``SPARKBRIDGE_FAULTS`` (inherited by Spark's Python
workers and child processes): a comma-separated list of ``point=action``, where ``action`` is

* ``kill``      — ``os._exit(137)`` at once, as SIGKILL would (no cleanup, no ``finally``);
* ``raise``     — raise :class:`InjectedFault` (the caller's error handling runs);
* ``ambiguous`` — raise :class:`AmbiguousWrite` *after* the step took effect (an S3 PUT the server
  applied while the client saw a timeout);
* ``sleepS``    — stall for ``S`` seconds (a live writer that others judge idle), then go on.

A point name may end with ``@N`` to fire only at its N-th passage (1-based) in this process.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["InjectedFault", "AmbiguousWrite", "point", "ENV"]

ENV = "SPARKBRIDGE_FAULTS"
_counts: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at an armed fault point (tests only)."""


class AmbiguousWrite(OSError):
    """A write whose outcome the caller cannot know (armed fault point, tests only)."""


def _armed() -> dict[str, tuple[str, Optional[int]]]:
    spec = os.environ.get(ENV)
    if not spec:
        return {}
    out: dict[str, tuple[str, Optional[int]]] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        nth: Optional[int] = None
        if "@" in name:
            name, _, n = name.partition("@")
            nth = int(n)
        if name:
            out[name] = (action or "raise", nth)
    return out


def point(name: str) -> None:
    """Fire the fault armed at ``name``, if any."""
    if ENV not in os.environ:
        return
    armed = _armed().get(name)
    if armed is None:
        return
    action, nth = armed
    _counts[name] = _counts.get(name, 0) + 1
    if nth is not None and _counts[name] != nth:
        return
    if action == "kill":
        os._exit(137)
    if action.startswith("sleep"):
        import time

        time.sleep(float(action[5:] or 1))
        return
    if action == "ambiguous":
        raise AmbiguousWrite(f"injected ambiguous outcome at {name}")
    raise InjectedFault(f"injected fault at {name}")
