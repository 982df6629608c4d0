"""The loader as stages (:mod:`sparkbridge.bridge.epochs`): each epoch source has ``reset`` and
``state_dict``, the loader's state is the current source's, and its position moves in one place."""

from __future__ import annotations

import json

import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.epochs import FollowedEpoch, Position, SnapshotEpochs
from sparkbridge.bridge.state import LoaderState
from tests.bridge.follow_log import PartitionedWrite
from tests.bridge.util import write_numeric

N, B = 300, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("stages") / "ds", N, compression="zstd", size_limit=3000)


def test_position_moves_in_one_place():
    pos = Position()
    assert (pos.epoch, pos.start, pos.consumed, pos.active, pos.token) == (0, 0, 0, False, None)
    token = pos.begin(10)
    assert pos.active and pos.pass_batches == 10
    assert pos.handed(token) and pos.handed(token) and pos.consumed == 2
    newer = pos.begin(10)  # a new pass supersedes the old one's iterator
    assert not pos.handed(token) and pos.consumed == 0
    assert pos.handed(newer)
    pos.reset(3, 96)
    assert (pos.epoch, pos.start, pos.consumed, pos.active, pos.token) == (3, 96, 0, False, None)


def test_the_loaders_state_is_its_snapshot_sources_and_resets_it(data):
    loader = StreamingLoader(data, batch_size=B, shuffle=True, seed=4)
    assert isinstance(loader._snapshot, SnapshotEpochs)
    it = iter(loader)
    head = [next(it)["id"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == loader._snapshot.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 3 * B)
    rest = [b["id"].tolist() for b in it]
    loader.close()

    resumed = StreamingLoader(data, batch_size=B, shuffle=True, seed=4)
    resumed._snapshot.reset(LoaderState.from_dict(json.loads(json.dumps(state))))  # the stage alone
    assert (resumed.epoch, resumed._pos.start) == (0, 3 * B)
    assert [b["id"].tolist() for b in resumed] == rest
    assert sorted(sum(head + rest, [])) == list(range(N))
    assert resumed.epoch == 1 and resumed.state_dict()["sample_in_epoch"] == 0
    resumed.close()


def test_a_followed_epoch_is_a_stage_whose_state_nests_in_the_loaders(tmp_path):
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    w.partition(40)
    loader = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02)
    assert isinstance(loader._followed, FollowedEpoch) and loader.dataset is None
    it = iter(loader)
    seen = [next(it)["id"].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == loader._followed.state_dict()
    assert state["follow"]["batches"] == 2 and state["epoch"] == 0
    w.partition(24)
    w.complete()
    rest = [b["id"].tolist() for b in it]
    assert sorted(sum(seen + rest, [])) == list(range(64))
    # the followed epoch ended: the snapshot source reads the version it ended at, from epoch 1
    assert loader.epoch == 1 and loader.dataset is not None and not loader._followed.following
    assert loader.state_dict() == loader._snapshot.state_dict()
    assert sorted(sum((b["id"].tolist() for b in loader), [])) == list(range(64))
    loader.close()
