"""Mosaic's epoch orders (``shuffle_algo="py1e"``, given: the default is global) from the forked
order process (bridge/orders.py): the same ids as computed in the loader's process, under settings changed after the fork, and a dead or failing helper never
changes what is read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from tests.bridge.util import process_alive, write_numeric

N, B = 30_000, 500


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("orders") / "ds", N, compression="zstd", size_limit=1 << 16)


def ids(loader):
    return np.concatenate([b["id"].numpy().copy() for b in loader])


def with_helper(**options):
    """A loader past its first epoch, whose second has started: the order process runs."""
    loader = StreamingLoader(options.pop("data"), batch_size=B, shuffle=True, shuffle_algo="py1e", **options)
    first = ids(loader)
    it = iter(loader)
    assert loader._orders is not None
    return loader, first, it


def test_the_helper_computes_the_same_orders_as_this_process(data):
    loader, _, _ = with_helper(data=data, seed=3)
    orders, ds = loader._orders, loader.dataset
    assert orders.pid != os.getpid() and process_alive(orders.pid)
    for epoch, start, workers in [(0, 0, 1), (1, 0, 1), (5, 0, 1), (2, 7_000, 1), (3, 0, 3)]:
        got = orders.compute(epoch, start, workers, ds.order_settings())
        assert np.array_equal(got, ds.compute_work(epoch, start, workers)), (epoch, start, workers)
    loader.close()
    assert loader._orders is None and not process_alive(orders.pid)


def test_settings_changed_after_the_fork_reach_the_helper(data):
    """load_state_dict sets the order's settings on the loader's dataset after the helper was
    forked: the helper computes with them, not with its stale copy."""
    loader, _, _ = with_helper(data=data, seed=3)
    ds = loader.dataset
    before = loader._compute_order(ds, 1, 0, 1)
    ds.num_canonical_nodes, ds.shuffle_block_size = 4, 8_000  # as a saved state of another run would
    after = loader._compute_order(ds, 1, 0, 1)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, ds.compute_work(1, 0, 1))
    loader.close()


def test_resume_from_a_run_that_used_the_helper_reads_the_rest_exactly(data):
    """Epoch 2's order came from the helper in the first run; the resumed loader's helper was
    forked at build, before load_state_dict set the saved settings. Both read exactly what a
    loader computing its orders in this process reads."""
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=9, decoded_cache_bytes=1 << 16)
    assert reference._orders is None  # not resident: orders in a thread
    expected = [ids(reference) for _ in range(3)]
    first, epoch0, it = with_helper(data=data, seed=9)
    assert np.array_equal(epoch0, expected[0])
    assert np.array_equal(np.concatenate([b["id"].numpy().copy() for b in it]), expected[1])
    it = iter(first)  # epoch 2, from the helper's order
    head = [next(it)["id"].numpy().copy() for _ in range(13)]
    state = first.state_dict()
    first.close()
    resumed = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=9)
    assert resumed._orders is not None
    resumed.load_state_dict(state)
    got = np.concatenate(head + [ids(resumed)])
    assert np.array_equal(got, expected[2])
    reference.close()
    resumed.close()


def test_a_killed_helper_falls_back_to_this_process(data, caplog):
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=4)
    expected = [ids(reference) for _ in range(4)]
    loader, epoch0, it = with_helper(data=data, seed=4)
    assert np.array_equal(epoch0, expected[0])
    assert np.array_equal(np.concatenate([b["id"].numpy().copy() for b in it]), expected[1])
    pid = loader._orders.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with caplog.at_level("WARNING", logger="sparkbridge.bridge.loader"):
        with loader._lock:
            loader._futures.clear()  # orders it may have computed before dying: ask again
        assert np.array_equal(ids(loader), expected[2])
        assert np.array_equal(ids(loader), expected[3])
    assert loader._orders is None  # and no new one is forked for this dataset
    assert any("epoch-order process" in r.getMessage() and f"pid {pid}" in r.getMessage() for r in caplog.records)
    loader.close()
    reference.close()


def test_an_error_in_the_helper_is_raised_here(data):
    loader, _, _ = with_helper(data=data, seed=3)
    ds = loader.dataset
    with pytest.raises(Exception) as helper_error:
        loader._orders.compute(1, 0, 1, (1, -5, 1))  # a negative shuffle block size
    with pytest.raises(type(helper_error.value)):
        ds.shuffle_block_size = -5
        ds.compute_work(1, 0, 1)
    assert process_alive(loader._orders.pid)  # it answers the next request
    ds.shuffle_block_size = None
    settings = (ds.num_canonical_nodes, 2_000, ds.initial_physical_nodes)
    assert loader._orders.compute(2, 0, 1, settings).size > 0
    loader.close()


def test_the_helper_exits_when_the_loader_process_dies(data):
    code = (
        "import os, sys; from sparkbridge.bridge import StreamingLoader; "
        f"l = StreamingLoader({str(data)!r}, batch_size={B}, shuffle=True, shuffle_algo='py1e'); "
        "[b for b in l]; it = iter(l); print(l._orders.pid, flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid), "the order process outlived its loader's process"


def test_no_helper_for_a_dataset_that_does_not_fit_the_table(data):
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3, decoded_cache_bytes=1 << 16)
    for _ in range(2):
        assert sorted(ids(loader).tolist()) == list(range(N))
    iter(loader)
    assert loader._orders is None  # the order is computed in a thread, as for workers
    loader.close()


def test_an_os_error_in_the_computation_is_not_taken_for_a_dead_helper(data, monkeypatch):
    from sparkbridge.bridge.dataset import BatchDataset

    real = BatchDataset.compute_work

    def failing(self, epoch, start, workers):
        if epoch == 99:
            raise FileNotFoundError("no such thing, for epoch 99")
        return real(self, epoch, start, workers)

    monkeypatch.setattr(BatchDataset, "compute_work", failing)  # before the fork: the helper has it
    loader, _, _ = with_helper(data=data, seed=3)
    with pytest.raises(FileNotFoundError, match="epoch 99"):
        loader._orders.compute(99, 0, 1, loader.dataset.order_settings())
    assert process_alive(loader._orders.pid)
    loader.close()


def test_ctrl_c_leaves_the_helper_to_its_loader(data):
    """SIGINT reaches the whole process group; the helper ignores it (no traceback of its own)
    and goes on answering until its loader closes it."""
    loader, _, _ = with_helper(data=data, seed=3)
    pid = loader._orders.pid
    os.kill(pid, signal.SIGINT)
    time.sleep(0.2)
    assert process_alive(pid)
    ds = loader.dataset
    assert np.array_equal(loader._orders.compute(4, 0, 1, ds.order_settings()), ds.compute_work(4, 0, 1))
    loader.close()
    assert not process_alive(pid)


def test_forked_at_build_only_when_no_thread_loads_shards(data, tmp_path):
    """Small local shards load in the foreground (no prefill): the helper is forked at build and
    orders the first epoch too. Large ones prefill from build: no fork until the table is complete."""
    small = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=2)
    assert small.dataset._prefill is None and small._orders is not None
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=2, decoded_cache_bytes=1 << 16)
    assert np.array_equal(ids(small), ids(reference))  # its order of epoch 0 is Mosaic's
    small.close()
    reference.close()
    big_data = write_numeric(tmp_path / "big", 200_000, compression="zstd", size_limit=3 << 19)
    big = StreamingLoader(big_data, batch_size=1000, shuffle=True, shuffle_algo="py1e", seed=2)
    assert big.dataset._prefill is not None and big._orders is None
    ids(big)
    iter(big)
    assert big._orders is not None  # forked once every shard was in the table
    big.close()


def test_the_helper_keeps_no_descriptor_of_the_loader_process(data):
    """A socket the loader's process holds (a DDP peer's, Spark's py4j gateway) is not held open by
    the helper: when the parent closes it, its peer sees it closed."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3)  # small shards: forked at build
    pid, ds = loader._orders.pid, loader.dataset
    # one answer first: the helper has then closed what it inherited
    assert np.array_equal(loader._orders.compute(3, 0, 1, ds.order_settings()), ds.compute_work(3, 0, 1))
    links = [os.readlink(f"/proc/{pid}/fd/{f}") for f in os.listdir(f"/proc/{pid}/fd")]
    assert len([x for x in links if x.startswith("socket:")]) == 1, links  # its own pipe only
    client.close()
    peer.settimeout(5)
    assert peer.recv(1) == b""  # EOF: nobody else holds the client's end
    loader.close()
    peer.close()
    server.close()


