"""``follow_shuffle_rows``: a followed epoch that mixes. Each batch is drawn uniformly from the
landed, unread rows only while at least that many of them are there (or once the write has
ended), so a model trained live does not see partitions in landing order. Partitions are
committed through the log API (no Spark) at moments the test chooses; every check is on exact
row ids. Under torchrun the option is one of the randomized cases of test_follow_ddp.py."""

from __future__ import annotations

import json
import threading

import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import UsageError
from tests.bridge.follow_log import PartitionedWrite


class _Landing:
    """Lands the next step of a write once the reader has taken ``after`` batches; ``stage`` is
    raised *before* the commit, so a batch that needed the commit always sees the new stage (and
    a batch seen with the old stage cannot have needed it)."""

    def __init__(self, steps):
        self.steps = steps  # [(batches taken before it, callable that commits)]
        self.stage = 0
        self.taken = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def took(self, n: int = 1) -> None:
        with self.cond:
            self.taken += n
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            for after, land in self.steps:
                with self.cond:
                    if not self.cond.wait_for(lambda: self.taken >= after, timeout=30):
                        raise TimeoutError(f"the reader took {self.taken} batches, not {after}")
                threading.Event().wait(0.3)  # a reader that did not wait would take a batch now
                self.stage += 1
                land()
        except BaseException as exc:
            self.error = exc


