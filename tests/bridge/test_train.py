"""``jobs/train.py``: the CLI sub-command trains, checkpoints, and resumes a stopped run."""

from __future__ import annotations


import torch

from jobs.cli import build_parser
from jobs.train import run_train
from tests.bridge.util import write_numeric


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
