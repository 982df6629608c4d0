"""``jobs/train.py``: the CLI sub-command trains, checkpoints, and resumes a stopped run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparkbridge.jobs.cli import build_parser
from sparkbridge.jobs.train import run_train
from tests.bridge.util import write_numeric

REPO = Path(__file__).resolve().parents[2]


def test_train_stops_checkpoints_and_resumes(tmp_path):
    data = write_numeric(tmp_path / "ds", 2000, compression="zstd", size_limit=8000)
    ckpt = tmp_path / "ckpt.pt"
    argv = ["train", "--data", str(data), "--label", "y", "--features", "x,id", "--epochs", "2",
            "--batch-size", "100", "--checkpoint", str(ckpt), "--checkpoint-every", "1", "--no-progress",
            "--device", "cpu"]
    args = build_parser().parse_args(argv + ["--max-steps", "7"])
    assert run_train(args) == 0
    first = torch.load(ckpt, weights_only=True)
    assert first["step"] == 7
    assert (first["loader"]["epoch"], first["loader"]["sample_in_epoch"]) == (0, 700)
    assert run_train(build_parser().parse_args(argv)) == 0
    done = torch.load(ckpt, weights_only=True)
    assert done["step"] == 40  # 2 epochs x 20 batches, the 7 before the stop not repeated
    assert (done["loader"]["epoch"], done["loader"]["sample_in_epoch"]) == (2, 0)


def test_default_features_are_the_numeric_columns(tmp_path, caplog):
    data = write_numeric(tmp_path / "ds", 300)
    args = build_parser().parse_args(["train", "--data", str(data), "--label", "x", "--batch-size", "64",
                                      "--no-progress", "--device", "cpu"])
    with caplog.at_level("INFO"):
        assert run_train(args) == 0
    assert "['id', 'y']" in caplog.text


@pytest.mark.slow
def test_trainer_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a real training process mid-epoch; the resumed run finishes with exact step counts."""
    data = write_numeric(tmp_path / "ds", 8000, size_limit=1 << 16)
    ckpt = tmp_path / "ckpt.pt"
    argv = ["--data", str(data), "--label", "y", "--features", "x,id", "--epochs", "1", "--batch-size", "20",
            "--checkpoint", str(ckpt), "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *argv, "--checkpoint-every", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the trainer wrote no checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed = torch.load(ckpt, weights_only=True)
    assert 1 <= killed["step"] < 400 and killed["loader"]["epoch"] == 0  # stopped inside the epoch
    assert killed["loader"]["sample_in_epoch"] == killed["step"] * 20
    assert run_train(build_parser().parse_args(["train", *argv, "--checkpoint-every", "1000"])) == 0
    done = torch.load(ckpt, weights_only=True)
    assert done["step"] == 400 and (done["loader"]["epoch"], done["loader"]["sample_in_epoch"]) == (1, 0)