def test_close_is_prompt_when_a_later_fork_holds_the_pipe(data):
    """A process forked after the helper (a DataLoader worker of another loader) holds a copy of
    the loader's end of the pipe, so closing it sends no EOF: close() tells the helper to exit."""
    import multiprocessing

    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3)  # small shards: forked at build
    pid = loader._orders.pid
    holder = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
    holder.start()
    try:
        t0 = time.monotonic()
        loader.close()
        assert time.monotonic() - t0 < 10.0  # not the holder's 60 s (a margin for a loaded machine)
        assert not process_alive(pid)
    finally:
        holder.kill()
        holder.join(10)


def _slow_helper_orders(monkeypatch, seconds: float) -> None:
    """Orders computed in the order process take ``seconds`` longer (the loader's own do not)."""
    from sparkbridge.bridge.dataset import BatchDataset

    parent, real = os.getpid(), BatchDataset.compute_work

    def slow(self, *args):
        if os.getpid() != parent:
            time.sleep(seconds)
        return real(self, *args)

    monkeypatch.setattr(BatchDataset, "compute_work", slow)


def test_shards_load_while_the_helper_computes_the_first_order(data, monkeypatch):
    """Small local shards (no prefill thread): iter() loads them while it waits for the order from
    the helper, whose computation leaves this process's GIL free; the epoch is unchanged."""
    _slow_helper_orders(monkeypatch, 0.5)
    loader = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3)
    res = loader.dataset.reader().resident
    assert loader.dataset._prefill is None and loader._orders is not None
    assert not (res.state != 0).any()  # nothing loaded at build
    it = iter(loader)
    assert res.complete()  # every shard loaded before the order came (the pass has not started)
    got = np.concatenate([b["id"].numpy().copy() for b in it])
    monkeypatch.undo()
    reference = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3, decoded_cache_bytes=1 << 16)
    assert np.array_equal(got, ids(reference))
    loader.close()
    reference.close()


