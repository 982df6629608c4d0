"""One failed rank ends every rank of a torchrun job, and each rank names the error.

Why: a collective (DDP's gradient all-reduce, a barrier) waits for every rank. A rank that raised
and then waits in a barrier of its own meets another rank's all-reduce, and both sit until the
process group's timeout (30 minutes with gloo), printing nothing. So a failing rank never enters
another collective: it posts its one-line error to the process group's store (first failure wins:
it is the cause, later ones are its consequences) and exits. The other ranks learn of it within
seconds, in one of two ways: their pending collective fails once the failed rank's connections
close, or torchrun, seeing a worker end, sends them SIGTERM. Either way :meth:`RankGuard.explain`
reads the posted line and raises :class:`sparkbridge.errors.RankFailedError` naming the rank that
failed and its error.
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading
from typing import Any, Callable, Optional

from sparkbridge.errors import RankFailedError

__all__ = ["RankGuard", "Terminated", "FAILURE_KEY"]

log = logging.getLogger(__name__)

#: Store key holding ``"<rank>\\t<one-line error>"`` of the first rank that failed.
FAILURE_KEY = "sparkbridge/failed"
#: How long a rank whose collective broke waits for the failed rank's line to appear.
_WAIT_FOR_CAUSE_S = 3.0


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops every rank once one has ended). A BaseException, so no
    ``except Exception`` in a library on the way swallows it."""


class RankGuard:
    """Installed around a distributed job's body on every rank (``with RankGuard(...) as guard``).

    ``message`` turns an exception into the one line the CLI prints
    (:func:`sparkbridge.jobs.cli.error_line`'s first item).
    """

    def __init__(self, *, rank: int, store: Any, message: Callable[[BaseException], str]) -> None:
        self.rank = rank
        self.store = store
        self.message = message
        self._previous: Optional[Any] = None

    def __enter__(self) -> "RankGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    def explain(self, exc: BaseException) -> BaseException:
        """The error this rank ends with: another rank's failure when ``exc`` is its consequence
        (a broken collective, torchrun's SIGTERM), else ``exc`` itself, posted for the others."""
        consequence = isinstance(exc, Terminated) or _is_communication_error(exc)
        cause = self._posted(wait=consequence)
        if cause is not None and cause[0] != self.rank and consequence:
            return RankFailedError(f"rank {cause[0]} failed: {cause[1]}")
        if isinstance(exc, Terminated):
            line = ("stopped by SIGTERM (torchrun stops every rank once one has ended: see the other ranks' "
                    "errors)")
            self._post(line)
            return RankFailedError(f"rank {self.rank} {line}")
        if consequence:
            line = (f"lost contact with another rank ({self.message(exc)}); it ended without an error of its "
                    "own: killed, or out of memory?")
            self._post(line)
            return RankFailedError(f"rank {self.rank} {line}")
        self._post(self.message(exc))
        return exc

    def _post(self, line: str) -> None:
        try:
            self.store.compare_set(FAILURE_KEY, "", f"{self.rank}\t{line}")
        except Exception as err:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            log.debug("could not post this rank's failure to the store: %s", err)

    def _posted(self, *, wait: bool) -> Optional[tuple[int, str]]:
        try:
            if wait:
                self.store.wait([FAILURE_KEY], datetime.timedelta(seconds=_WAIT_FOR_CAUSE_S))
            elif not self.store.check([FAILURE_KEY]):
                return None
            rank, _, line = self.store.get(FAILURE_KEY).decode("utf-8", "replace").partition("\t")
            return int(rank), line
        except Exception:  # noqa: BLE001 - nothing posted in time, or the store is gone
            return None


def _is_communication_error(exc: BaseException) -> bool:
    """A collective that broke because a peer went away (gloo: "Connection closed by peer", NCCL:
    a timeout or an abort), as opposed to an error of this rank's own."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - a torch without DistError
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL",
                                      "Broken pipe"))


def default_store() -> Any:
    """The initialized process group's store (torchrun's agent store), or ``None``."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private accessor: without it, failures are not shared
        return None
