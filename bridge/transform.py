"""The transform stage: a user function over whole batches, in worker processes, results in order.

Per-sample work (decoding a JPEG, tokenizing, augmenting) costs more than reading the batch, so it
runs in parallel: ``transform_workers`` forked processes, persistent across epochs. Batch *k* of a
pass goes to worker ``k % N`` and results come back in the loader's order, so the order, resume
and DDP behave exactly as without a transform. Fork, not spawn: a transform defined in a notebook
cell, a script's ``__main__``, ``python -c``, a lambda or a closure is inherited, never pickled
(torch's ``DataLoader`` forks its workers on Linux for the same reason).

A batch reaches a worker as its arrays in a reused shared-memory slot and a small pickle, and the
result comes back the same way (:mod:`sparkbridge.bridge.handoff`): ``bytes`` / ``str`` columns are
a :class:`sparkbridge.bridge.varwidth.VarColumn` (a values buffer and offsets; items are ``bytes``
/ ``str``), ragged ``ndarray`` columns a :class:`sparkbridge.bridge.varwidth.Ragged`, so no
Python object per row is pickled on the way.
A failure is never a hang: an exception in the function comes back as a :class:`TransformError`
naming the epoch, the batch and its first sample ids (the original exception, with its worker
traceback, is the ``__cause__``), and a worker that dies (a signal, ``os._exit``) is named with
its exit status.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import traceback
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from sparkbridge.bridge.handoff import SlotRing
from sparkbridge.errors import TransformError

__all__ = ["TransformError", "TransformStage", "apply_inline", "transform_inputs"]

logger = logging.getLogger(__name__)

_STOP = None
_POLL_SECONDS = 0.5  # how often a wait for a result checks that its worker is still alive
_SLOT_BYTES = 64 << 20  # per slot, virtual: a page costs memory once a batch has written it
_SHOWN_IDS = 5


class _RemoteTraceback(Exception):
    """The worker's traceback, as text, chained under the original exception (as
    :mod:`concurrent.futures` does), so the user sees where in their function it failed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _describe(epoch: int, index: int, ids: Optional[np.ndarray] = None) -> str:
    where = f"epoch {epoch}, batch {index}"
    if ids is not None and len(ids):
        shown = ", ".join(str(int(i)) for i in ids[:_SHOWN_IDS])
        more = f", ... ({len(ids)} samples)" if len(ids) > _SHOWN_IDS else ""
        where += f" (sample ids {shown}{more})"
    return where


def transform_inputs(packed: Iterable[Any], plan: Any) -> Iterator[tuple[Optional[np.ndarray], Any]]:
    """(sample ids, the batch as the transform receives it) for each packed batch: tensors, and
    variable-width columns as values + offsets (``VarColumn`` / ``Ragged``), not lists."""
    for batch in packed:
        yield getattr(batch, "ids", None), plan.to_tensors(batch, lists=False)


def _failure(where: str, exc: BaseException) -> TransformError:
    """Raised ``from exc`` by the callers: the user's exception is the cause."""
    return TransformError(f"the transform failed on {where}: {type(exc).__name__}: {exc}")


def apply_inline(fn: Callable[[Any], Any], batches: Iterable[tuple[Optional[np.ndarray], Any]], *,
                 epoch: int) -> Iterator[Any]:
    """``transform_workers=0``: the function runs in the loader's process, batch by batch
    (``batches``: (sample ids or None, batch) pairs, see :func:`transform_inputs`)."""
    for k, (ids, batch) in enumerate(batches):
        try:
            out = fn(batch)
        except Exception as exc:
            raise _failure(_describe(epoch, k, ids), exc) from exc
        yield out


