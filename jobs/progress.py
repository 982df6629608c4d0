"""Progress bars for Spark work: one bar per phase of a job, fed by Spark's status tracker.

Why not Spark's console progress bar: it draws one line per stage that interleaves with our log and
means nothing to a user ("Stage 28"). Here a job names its phases (``features``, ``write train``)
and each gets one tqdm bar on stderr counting the tasks of every stage that ran during it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["SparkProgress"]


class SparkProgress:
    """``with SparkProgress(spark) as p: with p.phase("write train"): ...`` -- one bar per phase.

    A background thread polls the status tracker every ``interval`` seconds; a stage seen running
    counts with all its tasks, and as done once it is no longer active.
    """

    def __init__(self, spark: "SparkSession", *, enabled: bool = True, interval: float = 0.3) -> None:
        self._sc = spark.sparkContext
        self._enabled = enabled
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._bar: Any = None
        self._stages: dict[int, list[int]] = {}  # stage id -> [tasks, completed], this phase

    def __enter__(self) -> "SparkProgress":
        if self._enabled:
            self._thread = threading.Thread(target=self._run, name="spark-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_bar()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the Spark tasks run inside this block on a bar called ``name``."""
        if not self._enabled:
            yield
            return
        from tqdm.auto import tqdm

        with self._lock:
            self._close_bar()
            self._stages = {}
            self._bar = tqdm(total=0, desc=name, unit="task", file=sys.stderr, dynamic_ncols=True)
        try:
            yield
        finally:
            self._poll()
            with self._lock:
                for entry in self._stages.values():
                    entry[1] = entry[0]
                self._refresh()
                self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.total = sum(t for t, _ in self._stages.values())
            self._bar.n = sum(d for _, d in self._stages.values())
            self._bar.refresh()

    def _poll(self) -> None:
        try:
            tracker = self._sc.statusTracker()
            active = {s: tracker.getStageInfo(s) for s in tracker.getActiveStageIds()}
        except Exception:  # noqa: BLE001 - the context is stopping; the bar just stops moving
            return
        with self._lock:
            if self._bar is None:
                return
            for sid, entry in self._stages.items():
                if sid not in active:
                    entry[1] = entry[0]  # finished (or skipped) since the last poll
            for sid, info in active.items():
                if info is not None:
                    self._stages[sid] = [info.numTasks, info.numCompletedTasks]
            self._refresh()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._poll()
