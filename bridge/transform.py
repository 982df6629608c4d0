"""The transform stage: a user function over whole batches, in worker processes, results in order.

Per-sample work (decoding a JPEG, tokenizing, augmenting) costs more than reading the batch, so it
runs in parallel: ``transform_workers`` forked processes, persistent across epochs. Batch *k* of a
pass goes to worker ``k % N`` and results come back in the loader's order, so the order, resume
and DDP behave exactly as without a transform. Fork, not spawn: a transform defined in a notebook
cell, a script's ``__main__``, ``python -c``, a lambda or a closure is inherited, never pickled
(torch's ``DataLoader`` forks its workers on Linux for the same reason).

Tensors travel through ``torch.multiprocessing`` queues (shared memory, not pickled bytes).
A failure is never a hang: an exception in the function comes back as a :class:`TransformError`
naming the epoch and batch (the original exception, with its worker traceback, is the
``__cause__``), and a worker that dies (a signal, ``os._exit``) is named with its exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional

from sparkbridge.errors import TransformError

__all__ = ["TransformError", "TransformStage", "apply_inline"]

logger = logging.getLogger(__name__)

_STOP = None
_POLL_SECONDS = 0.5  # how often a wait for a result checks that its worker is still alive


class _RemoteTraceback(Exception):
    """The worker's traceback, as text, chained under the original exception (as
    :mod:`concurrent.futures` does), so the user sees where in their function it failed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _describe(epoch: int, index: int) -> str:
    return f"epoch {epoch}, batch {index}"


def _failure(where: str, exc: BaseException) -> TransformError:
    """Raised ``from exc`` by the callers: the user's exception is the cause."""
    return TransformError(f"the transform failed on {where}: {type(exc).__name__}: {exc}")


def apply_inline(fn: Callable[[Any], Any], batches: Iterable[Any], *, epoch: int) -> Iterator[Any]:
    """``transform_workers=0``: the function runs in the loader's process, batch by batch."""
    for k, batch in enumerate(batches):
        try:
            out = fn(batch)
        except Exception as exc:
            raise _failure(_describe(epoch, k), exc) from exc
        yield out


def _worker(fn: Callable[[Any], Any], inbox: Any, outbox: Any) -> None:
    # Ctrl-C is the training process's to handle: a worker ends when told or when its parent goes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)  # N workers on N cores: one intra-op thread each
    while True:
        item = inbox.get()
        if item is _STOP:
            return
        gen, k, batch = item
        try:
            outbox.put((gen, k, True, fn(batch)))
        except Exception as exc:  # the function's own failure, sent back to be raised in order
            tb = traceback.format_exc()
            try:
                outbox.put((gen, k, False, (exc, tb)))
            except Exception:  # the exception itself does not pickle: send what it said
                outbox.put((gen, k, False, (RuntimeError(f"{type(exc).__name__}: {exc}"), tb)))


class TransformStage:
    """``transform_workers`` persistent forked processes running one function over batches.

    :meth:`map` runs one pass; a pass left unfinished (the loop broke out) is superseded by the
    next one: results of the old pass still in flight are discarded by their generation number."""

    def __init__(self, fn: Callable[[Any], Any], *, workers: int, inflight_per_worker: int = 2) -> None:
        if workers < 1:
            raise ValueError("TransformStage needs at least one worker (transform_workers=0 runs inline)")
        self.fn = fn
        self.workers = workers
        self.inflight = max(1, inflight_per_worker) * workers
        self._procs: list = []
        self._inboxes: list = []
        self._outboxes: list = []
        self._gen = 0
        self._pending: list[int] = []  # per worker: items of older passes still to come back

    def start(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("fork")
        for w in range(self.workers):
            # the inbox has a feeder thread, so handing a batch over never blocks this process
            # (with two blocking pipes, a worker waiting to return a large result while this
            # process waits to hand it the next large batch would deadlock)
            inbox, outbox = ctx.Queue(), ctx.SimpleQueue()
            inbox.cancel_join_thread()
            p = ctx.Process(target=_worker, args=(self.fn, inbox, outbox), name=f"sparkbridge-transform-{w}",
                            daemon=True)
            p.start()
            self._procs.append(p)
            self._inboxes.append(inbox)
            self._outboxes.append(outbox)
        self._pending = [0] * self.workers
        logger.debug("transform stage: %d worker processes forked", self.workers)

    def _receive(self, w: int, where: Callable[[], str]) -> tuple:
        from multiprocessing.connection import wait

        outbox, proc = self._outboxes[w], self._procs[w]
        while True:
            ready = wait([outbox._reader, proc.sentinel], timeout=_POLL_SECONDS)
            if outbox._reader in ready or not outbox.empty():
                try:
                    return outbox.get()
                except (OSError, EOFError):
                    # a result's tensors are fetched from the worker that sent them (torch shares
                    # their file descriptors through it): it died between sending and our read
                    raise self._died(w, proc, where) from None
            if proc.sentinel in ready or not proc.is_alive():
                raise self._died(w, proc, where)

    def _died(self, w: int, proc: Any, where: Callable[[], str]) -> TransformError:
        # its sentinel fires when its pipes close, a moment before the exit status can be read
        proc.join(timeout=5.0)
        code = proc.exitcode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with status {code}" if code is not None else "stopped answering")
        self.close()
        return TransformError(f"transform worker {w} (pid {proc.pid}) {how} while on {where()}; "
                              "the pass cannot continue (a worker killed for memory shows as SIGKILL)")

    def map(self, batches: Iterable[Any], *, epoch: int) -> Iterator[Any]:
        if not self._procs:
            self.start()
        self._gen += 1
        gen = self._gen
        sent: deque[int] = deque()
        source = iter(batches)
        done = False
        k_next = 0
        while True:
            while not done and len(sent) < self.inflight:
                try:
                    batch = next(source)
                except StopIteration:
                    done = True
                    break
                w = k_next % self.workers
                self._inboxes[w].put((gen, k_next, batch))
                sent.append(k_next)
                k_next += 1
            if not sent:
                return
            k = sent.popleft()
            w = k % self.workers
            while True:
                got_gen, got_k, ok, value = self._receive(w, lambda: _describe(epoch, k))
                if got_gen == gen:
                    break
                # a result of a pass left unfinished: its worker is done with it, drop it
            if got_k != k:  # pragma: no cover - FIFO per worker makes this impossible
                raise TransformError(f"transform worker {w} returned batch {got_k} when batch {k} was due")
            if not ok:
                exc, tb = value
                exc.__cause__ = _RemoteTraceback(tb)
                raise _failure(_describe(epoch, k), exc) from exc
            yield value

    def close(self) -> None:
        """Stop the workers (told first, then terminated if they do not stop within a second)."""
        procs, self._procs = self._procs, []
        for inbox in self._inboxes:
            try:
                inbox.put(_STOP)
            except (OSError, ValueError):
                pass
        for p in procs:
            p.join(timeout=1.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=1.0)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        for q in self._inboxes + self._outboxes:
            try:
                q.close()
            except (OSError, ValueError, AttributeError):
                pass
        self._inboxes, self._outboxes = [], []
