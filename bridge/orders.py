"""Mosaic's epoch orders computed in a forked helper process, off the training loop's GIL.

Why: the loader computes the next epoch's order while the current one is read. In a thread, that
computation (numpy calls that each drop and retake the GIL) and the batch loop hand the GIL back
and forth, and each retake can wait a whole switch interval (5 ms): measured on 2 cores, a batch
took 91-119 us with the next order computing in a thread against 80-85 us without, at 1M rows;
130-140 us against 85 us at 100k rows, where the order runs through the whole epoch. In a
process the order takes the other core and the loop keeps the GIL.

It also computes a global order's ids a chunk ahead (:meth:`OrderProcess.compute_ids`, for
:mod:`sparkbridge.bridge.order_ahead`), returned through shared memory: in a thread, the ~1,000
numpy calls of a 1M-position chunk each handed the GIL back and forth with the batch loop (~300
waits of the loop an epoch, +10-20 ms of its CPU at 1M rows: 0.86-0.92x Mosaic's py1e on a quiet
machine, 1.03-1.08x from here; bench/results/order.md, where "quiet" needed ``chrt``).

The loader forks the helper when none of its threads has work (once the first epoch has loaded
every shard; see ``StreamingLoader._start_orders``), so it inherits the dataset as it is (no
imports, no pickling; ready at once), and it only ever runs numpy and Mosaic's order code. Each
request carries every setting that may change after the fork (``load_state_dict`` sets the
order's ``num_canonical_nodes``, ``shuffle_block_size`` and ``initial_physical_nodes``), so a
helper never computes from a stale copy. The helper exits when told to by ``close()``, and when
its pipe closes as the loader's process dies; it closes the sockets it inherited. If it dies or cannot be started,
the order is computed in a thread, as before, and a warning says why. A daemonic process (a
``multiprocessing.Pool`` or DataLoader worker) may not have children: there the thread is used
from the start.

Python 3.12+ warns (DeprecationWarning) on every ``fork()`` of a process with threads, because a
lock some thread holds stays locked in the child. The fork here is deliberate and that warning is
silenced for it alone: the loader forks only when none of its threads has work, the child never
takes a lock of the parent's (no logging, no imports it has not done, no allocation through a
thread's arena it could find locked: numpy and Mosaic's order code only, with ``gc`` off), and a
child that dies anyway is replaced by a thread (``OrderProcessDied``).
"""

from __future__ import annotations

import gc
import logging
import mmap
import multiprocessing
import os
import pickle
import signal
import stat
import sys
import threading
import warnings
from typing import Any, Optional

import numpy as np

from sparkbridge.bridge.order import GlobalOrder
from sparkbridge.bridge import order_ahead
from sparkbridge.bridge.order_ahead import chunk_ids
from sparkbridge.bridge.resident import unmap_other_tables

__all__ = ["OrderProcess", "OrderProcessDied"]

logger = logging.getLogger(__name__)

_JOIN_S = 5.0


class OrderProcessDied(RuntimeError):
    """The helper is gone (killed, out of memory): compute the order in this process."""


def _close_inherited_sockets(*, keep: int) -> None:
    """Close every socket inherited from the loader's process but ``keep``: a socket the parent
    closes (a DDP peer's, Spark's py4j gateway, a notebook kernel's, another loader's order pipe)
    must not stay open here, or its peer never sees it close. Pipes stay: multiprocessing's own
    (which tell the parent when this process exits) are pipes."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:  # the listing's own descriptor, gone by now
            continue


def _serve_ids(request: tuple, conn: Any, slot: mmap.mmap) -> None:
    """A global order's chunk of ids (see :meth:`OrderProcess.compute_ids`): into ``slot`` when
    they fit, else through the pipe; the batch lengths through the pipe."""
    _, ints, rank, g0, g1 = request
    try:
        ids, lengths = chunk_ids(GlobalOrder.from_ints(ints), rank, g0, g1)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
    except Exception as exc:  # every failure goes back to the loader
        try:
            conn.send(("error", exc))
        except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    fits = ids.nbytes <= len(slot)
    if fits:
        np.frombuffer(slot, dtype=np.int64, count=len(ids))[:] = ids
    conn.send(("slot" if fits else "pipe", len(ids), len(lengths)))
    if not fits:
        conn.send_bytes(memoryview(ids).cast("B"))
    conn.send_bytes(memoryview(np.ascontiguousarray(lengths, dtype=np.int64)).cast("B"))


def _serve(dataset: Any, conn: Any, parent_end: Any, slot: mmap.mmap) -> None:
    """The helper's loop: one request, one answer, until the pipe closes."""
    parent_end.close()  # else the pipe never reports the parent's end closed
    _close_inherited_sockets(keep=conn.fileno())
    # other loaders' row tables: this process never reads them, and must not keep them alive
    unmap_other_tables(keep=getattr(dataset, "_resident", None))
    gc.disable()  # a collection would touch (and copy) every page of the parent's heap
    # Ctrl-C reaches the whole process group: the loader's process handles it and closes the
    # pipe (or exits), and this process follows without a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:  # close(): processes forked later may hold the pipe too, so no EOF
            return
        if request[0] == "ids":
            try:
                _serve_ids(request, conn, slot)
            except OSError:  # the loader closed the pipe meanwhile
                return
            continue
        epoch, start, workers, settings = request
        try:
            dataset.num_canonical_nodes, dataset.shuffle_block_size, dataset.initial_physical_nodes = settings
            work = np.ascontiguousarray(dataset.compute_work(epoch, start, workers))
            reply: tuple = ("ok", work.dtype.str, work.shape)
        except Exception as exc:  # every failure goes back to the loader
            work, reply = None, ("error", exc)
        try:
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
                conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
            if work is not None:
                conn.send_bytes(memoryview(work).cast("B"))
        except OSError:  # the loader closed the pipe meanwhile (close() during a computation)
            return


