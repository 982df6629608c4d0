"""Progress bars for Spark work: one bar per phase of a job, fed by Spark's status tracker
(classic session) or by Spark Connect's progress messages (``spark.registerProgressHandler``,
where there is no ``sparkContext``).

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

    Classic: a background thread polls the status tracker every ``interval`` seconds; a stage seen
    running counts with all its tasks, and as done once it is no longer active. Connect: the server
    reports each query's stages with its results; a handler registered for the duration of the
    ``with`` block counts them the same way (stage ids per operation, as Connect reports them).
    """

    def __init__(self, spark: "SparkSession", *, enabled: bool = True, interval: float = 0.3) -> None:
        from sparkbridge.etl.session import is_connect

        self._spark = spark
        self._connect = is_connect(spark)
        self._sc = None if self._connect else spark.sparkContext
        self._enabled = enabled
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._bar: Any = None
        self._stages: dict[Any, list[int]] = {}  # stage id (Connect: operation, stage) -> [tasks, completed]
        self._handler: Any = None

    def __enter__(self) -> "SparkProgress":
        if self._enabled and self._connect:
            register = getattr(self._spark, "registerProgressHandler", None)
            if register is None:  # a Connect client older than Spark 4: no progress messages to show
                self._enabled = False
                return self
            self._handler = self._on_connect_progress
            register(self._handler)
        elif self._enabled:
            self._thread = threading.Thread(target=self._run, name="spark-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._handler is not None:
            try:
                self._spark.removeProgressHandler(self._handler)
            except Exception:  # noqa: BLE001 - the session is gone; so are its handlers
                pass
            self._handler = None
        self._close_bar()

    def _on_connect_progress(self, stages: Any = None, inflight_tasks: int = 0, operation_id: Any = None,
                             done: bool = False, **_: Any) -> None:
        """Spark Connect's progress handler: called with the stages of one running query."""
        with self._lock:
            if self._bar is None:
                return
            for stage in stages or ():
                total = int(stage.num_tasks)
                self._stages[(operation_id, stage.stage_id)] = [
                    total, total if (stage.done or done) else int(stage.num_completed_tasks)]
            self._refresh()

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
        if self._sc is None:  # Connect: the handler is fed by the server
            return
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
