"""A real 2-process torchrun (gloo, CPU): disjoint equal rank shares that cover the data."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bridge.util import write_numeric

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    even = write_numeric(tmp_path / "even", 1000, compression="zstd", size_limit=4000)
    uneven = write_numeric(tmp_path / "uneven", 1001, size_limit=4000)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE / "rank_reader.py"), str(out), str(even), str(uneven)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    a, b = (r[str(even)] for r in ranks)
    assert a["world"] == b["world"] == 2
    assert a["batches"] == b["batches"] == a["len"] == b["len"] == 32  # 500 samples each in batches of 16
    assert len(a["ids"]) == len(b["ids"]) == 500
    assert not set(a["ids"]) & set(b["ids"])  # disjoint
    assert sorted(a["ids"] + b["ids"]) == list(range(1000))  # complete
    assert a["state"] == b["state"] and a["state"]["epoch"] == 1

    a, b = (r[str(uneven)] for r in ranks)
    # 1001 samples over 2 ranks: Mosaic repeats one sample so both ranks take 501 (no DDP hang)
    assert a["batches"] == b["batches"] == a["len"] == 32
    assert len(a["ids"]) == len(b["ids"]) == 501
    assert set(a["ids"]) | set(b["ids"]) == set(range(1001))
    assert len(set(a["ids"]) & set(b["ids"])) <= 1

    # pad_ranks=False: each row exactly once over the ranks, none repeated (2 workers per rank)
    for name, rows in ((even, 1000), (uneven, 1001)):
        a, b = (r[str(name) + "#once"] for r in ranks)
        assert sorted(a["ids"] + b["ids"]) == list(range(rows))
        assert a["len"] == -(-len(a["ids"]) // 16) and b["len"] == -(-len(b["ids"]) // 16)


@pytest.mark.slow
def test_torchrun_ddp_training_job(tmp_path):
    """``torchrun --nproc_per_node=2 jobs/train.py``: DDP over gloo, both ranks take equal steps."""
    import torch

    data = write_numeric(tmp_path / "ds", 3001, compression="zstd", size_limit=8000)
    ckpt = tmp_path / "ckpt.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE.parents[1] / "jobs" / "train.py"), "--data", str(data),
           "--label", "y", "--epochs", "2", "--batch-size", "100", "--no-progress", "--device", "cpu",
           "--checkpoint", str(ckpt), "--eval", str(data), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the evaluation counts each of the 3001 rows once, not Mosaic's repeat that evens out the ranks
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["rows"] == 3001
    state = torch.load(ckpt, weights_only=True)
    # 3001 samples: 1501 per rank -> 15 batches of 100 and one of 1 row per epoch, on both ranks
    # (the job standardizes its inputs itself: no BatchNorm, so the 1-row batch trains too)
    assert state["step"] == 32 and state["loader"]["world_size"] == 2
    assert (state["loader"]["epoch"], state["loader"]["sample_in_epoch"]) == (2, 0)
    assert "epoch 1: mean regression loss" in proc.stderr


def _run_bounded(cmd, env, timeout):
    """Run ``cmd``; on timeout kill it and every process under it (torchrun starts each rank in a
    session of its own) and fail."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid)
        for p in [*tree.children(recursive=True), tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout}s (a rank hangs): {err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.slow
def test_one_failed_rank_ends_every_rank(tmp_path):
    """Rank 0 cannot write its checkpoint (its folder is a file) while rank 1 is in DDP's all-reduce:
    both ranks end within seconds, each printing the error in one line; none waits in a barrier."""
    data = write_numeric(tmp_path / "ds", 3001, compression="zstd", size_limit=8000)
    (tmp_path / "blocked").write_text("a file where the checkpoint folder should be")
    ckpt = tmp_path / "blocked" / "ckpt.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE.parents[1] / "jobs" / "train.py"), "--data", str(data),
           "--label", "y", "--epochs", "2", "--batch-size", "100", "--no-progress", "--device", "cpu",
           "--checkpoint", str(ckpt), "--checkpoint-every", "3"]
    code, _, err = _run_bounded(cmd, env, timeout=60)
    assert code != 0, err[-3000:]
    lines = [line for line in err.splitlines() if "jobs/train.py: error:" in line]
    rank0 = [line for line in lines if "rank 0 failed" not in line]
    rank1 = [line for line in lines if "rank 0 failed" in line]
    assert len(rank0) == 1 and str(tmp_path / "blocked") in rank0[0], err[-3000:]
    assert len(rank1) == 1 and str(tmp_path / "blocked") in rank1[0], err[-3000:]