def _read(loader, landing: _Landing, *, stop: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(ids per batch, the landing stage each batch was received at)."""
    batches, stages = [], []
    for batch in loader:
        assert (batch["x"].numpy() == batch["id"].numpy() / 4).all()
        batches.append(batch["id"].tolist())
        stages.append(landing.stage)
        landing.took()
        if stop is not None and len(batches) == stop:
            break
    return batches, stages


def _flat(batches) -> list[int]:
    return [i for b in batches for i in b]


def test_each_batch_is_drawn_from_a_pool_of_at_least_follow_shuffle_rows_landed_rows(tmp_path):
    """300 rows landed (3 partitions), follow_shuffle_rows=250, batch 10: six batches (300 down to
    250 unread), then the loader waits for the next partition; 100 more rows allow ten more
    (340 down to 250), then it waits for the write to complete and reads the rest."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    for _ in range(3):
        w.partition(100)
    loader = StreamingLoader(root, batch_size=10, shuffle=True, seed=5, follow=True, follow_poll=0.01,
                             follow_shuffle_rows=250)
    landing = _Landing([(6, lambda: w.partition(100)), (16, w.complete)])
    batches, stages = _read(loader, landing)
    landing.thread.join(timeout=30)
    assert landing.error is None, landing.error
    loader.close()
    assert stages == [0] * 6 + [1] * 10 + [2] * 24
    assert [len(b) for b in batches] == [10] * 40
    ids = _flat(batches)
    assert sorted(ids) == list(range(400))  # every row once
    assert max(_flat(batches[:6])) < 300
    # the first batches mix every landed partition, not the first one
    assert {i // 100 for i in _flat(batches[:6])} == {0, 1, 2}


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_write_that_completes_with_fewer_rows_than_follow_shuffle_rows_is_read_whole(tmp_path, drop_last):
    """74 rows land, follow_shuffle_rows=1000: no batch until the write completes, then every
    landed row is drawn as at the end of any followed epoch (drop_last drops the last 2)."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    w.partition(37)
    w.partition(37)
    loader = StreamingLoader(root, batch_size=8, shuffle=True, seed=1, follow=True, follow_poll=0.01,
                             follow_shuffle_rows=1000, drop_last=drop_last)
    landing = _Landing([(0, w.complete)])
    batches, stages = _read(loader, landing)
    landing.thread.join(timeout=30)
    assert landing.error is None, landing.error
    loader.close()
    assert set(stages) == {1}
    ids = _flat(batches)
    assert len(ids) == len(set(ids))
    if drop_last:
        assert [len(b) for b in batches] == [8] * 9 and set(ids) < set(range(74))
    else:
        assert [len(b) for b in batches] == [8] * 9 + [2] and sorted(ids) == list(range(74))


@pytest.mark.parametrize("saved_at", [1, 4, 9])
def test_a_mixed_followed_epoch_resumes_exactly_with_the_pool_it_was_saved_with(tmp_path, saved_at):
    """120 rows landed, follow_shuffle_rows=50, batch 8: nine batches are possible (120 down to
    56 unread) before the loader must wait. Saved after ``saved_at`` batches and resumed by a
    loader built without follow_shuffle_rows: it keeps the saved pool (it takes batches down to
    50 unread rows, then waits for the write), never reads a row the saved run read, and loses
    none."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    for _ in range(3):
        w.partition(40)
    a = StreamingLoader(root, batch_size=8, shuffle=True, seed=2, follow=True, follow_poll=0.01,
                        follow_shuffle_rows=50)
    idle = _Landing([])
    seen, _ = _read(a, idle, stop=saved_at)
    state = json.loads(json.dumps(a.state_dict()))
    a.close()
    assert state["follow"]["shuffle_rows"] == 50 and state["follow"]["batches"] == saved_at

    b = StreamingLoader(root, batch_size=8, shuffle=True, seed=2, follow=True, follow_poll=0.01)
    b.load_state_dict(state)
    before = 9 - saved_at  # batches the rest of the landed rows allow before the pool is too small
    landing = _Landing([(before, lambda: w.partition(40)), (before + 5, w.complete)])
    rest, stages = _read(b, landing)
    landing.thread.join(timeout=30)
    assert landing.error is None, landing.error
    b.close()
    # 48 unread + 40 landed: five more batches (88 down to 56 unread), the last 48 rows once it completes
    assert stages == [0] * before + [1] * 5 + [2] * (20 - 9 - 5)
    got = _flat(seen) + _flat(rest)
    assert len(_flat(seen)) == 8 * saved_at and not set(_flat(seen)) & set(_flat(rest))
    assert sorted(got) == list(range(160))


@pytest.mark.parametrize("value", [-1, 2.5, True, "1000"])
def test_follow_shuffle_rows_must_be_a_row_count(tmp_path, value):
    with pytest.raises(UsageError, match=r"follow_shuffle_rows must be .*rows.*got"):
        StreamingLoader(str(tmp_path / "none"), batch_size=4, shuffle=True, follow=True,
                        follow_shuffle_rows=value)


def test_follow_shuffle_rows_needs_a_shuffle(tmp_path):
    """Unshuffled, a followed epoch reads its rows in log order: a pool would change nothing."""
    with pytest.raises(UsageError, match=r"follow_shuffle_rows=100 .*shuffle=True"):
        StreamingLoader(str(tmp_path / "none"), batch_size=4, follow=True, follow_shuffle_rows=100)


def test_a_state_saved_right_after_resuming_a_followed_epoch_keeps_its_progress(tmp_path):
    """A job resumes a followed epoch and checkpoints again before its first step (a restart
    loop, a checkpoint on start): that state must still skip the rows the first run read. It used
    to say 0 batches and no adoptions, so the third run read the first run's rows again."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    w.partition(40)
    a = StreamingLoader(root, batch_size=8, shuffle=True, seed=4, follow=True, follow_poll=0.01,
                        follow_shuffle_rows=16)
    seen, _ = _read(a, _Landing([]), stop=2)
    first = json.loads(json.dumps(a.state_dict()))
    a.close()
    b = StreamingLoader(root, batch_size=8, shuffle=True, seed=4, follow=True, follow_poll=0.01)
    b.load_state_dict(first)
    second = json.loads(json.dumps(b.state_dict()))  # no batch taken in between
    b.close()
    assert second["follow"] == first["follow"]
    c = StreamingLoader(root, batch_size=8, shuffle=True, seed=4, follow=True, follow_poll=0.01)
    c.load_state_dict(second)
    landing = _Landing([(2, w.complete)])  # 24 unread, hold 16: two batches (24, 16 unread), then it waits
    rest, stages = _read(c, landing)
    landing.thread.join(timeout=30)
    assert landing.error is None, landing.error
    c.close()
    assert stages == [0, 0, 1]
    assert not set(_flat(seen)) & set(_flat(rest))
    assert sorted(_flat(seen) + _flat(rest)) == list(range(40))
