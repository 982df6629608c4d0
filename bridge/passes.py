"""Which pass (epoch, starting sample, sample order) the dataset reads next: the state the loader
and its dataset share, explicitly, instead of attributes set on the dataset from outside.

With ``num_workers=0`` the loader hands the pass over in-process (:meth:`PassBoard.set`). With
persistent DataLoader workers it publishes the pass into shared int tensors made before the
workers fork (:meth:`PassBoard.share`, :meth:`PassBoard.publish`); each worker reads it when its
``__iter__`` starts (:meth:`PassBoard.sync`), so every process computes the same partition
without cross-process barriers. The board also holds the shared batch slots: a worker gathers a
batch straight into one and sends only its number, instead of a new shared-memory segment per
batch.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from sparkbridge.bridge.order import GlobalOrder
from sparkbridge.bridge.torch_compat import worker_id

__all__ = ["PassBoard"]

_ORDER_FIELDS = 3  # num_canonical_nodes, shuffle_block_size, initial_physical_nodes
_LAZY = -1  # in the shape's first field: the pass is a GlobalOrder, its fields from _LAZY_AT on
_LAZY_AT = 16


class PassBoard:
    def __init__(self) -> None:
        self.epoch = 0
        self.start = 0
        self._work: Optional[tuple[tuple, np.ndarray]] = None
        self.control: Any = None  # int64 tensor: epoch, start, work shape (5), order settings (3), lazy order
        self.work_shared: Any = None  # int32 tensor holding the pass's sample ids
        self.slots: Any = None  # uint8 tensor (workers, slots, bytes)
        self._slot_next = 0
        self.last_slot: Optional[tuple[int, int]] = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_work"] = None  # workers read the pass from the shared control block
        return state

    # ------------------------------------------------------------------ in-process

    def set(self, epoch: int, start: int, workers: int, work: np.ndarray) -> None:
        self.epoch, self.start = int(epoch), int(start)
        self._work = ((self.epoch, self.start, int(workers)), work)

    def work_for(self, epoch: int, start: int, workers: int) -> Optional[np.ndarray]:
        """The whole world's sample ids of this pass, if they were handed over."""
        if self._work is not None and self._work[0] == (epoch, start, workers):
            return self._work[1]
        return None

    # ------------------------------------------------------------------ across processes

    @property
    def shared(self) -> bool:
        return self.control is not None

    def capacity(self) -> int:
        return 0 if self.work_shared is None else int(self.work_shared.numel())

    def share(self, *, capacity: int, workers: int, slots: int, slot_bytes: int, max_slot_bytes: int) -> bool:
        """Make the shared blocks (call before the workers fork). Returns whether batch slots
        were made (not when they would exceed ``max_slot_bytes`` in all)."""
        import torch

        self.control = torch.zeros(_LAZY_AT + GlobalOrder.INTS, dtype=torch.int64).share_memory_()
        self.work_shared = torch.empty(max(1, capacity), dtype=torch.int32).share_memory_()
        if workers * slots * slot_bytes <= max_slot_bytes:
            self.slots = torch.empty((workers, slots, slot_bytes), dtype=torch.uint8).share_memory_()
        else:
            self.slots = None
        return self.slots is not None

    def publish(self, epoch: int, start: int, work: Union[np.ndarray, GlobalOrder], order: tuple) -> None:
        import torch

        if isinstance(work, GlobalOrder):  # a few ints: each worker computes its batches itself
            ctl = [epoch, start, _LAZY, 0, 0, 0, 0, *(-1 if v is None else int(v) for v in order)]
            ctl += [0] * (_LAZY_AT - len(ctl)) + work.to_ints()
            self.control[:len(ctl)] = torch.tensor(ctl, dtype=torch.int64)
            self.epoch, self.start = int(epoch), int(start)
            return
        flat = work.reshape(-1)
        self.work_shared[:flat.size].copy_(torch.from_numpy(flat.astype(np.int32, copy=False)))
        ctl = [epoch, start, *work.shape, *(-1 if v is None else int(v) for v in order)]
        self.control[:len(ctl)] = torch.tensor(ctl, dtype=torch.int64)
        self.epoch, self.start = int(epoch), int(start)

    def sync(self) -> Optional[tuple]:
        """In a worker: take the published pass; returns the order settings to apply, or None
        when nothing is shared (in-process passes)."""
        if self.control is None:
            return None
        ctl = self.control.tolist()
        epoch, start, shape = ctl[0], ctl[1], tuple(ctl[2:7])
        order = tuple(None if v < 0 else v for v in ctl[7:7 + _ORDER_FIELDS])
        if shape[0] == _LAZY:
            lazy = GlobalOrder.from_ints(ctl[_LAZY_AT:])
            self.set(epoch, start, lazy.workers, lazy)
            return order
        size = int(np.prod(shape))
        work = self.work_shared[:size].numpy().reshape(shape)
        self.set(epoch, start, shape[2], work)
        return order

    def drop_shared(self) -> None:
        self.control = self.work_shared = self.slots = None

    # ------------------------------------------------------------------ batch buffers

    def alloc(self, nbytes: int) -> np.ndarray:
        """A buffer for one packed batch: a shared slot inside a worker when one fits."""
        self.last_slot = None
        if self.slots is not None and nbytes <= self.slots.shape[2]:
            w = worker_id()
            if w >= 0:
                k = self._slot_next % self.slots.shape[1]
                self._slot_next += 1
                self.last_slot = (w, k)
                return self.slots[w, k, :nbytes].numpy()
        return np.empty(nbytes, dtype=np.uint8)