def _worker(fn: Callable[[Any], Any], inbox: Any, outbox: Any, in_ring: SlotRing, out_ring: SlotRing) -> None:
    # Ctrl-C is the training process's to handle: a worker ends when told or when its parent goes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)  # N workers on N cores: one intra-op thread each
    while True:
        item = inbox.get()
        if item is _STOP:
            return
        gen, k, message = item
        try:
            result = fn(in_ring.loads(message))
            reply = (gen, k, True, out_ring.dumps(result))
        except Exception as exc:  # the function's own failure (or its result's), raised in order
            tb = traceback.format_exc()
            try:
                reply = (gen, k, False, pickle.dumps((exc, tb)))
            except Exception:  # the exception itself does not pickle: send what it said
                reply = (gen, k, False, pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), tb)))
        outbox.put(reply)


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
        self.inflight_per_worker = max(1, inflight_per_worker)
        self._procs: list = []
        self._inboxes: list = []
        self._outboxes: list = []
        self._in_rings: list[SlotRing] = []
        self._out_rings: list[SlotRing] = []
        self._gen = 0
        self._pending: list[int] = []  # per worker: items sent whose result was not read yet

    def start(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("fork")
        for w in range(self.workers):
            # the inbox has a feeder thread, so handing a batch over never blocks this process
            # (with two blocking pipes, a worker waiting to return a large result while this
            # process waits to hand it the next large batch would deadlock)
            inbox, outbox = ctx.Queue(), ctx.SimpleQueue()
            inbox.cancel_join_thread()
            # a slot is reused only after its message was read: at most inflight_per_worker
            # messages are unread per direction (map() drains an abandoned pass first)
            rings = [SlotRing(slots=self.inflight_per_worker + 1, slot_bytes=_SLOT_BYTES) for _ in range(2)]
            p = ctx.Process(target=_worker, args=(self.fn, inbox, outbox, *rings),
                            name=f"sparkbridge-transform-{w}", daemon=True)
            p.start()
            self._procs.append(p)
            self._inboxes.append(inbox)
            self._outboxes.append(outbox)
            self._in_rings.append(rings[0])
            self._out_rings.append(rings[1])
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

    def _drain(self) -> None:
        """Read (and drop) the results of a pass left unfinished, so their slots are free."""
        for w in range(len(self._procs)):
            while self._pending[w] > 0:
                self._receive(w, lambda: "a batch of an unfinished earlier pass")
                self._pending[w] -= 1

    def map(self, batches: Iterable[tuple[Optional[np.ndarray], Any]], *, epoch: int) -> Iterator[Any]:
        """Results of ``fn`` over ``batches`` ((sample ids or None, batch) pairs), in order."""
        if not self._procs:
            self.start()
        self._drain()
        self._gen += 1
        gen = self._gen
        sent: deque[tuple[int, Optional[np.ndarray]]] = deque()
        source = iter(batches)
        done = False
        k_next = 0
        while True:
            while not done and len(sent) < self.inflight:
                try:
                    ids, batch = next(source)
                except StopIteration:
                    done = True
                    break
                w = k_next % self.workers
                self._inboxes[w].put((gen, k_next, self._in_rings[w].dumps(batch)))
                self._pending[w] += 1
                sent.append((k_next, ids))
                k_next += 1
            if not sent:
                return
            k, ids = sent.popleft()
            w = k % self.workers
            got_gen, got_k, ok, value = self._receive(w, lambda: _describe(epoch, k, ids))
            self._pending[w] -= 1
            if got_gen != gen or got_k != k:  # pragma: no cover - drained passes and FIFO workers
                raise TransformError(f"transform worker {w} returned batch {got_k} of pass {got_gen} when "
                                     f"batch {k} of pass {gen} was due")
            if not ok:
                exc, tb = pickle.loads(value)
                exc.__cause__ = _RemoteTraceback(tb)
                raise _failure(_describe(epoch, k, ids), exc) from exc
            yield self._out_rings[w].loads(value)

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
        for ring in self._in_rings + self._out_rings:
            ring.close()
        self._in_rings, self._out_rings = [], []
