"""The transform stage: ``StreamingLoader(transform=fn)`` runs ``fn`` on each batch in forked
workers, in the loader's order; resume, errors and worker deaths behave (no hang, no leak), and a
transform defined in ``python -c``, a script's ``__main__`` or a notebook cell works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import TransformError
from tests.bridge.util import write_numeric

N, B = 1000, 64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("transform") / "ds", N, compression="zstd", size_limit=3000)


def ids_of(loader, key="id", k=None):
    out = []
    for batch in loader:
        out.append(np.asarray(batch[key]).copy())
        if k is not None and len(out) == k:
            break
    return out


def doubled(batch):
    return {"id": batch["id"].numpy() * 2, "y": batch["y"], "pid": os.getpid()}


@pytest.mark.parametrize("workers", [0, 2])
def test_transform_keeps_the_loaders_order_and_runs_in_workers(data, workers):
    plain = np.concatenate(ids_of(StreamingLoader(data, batch_size=B, shuffle=True, seed=4)))
    loader = StreamingLoader(data, batch_size=B, shuffle=True, seed=4, num_workers=workers, transform=doubled)
    pids, got = set(), []
    for out in loader:
        got.append(out["id"] // 2)
        pids.add(out["pid"])
    assert np.array_equal(np.concatenate(got), plain)
    if workers == 0:
        assert pids == {os.getpid()}
    else:
        assert len(pids) == 2 and os.getpid() not in pids
        procs = [p.pid for p in loader._transform_stage._procs]
    # a second epoch through the same (persistent) workers is the loader's next epoch
    assert sorted(np.concatenate([o["id"] // 2 for o in loader]).tolist()) == list(range(N))
    loader.close()
    if workers:
        for pid in procs:  # the workers are gone after close(): no leaked process
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.parametrize("stop", [1, 7, 15])
def test_resume_with_a_transform_is_exact(data, stop):
    reference = np.concatenate(ids_of(StreamingLoader(data, batch_size=B, shuffle=True, seed=9)))
    first = StreamingLoader(data, batch_size=B, shuffle=True, seed=9, num_workers=2, transform=doubled)
    head = ids_of(first, k=stop)  # batches ahead in the workers are not counted as consumed
    state = first.state_dict()
    first.close()
    second = StreamingLoader(data, batch_size=B, shuffle=True, seed=9, num_workers=2, transform=doubled)
    second.load_state_dict(state)
    tail = ids_of(second)
    second.close()
    assert np.array_equal(np.concatenate(head + tail) // 2, reference)


def _fails_on_third(batch):
    if int(batch["id"].numpy().min()) >= 2 * B:
        raise ValueError("bad record in my decode")
    return batch


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_the_transform_names_the_batch_and_keeps_its_cause(data, workers):
    loader = StreamingLoader(data, batch_size=B, num_workers=workers, transform=_fails_on_third)
    with pytest.raises(TransformError, match=r"epoch 0, batch 2 \(sample ids 128, 129, 130, 131, 132, \.\.\. "
                                             r"\(64 samples\)\): ValueError: bad record in my decode") as info:
        list(loader)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    if workers:  # the worker's traceback is kept, naming the user's function
        assert "_fails_on_third" in str(cause.__cause__)
    loader.close()


def _fails_on_row_7(batch):
    if 7 in batch["id"].tolist():
        raise KeyError("row 7")
    return batch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_transform_error_names_the_first_sample_ids_of_a_shuffled_batch(data, workers):
    plain = ids_of(StreamingLoader(data, batch_size=B, shuffle=True, seed=21))
    k = next(i for i, b in enumerate(plain) if 7 in b.tolist())
    shown = ", ".join(str(i) for i in plain[k][:5].tolist())
    loader = StreamingLoader(data, batch_size=B, shuffle=True, seed=21, num_workers=workers,
                             transform=_fails_on_row_7)
    with pytest.raises(TransformError) as info:
        list(loader)
    assert str(info.value) == (f"the transform failed on epoch 0, batch {k} (sample ids {shown}, ... "
                               f"({len(plain[k])} samples)): KeyError: 'row 7'")
    loader.close()


def _dies_on_second(batch):
    if int(batch["id"].numpy().min()) == B:  # batch 1, the first one worker 1 takes
        os.kill(os.getpid(), signal.SIGKILL)
    return batch


def _dies_after_sending(batch):
    # worker 0 sends batch 0 (its tensors are fetched from it when read) and dies on batch 2
    if int(batch["id"].numpy().min()) == 2 * B:
        os.kill(os.getpid(), signal.SIGKILL)
    if int(batch["id"].numpy().min()) == B:
        import time

        time.sleep(1.0)  # batch 1 comes late, so batch 0 is still unread when worker 0 dies
    return batch


def torch_shm() -> set[str]:
    """torch's named shared-memory files (other processes of the machine may own other names)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("torch_")}


def test_a_killed_worker_is_named_not_waited_for(data):
    shm_before = torch_shm()
    loader = StreamingLoader(data, batch_size=B, num_workers=2, transform=_dies_on_second)
    procs = [p.pid for p in loader._transform_stage._procs]
    with pytest.raises(TransformError, match=r"transform worker 1 \(pid \d+\) was killed by signal SIGKILL while on "
                                             r"epoch 0, batch 1"):
        list(loader)
    loader.close()
    for pid in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert torch_shm() - shm_before == set()


