"""States saved by an earlier loader still load after the loader became a pipeline of stages.

The dicts below are literals captured from ``main`` before the redesign (commit 229e1e8,
``StreamingLoader.state_dict()`` as JSON), so a checkpoint written then resumes now, or is refused
with a :class:`~sparkbridge.errors.StateError` that names why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.state import StateError
from tests.bridge.follow_log import PartitionedWrite
from tests.bridge.util import write_numeric

# write_numeric(root, 1000, compression="zstd", size_limit=3000); StreamingLoader(root, batch_size=32,
# shuffle=True, seed=11); 5 batches consumed, then state_dict() (the dataset's index.json identity is
# deterministic: same rows, same writer)
MAIN_SNAPSHOT_STATE = {
    "dataset": "index:05f0217f383821a9e104c40f027e227c18be7e67d91e4bd1ed549b18d6ec279f",
    "source": "/tmp/stages-cap/ds1", "epoch": 0, "sample_in_epoch": 160, "shuffle": True, "shuffle_seed": 11,
    "shuffle_algo": "py1e", "shuffle_block_size": 4000000, "num_canonical_nodes": 1, "initial_physical_nodes": 1,
    "world_size": 1, "batch_size": 32, "version": -1, "follow": None, "format": "sparkbridge.loader/2",
}
# what main's run read next (the 6th batch), and how many batches were left in the epoch
MAIN_NEXT_BATCH = [832, 776, 753, 771, 560, 45, 973, 581, 574, 713, 236, 563, 261, 401, 866, 328, 450, 845, 469,
                   609, 735, 136, 416, 16, 791, 494, 479, 22, 194, 57, 356, 892]
MAIN_BATCHES_LEFT = 27

# the same dataset read with shuffle_algo="global" on main (commit afc5232, before its ids were
# computed a chunk ahead in a thread): 5 batches consumed, then state_dict()
MAIN_GLOBAL_STATE = {**MAIN_SNAPSHOT_STATE, "source": "/tmp/g2/cap/ds1", "shuffle_algo": "global"}
MAIN_GLOBAL_NEXT_BATCH = [627, 566, 567, 5, 256, 996, 50, 504, 980, 73, 18, 792, 863, 697, 905, 138, 936, 959, 830,
                          857, 101, 388, 835, 62, 394, 598, 622, 895, 81, 541, 135, 546]

# a followed epoch's state from main: PartitionedWrite, StreamingLoader(root, batch_size=8, follow=True,
# shuffle=True, seed=3), 3 batches consumed (the write id is this test's own)
MAIN_FOLLOW_STATE = {
    "dataset": "follow:{write_id}@v1", "source": "{root}", "epoch": 0, "sample_in_epoch": 0, "shuffle": True,
    "shuffle_seed": 3, "shuffle_algo": "py1e", "shuffle_block_size": None, "num_canonical_nodes": None,
    "initial_physical_nodes": None, "world_size": 1, "batch_size": 8, "version": 1,
    "follow": {"start_version": 1, "write_id": "{write_id}", "stream": False, "history": [[0, 1]], "batches": 3},
    "format": "sparkbridge.loader/2",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("saved") / "ds", 1000, compression="zstd", size_limit=3000)


def test_a_snapshot_state_saved_by_main_resumes_exactly(data):
    loader = StreamingLoader(data, batch_size=32, shuffle=True, seed=11)
    loader.load_state_dict(json.loads(json.dumps(MAIN_SNAPSHOT_STATE)))
    rest = [b["id"].tolist() for b in loader]
    assert rest[0] == MAIN_NEXT_BATCH
    assert len(rest) == MAIN_BATCHES_LEFT
    ids = sum(rest, [])
    assert len(ids) == len(set(ids)) == 1000 - 160
    # and the state it saves now is the same format, one batch on
    again = StreamingLoader(data, batch_size=32, shuffle=True, seed=11)
    again.load_state_dict(MAIN_SNAPSHOT_STATE)
    next(iter(again))
    state = again.state_dict()
    assert {k: v for k, v in state.items() if k != "source"} == {
        **{k: v for k, v in MAIN_SNAPSHOT_STATE.items() if k != "source"}, "sample_in_epoch": 192}
    loader.close()
    again.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_global_state_saved_by_main_resumes_exactly(data, workers):
    from sparkbridge.bridge.order import GlobalOrder

    loader = StreamingLoader(data, batch_size=32, shuffle=True, seed=11, shuffle_algo="global", num_workers=workers)
    loader.load_state_dict(json.loads(json.dumps(MAIN_GLOBAL_STATE)))
    rest = [b["id"].tolist() for b in loader]
    loader.close()
    assert rest[0] == MAIN_GLOBAL_NEXT_BATCH and len(rest) == MAIN_BATCHES_LEFT
    read = GlobalOrder(rows=1000, shuffle=True, seed=11, epoch=0, start=0, ranks=1, workers=1, batch_size=32)
    ids = sum(rest, [])
    assert len(ids) == len(set(ids)) == 1000 - 160
    assert sorted(ids + read.samples(np.arange(160)).tolist()) == list(range(1000))  # exactly the rows not read


def test_a_followed_state_saved_by_main_resumes_exactly(tmp_path):
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root)
    w.partition(100)
    first = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02, shuffle=True, seed=3)
    it = iter(first)
    seen = sum((next(it)["id"].tolist() for _ in range(3)), [])
    first.close()
    state = json.loads(json.dumps(MAIN_FOLLOW_STATE).replace("{write_id}", w.write_id).replace("{root}", root))
    second = StreamingLoader(root, batch_size=8, follow=True, follow_poll=0.02, shuffle=True, seed=3)
    second.load_state_dict(state)
    w.complete()
    rest = sum((b["id"].tolist() for b in second), [])
    assert second.dataset.shuffle_algo == "py1e"  # later epochs in the order the state names
    second.close()
    assert len(seen) == 24 and not set(seen) & set(rest)
    assert sorted(seen + rest) == list(range(100))


@pytest.mark.parametrize("change,message", [
    ({"format": "sparkbridge.loader/0"},
     r"not a sparkbridge loader state \(format='sparkbridge.loader/0', expected 'sparkbridge.loader/2'\)"),
    ({"shuffle_seed": 12}, r"the state was saved with shuffle_seed=12 but this loader has shuffle_seed=11: the remaining samples "
                          r"would come in another order"),
    ({"dataset": "index:" + "0" * 64}, r"the state was saved while reading .* but this loader reads .*: resuming "
                                       r"on other data would repeat or skip samples"),
    ({"epoch": -1}, r"loader state has a negative position: epoch -1, sample 160"),
], ids=["format", "seed", "dataset", "position"])
def test_a_state_that_cannot_resume_is_refused_naming_why(data, change, message):
    loader = StreamingLoader(data, batch_size=32, shuffle=True, seed=11)
    with pytest.raises(StateError, match=message):
        loader.load_state_dict({**MAIN_SNAPSHOT_STATE, **change})
    loader.close()


def test_a_state_missing_a_field_is_refused_naming_it(data):
    loader = StreamingLoader(data, batch_size=32)
    state = dict(MAIN_SNAPSHOT_STATE)
    del state["shuffle_seed"], state["batch_size"]
    with pytest.raises(StateError, match=r"loader state lacks \['batch_size', 'shuffle_seed'\]"):
        loader.load_state_dict(state)
    loader.close()


@pytest.mark.parametrize("given", [None, "py1e"])
def test_a_state_that_does_not_name_its_order_resumes_as_py1e(data, given):
    """A state without ``shuffle_algo`` predates the choice of orders: it resumes in Mosaic's py1e,
    in a loader left at the default (global for shuffle=True) as in one given py1e."""
    state = {k: v for k, v in MAIN_SNAPSHOT_STATE.items() if k != "shuffle_algo"}
    loader = StreamingLoader(data, batch_size=32, shuffle=True, seed=11, shuffle_algo=given)
    loader.load_state_dict(state)
    rest = [b["id"].tolist() for b in loader]
    assert rest[0] == MAIN_NEXT_BATCH and len(rest) == MAIN_BATCHES_LEFT
    assert loader.state_dict()["shuffle_algo"] == "py1e"
    loader.close()
    other = StreamingLoader(data, batch_size=32, shuffle=True, seed=11, shuffle_algo="global")
    with pytest.raises(StateError, match="shuffle_algo='py1e' but this loader has shuffle_algo='global'"):
        other.load_state_dict(state)
    other.close()
