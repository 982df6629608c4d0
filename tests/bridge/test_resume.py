"""Resumption: a run stopped after any consumed batch continues with exactly the samples it had not
seen, in the uninterrupted order — also when ``num_workers`` changes between the two runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.state import StateError
from tests.bridge.util import take, write_numeric

N, B = 1000, 32
BATCHES = -(-N // B)  # 32: 31 full batches and one of 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("resume") / "ds", N, compression="zstd", size_limit=3000)


def make(data, workers=0, **kw):
    # Mosaic's order, read by real DataLoader workers when the table does not fit (the default
    # global order maps its table instead: its resumes are tests/bridge/test_global_order.py's)
    return StreamingLoader(data, batch_size=B, shuffle=True, seed=11, shuffle_algo="py1e", num_workers=workers, **kw)


@pytest.fixture(scope="module")
def reference(data):
    loader = make(data)
    epochs = [np.concatenate(take(loader)), np.concatenate(take(loader))]
    assert loader.epoch == 2
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])  # a new shuffle each epoch
    return epochs


def stop_and_resume(data, *, epoch, k, before, after, **kw):
    """Run ``before`` workers up to ``k`` consumed batches of ``epoch`` and save the state
    (through JSON, as a checkpoint would), then resume in a new loader with ``after`` workers."""
    first = make(data, before, **kw)
    seen = []
    for _ in range(epoch):
        take(first)
    seen += take(first, k) if k else []
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    del first
    second = make(data, after, **kw)
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


#: too small for the resident table: batches come from real DataLoader workers, not this process
NOT_RESIDENT = {"decoded_cache_bytes": 8000}


@pytest.mark.parametrize("kw", [{}, NOT_RESIDENT], ids=["resident", "workers"])
@pytest.mark.parametrize("before,after,k", [(2, 0, 13), (0, 2, 7), (2, 2, BATCHES - 1)])
def test_resume_across_num_workers(data, reference, before, after, k, kw):
    seen, rest, state, second = stop_and_resume(data, epoch=0, k=k, before=before, after=after, **kw)
    assert state["sample_in_epoch"] == k * B  # consumed batches, not the ones workers prefetched
    assert np.array_equal(np.concatenate(seen + rest), reference[0])
    second.close()


@pytest.mark.parametrize("kw", [{}, NOT_RESIDENT], ids=["resident", "workers"])
def test_two_workers_keep_the_order_over_epochs(data, reference, kw):
    loader = make(data, 2, **kw)
    assert len(loader) == BATCHES
    assert np.array_equal(np.concatenate(take(loader)), reference[0])
    assert np.array_equal(np.concatenate(take(loader)), reference[1])
    # a resident dataset is gathered in this process, in the workers' order; others start them
    assert (loader._dl is None) == (not kw)
    loader.close()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_gathered_in_process_are_the_workers_batches(data, workers, drop_last):
    """Batch for batch (sizes included), a resident dataset read with ``num_workers`` in this
    process equals what real DataLoader workers hand out, over two epochs."""
    here = make(data, workers, drop_last=drop_last)
    real = make(data, workers, drop_last=drop_last, **NOT_RESIDENT)
    for _ in range(2):
        a, b = take(here), take(real)
        assert len(a) == len(b) == (BATCHES - 1 if drop_last else BATCHES)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert here._dl is None and real._dl is not None
    here.close()
    real.close()


def test_round_robin_ids_follow_the_dataloaders_turns():
    """One batch from each worker in turn; a worker's skipped batches (all padding, or short with
    drop_last) do not take a turn; an exhausted worker drops out."""
    from sparkbridge.bridge.iterate import round_robin_ids

    P = -1
    work = np.array([
        [[0, 1], [2, 3], [4, P], [P, P]],   # worker 0: two full batches, one short, one empty
        [[5, 6], [P, P], [7, 8], [9, 10]],  # worker 1: an empty batch between full ones
        [[11, 12], [P, P], [P, P], [P, P]],  # worker 2: one batch
    ])
    got = round_robin_ids(work, drop_last=False).reshape(-1, 2).tolist()
    assert got == [[0, 1], [5, 6], [11, 12], [2, 3], [7, 8], [4, P], [9, 10]]
    got = round_robin_ids(work, drop_last=True).reshape(-1, 2).tolist()
    assert got == [[0, 1], [5, 6], [11, 12], [2, 3], [7, 8], [9, 10]]


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