def test_a_worker_that_dies_after_sending_is_named(data):
    loader = StreamingLoader(data, batch_size=B, num_workers=2, transform=_dies_after_sending)
    with pytest.raises(TransformError, match=r"transform worker 0 \(pid \d+\) was killed by signal SIGKILL"):
        list(loader)
    loader.close()


def test_transform_options_are_checked(data):
    with pytest.raises(ValueError, match="transform must be a callable"):
        StreamingLoader(data, batch_size=B, transform="decode")
    with pytest.raises(ValueError, match="transform_workers must be an int >= 0"):
        StreamingLoader(data, batch_size=B, transform=doubled, transform_workers=-1)


CLOSURE_PROGRAM = textwrap.dedent("""
    import os, sys
    import numpy as np
    from sparkbridge.bridge import StreamingLoader

    def make(scale):
        def scaled(batch):           # a closure: not picklable, inherited by the forked workers
            return {"id": batch["id"] * scale, "pid": os.getpid()}
        return scaled

    for fn in (make(3), lambda b: {"id": b["id"] * 3, "pid": os.getpid()}):
        loader = StreamingLoader(sys.argv[1], batch_size=64, num_workers=2, transform=fn)
        out = list(loader)
        ids = np.concatenate([o["id"].numpy() for o in out]) // 3
        assert sorted(ids.tolist()) == list(range(1000)), "rows"
        assert os.getpid() not in {o["pid"] for o in out}, "ran in this process"
        loader.close()
    print("ok", len(out))
""")


def test_transforms_defined_in_python_c_and_a_scripts_main_work(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    by_c = subprocess.run([sys.executable, "-c", CLOSURE_PROGRAM, str(data)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert by_c.returncode == 0, by_c.stderr[-2000:]
    assert by_c.stdout.split() == ["ok", str(-(-N // 64))]
    script = tmp_path / "train.py"
    script.write_text(CLOSURE_PROGRAM)
    by_script = subprocess.run([sys.executable, str(script), str(data)], capture_output=True, text=True,
                               timeout=180, env=env)
    assert by_script.returncode == 0, by_script.stderr[-2000:]
    assert by_script.stdout.split() == ["ok", str(-(-N // 64))]


def test_a_transform_defined_in_a_notebook_cell_works(data):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os, numpy as np\nfrom sparkbridge.bridge import StreamingLoader"),
        nbformat.v4.new_code_cell("def augment(batch):\n    return {'id': batch['id'] + 1, 'pid': os.getpid()}"),
        nbformat.v4.new_code_cell(
            f"loader = StreamingLoader({str(data)!r}, batch_size=64, num_workers=2, transform=augment)\n"
            "out = list(loader)\n"
            "ids = np.concatenate([o['id'].numpy() for o in out]) - 1\n"
            "print(sorted(ids.tolist()) == list(range(1000)), os.getpid() in {o['pid'] for o in out})\n"
            "loader.close()"),
    ]
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    assert nb.cells[2].outputs[0]["text"].split() == ["True", "False"]


def _tagged(batch):
    return {"id": batch["id"] * 2, "pid": os.getpid()}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_transform_in_a_followed_epoch_sees_every_landed_row_once(tmp_path, workers):
    import threading

    from tests.bridge.follow_log import PartitionedWrite

    root = str(tmp_path / "live")
    write = PartitionedWrite(root, size_limit=2000)
    write.partition(300)

    def land_the_rest():
        for rows in (0, 250, 180):
            write.partition(rows)
        write.complete()

    loader = StreamingLoader(root, batch_size=B, shuffle=True, seed=2, follow=True, follow_poll=0.05,
                             num_workers=workers, transform=_tagged)
    writer = threading.Thread(target=land_the_rest)
    writer.start()
    got, pids = [], set()
    for out in loader:  # the followed epoch: ends when the write completes
        got += (out["id"] // 2).tolist()
        pids.add(out["pid"])
    writer.join()
    assert sorted(got) == list(range(730))
    assert (pids == {os.getpid()}) if workers == 0 else (len(pids) == 2 and os.getpid() not in pids)
    # the next epoch reads the finished version, through the same transform
    assert sorted(i for out in loader for i in (out["id"] // 2).tolist()) == list(range(730))
    loader.close()


def test_a_transform_under_two_torchrun_ranks_reads_disjoint_shares_exactly_once(data, tmp_path):
    import json
    from pathlib import Path

    from tests.bridge.util import torchrun

    script = Path(__file__).with_name("transform_ranks.py")
    done = torchrun(script, str(tmp_path), str(data), nproc=2, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = (set(r["ids"]) for r in ranks)
    assert a.isdisjoint(b) and sorted(a | b) == list(range(N))
    assert all(len(r["ids"]) == N // 2 and len(set(r["ids"])) == N // 2 for r in ranks)  # exactly once
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"]
    assert all(r["in_worker"] for r in ranks)