def test_a_damaged_shard_met_while_waiting_fails_the_pass_naming_it(data, monkeypatch, tmp_path):
    from sparkbridge.errors import CorruptShardError
    from tests.bridge.util import copy_with_a_flipped_byte

    copy, victim = copy_with_a_flipped_byte(data, tmp_path / "ds", 3)
    _slow_helper_orders(monkeypatch, 0.5)
    loader = StreamingLoader(copy, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=3)
    it = iter(loader)
    res = loader.dataset.reader().resident
    assert int((res.state == 2).sum()) == res.shard_count - 1  # all but the damaged one, left unclaimed
    assert res.state[3] == 0
    with pytest.raises(CorruptShardError, match=victim.name):
        list(it)
    loader.close()


def _shared_maps(pid: int, start: int) -> list[str]:
    """The lines of /proc/PID/maps for a shared mapping that starts at address ``start``."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if int(line.split("-")[0], 16) == start and line.split()[1][3] == "s"]


def test_a_helper_does_not_keep_another_loaders_row_table(data, tmp_path):
    """Loader B's helper is forked while loader A is open; once A is closed, A's table (shared
    anonymous memory) is mapped nowhere: not in B's helper either (issue 23 item 11)."""
    a = StreamingLoader(data, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=1)
    ids(a)
    table = a.dataset._resident
    assert table is not None and table.complete()
    start = table.rows.ctypes.data
    other = write_numeric(tmp_path / "other", 2000, compression="zstd", size_limit=1 << 14)
    b, _, _ = with_helper(data=other, seed=2)
    helper = b._orders.pid
    del table
    a.close()
    assert _shared_maps(os.getpid(), start) == []  # gone here: the helper's copy is the one in question
    assert _shared_maps(helper, start) == []
    # and the helper still serves B
    assert np.array_equal(b._orders.compute(1, 0, 1, b.dataset.order_settings()), b.dataset.compute_work(1, 0, 1))
    b.close()


def _read_in_a_pool_worker(path: str) -> list[int]:
    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(path, batch_size=B, shuffle=True, shuffle_algo="py1e", seed=4)
    try:
        return [int(ids(loader).size) for _ in range(3)] + [int(loader._orders is None)]
    finally:
        loader.close()


def test_a_loader_in_a_daemonic_process_computes_orders_in_a_thread(data):
    """A multiprocessing.Pool worker is daemonic and may not have children: the order helper is
    not started there and the orders come from a thread, as documented (issue 23 item 12)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_in_a_pool_worker, (str(data),)) == [N, N, N, 1]
