"""The training loop that ``sparkbridge demo`` and ``sparkbridge train`` share.

It owns what both need and what is easy to get subtly wrong: epochs that resume where the loader
stands, ``max_steps`` counted in *this* run, the time spent waiting for the next batch measured
apart from the step itself (so a slow data path shows up as such), one progress bar per epoch, and
a per-step history for metrics and plots. What a step does (model, loss, optimizer) is the
caller's ``step_fn``; checkpoints and metrics hook in through ``on_step``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["StepRecord", "FitResult", "fit"]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the loop saw it."""

    step: int  # global step (restored steps included)
    epoch: int  # 0-based
    loss: float
    rows: int
    seconds: float  # wait for the batch + the step itself
    wait_seconds: float  # of which waiting for the batch


@dataclass
class FitResult:
    rows: int = 0
    steps: int = 0  # steps in this run
    seconds: float = 0.0
    wait_seconds: float = 0.0
    last_step: int = 0  # global step after this run
    stopped: bool = False  # max_steps reached before the last epoch ended
    first_batch_seconds: Optional[float] = None  # from the start of fit() to the first batch
    history: dict[str, list[float]] = field(default_factory=lambda: {
        "step": [], "loss": [], "rows": [], "seconds": [], "wait": [], "epoch": []})

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        """Share of the wall time spent waiting for data (0..1)."""
        return self.wait_seconds / self.seconds if self.seconds > 0 else 0.0

    def final_loss(self, last: int = 50) -> float:
        """Mean loss over the last ``last`` steps of this run."""
        tail = self.history["loss"][-last:]
        return sum(tail) / len(tail) if tail else float("nan")


def fit(
    loader: Any,
    step_fn: Callable[[Any, int], tuple[float, int]],
    *,
    epochs: int,
    start_step: int = 0,
    max_steps: Optional[int] = None,
    on_step: Optional[Callable[[StepRecord], None]] = None,
    on_epoch_end: Optional[Callable[[int, FitResult], None]] = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train from the loader's current epoch up to ``epochs``; ``step_fn(batch, epoch)`` runs one
    step and returns ``(loss, rows)``. Stops after ``max_steps`` steps of this run, if given."""
    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    result = FitResult(last_step=start_step)
    hist = result.history
    start = time.perf_counter()
    for epoch in range(loader.epoch, epochs):
        if result.stopped:
            break
        bar = tqdm(total=_length(loader), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        it = iter(loader)
        recent: list[float] = []
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            if result.first_batch_seconds is None:
                result.first_batch_seconds = t1 - start
            loss, rows = step_fn(batch, epoch)
            t2 = time.perf_counter()
            result.steps += 1
            result.last_step += 1
            result.rows += rows
            result.wait_seconds += t1 - t0
            for key, value in (("step", result.last_step), ("loss", loss), ("rows", rows), ("seconds", t2 - t0),
                               ("wait", t1 - t0), ("epoch", epoch + 1)):
                hist[key].append(value)
            recent = (recent + [loss])[-50:]
            bar.update(1)
            if result.steps % 20 == 0:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if on_step is not None:
                on_step(StepRecord(result.last_step, epoch, loss, rows, t2 - t0, t1 - t0))
            if max_steps is not None and result.steps >= max_steps:
                result.stopped = True
                break
        bar.close()
        if on_epoch_end is not None and not result.stopped:
            on_epoch_end(epoch, result)
    result.seconds = time.perf_counter() - start
    return result


def _length(loader: Any) -> Optional[int]:
    """Batches in the coming epoch, None when unknown (an epoch that follows a running write)."""
    try:
        return len(loader)
    except TypeError:
        return None