class OrderProcess:
    """A forked helper computing ``dataset.compute_work`` (see the module doc)."""

    def __init__(self, dataset: Any, process: Any, conn: Any, slot: mmap.mmap) -> None:
        self.dataset = dataset
        self._process = process
        self._conn = conn
        self._slot = slot
        self._lock = threading.Lock()

    @classmethod
    def start(cls, dataset: Any) -> Optional["OrderProcess"]:
        """A started helper for ``dataset``, or None off Linux (fork is unavailable, or unsafe
        with macOS's system libraries): then the caller computes orders in a thread."""
        if not sys.platform.startswith("linux"):
            return None
        if multiprocessing.current_process().daemon:
            # a multiprocessing.Pool or DataLoader worker may not have children (Python asserts it)
            logger.info("this process is daemonic (a Pool or DataLoader worker) and may not start the epoch-order "
                        "process; computing orders in a thread")
            return None
        ctx = multiprocessing.get_context("fork")
        conn, child_end = ctx.Pipe(duplex=True)
        # a global order's chunks come back through shared memory (pages committed only once written:
        # nothing for Mosaic's orders): reading 8 MB off the pipe took ~130 reads, each retaking the GIL
        slot = mmap.mmap(-1, order_ahead.CHUNK_POSITIONS * 8)
        process = ctx.Process(target=_serve, args=(dataset, child_end, conn, slot), daemon=True,
                              name="sparkbridge-epoch-order")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*multi-threaded, use of fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                process.start()
        except (OSError, AssertionError) as exc:  # AssertionError: multiprocessing's own refusals
            logger.warning("could not start the epoch-order process (%s); computing orders in a thread", exc)
            conn.close()
            child_end.close()
            slot.close()
            return None
        child_end.close()
        return cls(dataset, process, conn, slot)

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    def compute(self, epoch: int, start: int, workers: int, settings: tuple) -> np.ndarray:
        """The helper's ``compute_work(epoch, start, workers)`` under the order ``settings``
        (``dataset.order_settings()``). Raises what the computation raised, or
        :class:`OrderProcessDied`."""
        with self._lock:
            try:
                self._conn.send((int(epoch), int(start), int(workers), tuple(settings)))
                reply = self._conn.recv()
                data = self._conn.recv_bytes() if reply[0] == "ok" else None
            except (EOFError, OSError) as exc:
                raise OrderProcessDied(f"the epoch-order process (pid {self.pid}) is gone: "
                                       f"{type(exc).__name__}: {exc}") from None
        if data is None:
            raise reply[1]  # the computation's own error (whatever its type)
        _, dtype, shape = reply
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)

    def compute_ids(self, order: Any, rank: int, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids of rank ``rank``'s batches ``g0 .. g1 - 1`` of the global ``order`` and their
        lengths, as :func:`sparkbridge.bridge.order_ahead.chunk_ids` gives them, computed by the
        helper. Why there: in a thread of this process the ~1,000 numpy calls a chunk takes each
        retake the GIL, and the batch loop waited on it (on 2 loaded cores, 135 ms an epoch at 1M
        rows against 90 ms with the ids ready). Raises what the computation raised, or
        :class:`OrderProcessDied`."""
        with self._lock:
            try:
                self._conn.send(("ids", order.to_ints(), int(rank), int(g0), int(g1)))
                reply = self._conn.recv()
                ids = lengths = None
                if reply[0] != "error":
                    if reply[0] == "slot":  # copied out before the next request overwrites it
                        ids = np.frombuffer(self._slot, dtype=np.int64, count=reply[1]).copy()
                    else:
                        ids = np.frombuffer(self._conn.recv_bytes(), dtype=np.int64)
                    lengths = np.frombuffer(self._conn.recv_bytes(), dtype=np.int64)
            except (EOFError, OSError) as exc:
                raise OrderProcessDied(f"the epoch-order process (pid {self.pid}) is gone: "
                                       f"{type(exc).__name__}: {exc}") from None
        if ids is None:
            raise reply[1]  # the computation's own error (whatever its type)
        return ids, lengths

    def close(self) -> None:
        """Tell the helper to exit, close the pipe and reap the process. (EOF alone would not
        do: a process forked later, a DataLoader worker, holds a copy of this end of the pipe.)"""
        if self._lock.acquire(timeout=0.05):  # else a request is in flight: terminate below
            try:
                self._conn.send(None)
            except OSError:
                pass
            finally:
                self._lock.release()
        try:
            self._conn.close()
        except OSError:
            pass
        self._process.join(_JOIN_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(_JOIN_S)
        try:
            self._slot.close()
        except BufferError:  # a copy out of it is under way in another thread: left to the collector
            pass
