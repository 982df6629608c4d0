"""Opt-in timing of a write task's phases, for profiling a slow write (never asserted anywhere).

Set ``SPARKBRIDGE_TASK_TIMING=1`` in the executors' environment (locally: in the driver's, before
the Spark session starts; on a cluster: ``spark.executorEnv.SPARKBRIDGE_TASK_TIMING=1``) and each
write task prints one line to its stderr (the executor log), e.g.::

    sparkbridge-task-timing {"partition": 0, "rows": 250000, "batches": 25, "wait_batch": 0.41,
                             "encode": 0.05, "compress": 0.12, ...}

``wait_batch`` is the time the task waited for Spark's next Arrow batch (the JVM → Python transfer),
the sink's phases (``join``, ``compress``, ``hash``, ``write``, ``sink_idle``) run on its background
thread; ``wait_sink`` is the task waiting for a free slot in the sink's queue.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

__all__ = ["ENV", "Phases"]

ENV = "SPARKBRIDGE_TASK_TIMING"
_TAG = "sparkbridge-task-timing "


class Phases:
    """Seconds per phase name, summed; ``clock()`` is ``time.perf_counter``. Always measured (a
    few hundred clock reads per task), printed only when :data:`ENV` is set."""

    clock = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.enabled = os.environ.get(ENV, "") not in ("", "0")
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, started: float) -> float:
        """Add the time since ``started`` to ``name``; returns the clock now (the next start)."""
        now = time.perf_counter()
        self.seconds[name] += now - started
        return now

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def report(self, **facts: Any) -> None:
        if not self.enabled:
            return
        row = {**facts, **self.counts, **{k: round(v, 4) for k, v in sorted(self.seconds.items())}}
        sys.stderr.write(_TAG + json.dumps(row) + "\n")
        sys.stderr.flush()
