"""Resumption: a run stopped after any consumed batch continues with exactly the samples it had not
seen, in the uninterrupted order — also when ``num_workers`` changes between the two runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.state import StateError
from tests.bridge.util import write_numeric

N, B = 1000, 32
BATCHES = -(-N // B)  # 32: 31 full batches and one of 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("resume") / "ds", N, compression="zstd", size_limit=3000)


def make(data, workers=0, **kw):
    return StreamingLoader(data, batch_size=B, shuffle=True, seed=11, num_workers=workers, **kw)


def take(loader, k=None):
    out = []
    for batch in loader:
        out.append(batch["id"].numpy().copy())
        if k is not None and len(out) == k:
            break
    return out


@pytest.fixture(scope="module")
def reference(data):
    loader = make(data)
    epochs = [np.concatenate(take(loader)), np.concatenate(take(loader))]
    assert loader.epoch == 2
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])  # a new shuffle each epoch
    return epochs


def stop_and_resume(data, *, epoch, k, before, after):
    """Run ``before`` workers up to ``k`` consumed batches of ``epoch`` and save the state
    (through JSON, as a checkpoint would), then resume in a new loader with ``after`` workers."""
    first = make(data, before)
    seen = []
    for _ in range(epoch):
        take(first)
    seen += take(first, k) if k else []
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    del first
    second = make(data, after)
    second.load_state_dict(state)
    rest = take(second)
    return seen, rest, state, second


@pytest.mark.parametrize("k", [0, 1, 13, BATCHES - 1, BATCHES])
def test_resume_at_start_middle_and_end_of_epoch(data, reference, k):
    seen, rest, state, second = stop_and_resume(data, epoch=0, k=k, before=0, after=0)
    if k == BATCHES:  # finished epoch: the state points at the start of the next one
        assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
        assert np.array_equal(np.concatenate(seen), reference[0])
        assert np.array_equal(np.concatenate(rest), reference[1])
        return
    assert (state["epoch"], state["sample_in_epoch"]) == (0, k * B)
    got = np.concatenate(seen + rest)
    assert len(seen) + len(rest) == BATCHES
    assert np.array_equal(got, reference[0])  # every sample once, same order
    assert second.epoch == 1
    assert np.array_equal(np.concatenate(take(second)), reference[1])


def test_resume_in_next_epoch(data, reference):
    seen, rest, state, _ = stop_and_resume(data, epoch=1, k=20, before=0, after=0)
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 20 * B)
    assert np.array_equal(np.concatenate(seen + rest), reference[1])


@pytest.mark.parametrize("before,after,k", [(2, 0, 13), (0, 2, 7), (2, 2, BATCHES - 1)])
def test_resume_across_num_workers(data, reference, before, after, k):
    seen, rest, state, second = stop_and_resume(data, epoch=0, k=k, before=before, after=after)
    assert state["sample_in_epoch"] == k * B  # consumed batches, not the ones workers prefetched
    assert np.array_equal(np.concatenate(seen + rest), reference[0])
    second.close()


def test_two_workers_keep_the_order_over_epochs(data, reference):
    loader = make(data, 2)
    assert len(loader) == BATCHES
    assert np.array_equal(np.concatenate(take(loader)), reference[0])
    assert np.array_equal(np.concatenate(take(loader)), reference[1])
    loader.close()


def test_unfinished_pass_then_iter_starts_next_epoch(data, reference):
    loader = make(data)
    take(loader, 3)
    assert np.array_equal(np.concatenate(take(loader)), reference[1])


def test_an_iterator_that_yielded_nothing_is_not_an_epoch(data, reference):
    """tqdm.auto calls iter() in its constructor and again in its loop."""
    from tqdm.auto import tqdm

    loader = make(data)
    unused = iter(loader)
    assert np.array_equal(np.concatenate([b["id"].numpy().copy() for b in tqdm(loader, disable=False)]), reference[0])
    assert loader.epoch == 1
    del unused
    assert np.array_equal(np.concatenate(take(loader)), reference[1])


def test_state_refuses_other_data_and_other_order(data, tmp_path):
    loader = make(data)
    take(loader, 2)
    state = loader.state_dict()
    other = StreamingLoader(write_numeric(tmp_path / "other", 300), batch_size=B, shuffle=True, seed=11)
    with pytest.raises(StateError, match="other data"):
        other.load_state_dict(state)
    reseeded = StreamingLoader(data, batch_size=B, shuffle=True, seed=12)
    with pytest.raises(StateError, match="shuffle_seed=11"):
        reseeded.load_state_dict(state)
    with pytest.raises(StateError, match="not a sparkbridge loader state"):
        make(data).load_state_dict({"epoch": 0})
