"""How each rank names the error that ended a distributed job (sparkbridge.jobs.rank_failure), over a
real TCPStore: the interleavings the torchrun test in tests/bridge/test_distributed.py does not reach."""

from __future__ import annotations

import datetime

import pytest

from sparkbridge.errors import RankFailedError
from sparkbridge.jobs.cli import error_line
from sparkbridge.jobs.local_cluster import free_ports
from sparkbridge.jobs.rank_failure import RankGuard, Terminated


@pytest.fixture()
def store():
    from torch.distributed import TCPStore

    (port,) = free_ports(1)
    return TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10))


def guard(rank, store):
    return RankGuard(rank=rank, store=store, message=lambda exc: error_line(exc)[0])


def test_the_first_failure_is_the_cause_every_other_rank_names(store):
    own = PermissionError(13, "Permission denied", "/ckpt/c.pt")
    assert guard(1, store).explain(own) is own  # rank 1 fails first: its own error, posted
    later = guard(0, store).explain(ValueError("a later, unrelated error"))
    assert str(later) == "a later, unrelated error"  # an error of its own stays its own
    for rank in (0, 2):  # consequences: a broken collective, torchrun's SIGTERM
        for exc in (RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500"), Terminated()):
            got = guard(rank, store).explain(exc)
            assert isinstance(got, RankFailedError)
            assert str(got) == "rank 1 failed: /ckpt/c.pt: Permission denied"


def test_a_rank_that_died_without_an_error_is_reported_as_such(store):
    got = guard(0, store).explain(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500"))
    assert isinstance(got, RankFailedError)
    assert str(got).startswith("rank 0 lost contact with another rank") and "killed, or out of memory" in str(got)


def test_sigterm_without_a_posted_cause(store):
    got = guard(3, store).explain(Terminated())
    assert str(got).startswith("rank 3 stopped by SIGTERM")


def test_without_a_store_each_rank_keeps_its_own_error():
    own = OSError("disk full")
    assert guard(0, None).explain(own) is own
