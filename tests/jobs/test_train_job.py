"""``sparkbridge train`` on a real regression dataset written by Spark: it learns, reports both units,
writes metrics, counts --max-steps in this run, and resumes from the previous checkpoint when the
newest one is damaged.

The data imitates a penguin table: body mass in grams (thousands) from flipper, bill and depth in
millimetres, one column constant, one with gaps. The noise is known (sd 300 g), so the best
possible standardized MSE is 300² / var(mass) ≈ 0.15; predicting the mean scores 1.0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparkbridge.jobs.checkpoint import CHECKPOINT_FORMAT, previous_path
from sparkbridge.jobs.cli import build_parser
from sparkbridge.jobs.train import run_train

ROWS = 6000
BATCH = 128
STEPS_PER_EPOCH = math.ceil(ROWS / BATCH)  # 47
COLUMNS = ["flipper_mm", "bill_mm", "depth_mm", "island", "body_mass_g"]


@pytest.fixture(scope="module")
def penguins(spark, tmp_path_factory):
    """(dataset root, the columns as numpy arrays) written through etl.read_source + etl.write_mds."""
    from sparkbridge import etl

    rng = np.random.default_rng(7)
    flipper, bill, depth = rng.normal(200, 14, ROWS), rng.normal(44, 5, ROWS), rng.normal(17, 2, ROWS)
    mass = np.round(4200 + 50 * (flipper - 200) + 30 * (bill - 44) - 40 * (depth - 17) + rng.normal(0, 300, ROWS))
    base = tmp_path_factory.mktemp("penguins")
    csv = base / "penguins.csv"
    with open(csv, "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for i in range(ROWS):
            gap = i % 10 == 3
            f.write(f"{flipper[i]:.1f},{bill[i]:.1f},{'NaN' if gap else f'{depth[i]:.1f}'},7,{mass[i]:.0f}\n")
    schema = "flipper_mm DOUBLE, bill_mm DOUBLE, depth_mm DOUBLE, island INT, body_mass_g DOUBLE"
    df = etl.read_source(spark, str(csv), format="csv", schema=schema)
    out = base / "ds"
    assert etl.write_mds(df.repartition(2), str(out), shard_size="64KB").rows == ROWS
    depth_read = np.where(np.arange(ROWS) % 10 == 3, np.nan, np.round(depth, 1))
    values = {"flipper_mm": np.round(flipper, 1), "bill_mm": np.round(bill, 1), "depth_mm": depth_read,
              "island": np.full(ROWS, 7.0), "body_mass_g": mass}
    return out, values


def train(*argv: str) -> int:
    return run_train(build_parser().parse_args(["train", *argv]))


def common(data, out, *extra: str) -> list[str]:
    return ["--data", str(data), "--label", "body_mass_g", "--batch-size", str(BATCH), "--lr", "3e-3",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def records(out, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_train_learns_a_target_in_the_thousands(penguins, tmp_path):
    data, values = penguins
    out = tmp_path / "run"
    assert train(*common(data, out, "--epochs", "3", "--log-every", "5", "--eval", str(data))) == 0

    summary = json.loads((out / "summary.json").read_text())
    stats = summary["standardization"]
    assert stats["features"] == ["flipper_mm", "bill_mm", "depth_mm", "island"]
    assert stats["rows"] == ROWS and stats["finite"] == [ROWS, ROWS, ROWS - ROWS // 10, ROWS]
    for i, name in enumerate(stats["features"]):
        v = values[name]
        assert stats["mean"][i] == pytest.approx(np.nanmean(v), rel=1e-6), name
        expected_std = np.nanstd(v) if np.nanstd(v) > 0 else 1.0  # the constant column keeps std 1
        assert stats["std"][i] == pytest.approx(expected_std, rel=1e-5), name
    assert stats["target_mean"] == pytest.approx(values["body_mass_g"].mean(), rel=1e-9)
    assert stats["target_std"] == pytest.approx(values["body_mass_g"].std(), rel=1e-9)

    # Learned: measured 0.155 standardized on this data (noise floor 0.15, the mean scores 1.0);
    # before standardization the MSE stayed at the variance of the grams (~6e5 g², 1.0 here).
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["rows"] == ROWS
    assert evaluation["mse"] < 0.25
    assert evaluation["mse_original"] == pytest.approx(evaluation["mse"] * stats["target_std"] ** 2, rel=1e-9)
    assert evaluation["rmse_original"] < 0.5 * stats["target_std"]
    assert summary["final_loss"] < 0.3
    assert summary["final_loss_original"] == pytest.approx(summary["final_loss"] * stats["target_std"] ** 2)
    assert (summary["steps_this_run"], summary["steps_total"]) == (3 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH)
    assert summary["ranks"][0]["rank"] == 0 and summary["ranks"][0]["batches_per_epoch"] == STEPS_PER_EPOCH

    train_records = records(out, "train")
    # one record per 5 steps, the epoch's remainder flushed at its end: 47 = 9 x 5 + 2
    assert [r["steps"] for r in train_records] == ([5] * 9 + [2]) * 3
    assert [r["step"] for r in train_records][:10] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 47]
    assert sum(r["rows"] for r in train_records) == 3 * ROWS
    for r in train_records:
        assert r["loss_original"] == pytest.approx(r["loss"] * stats["target_std"] ** 2)
        assert r["rows_per_s"] == pytest.approx(r["rows"] / r["seconds"])
        assert 0.0 <= r["data_wait_share"] <= 1.0
    assert [r["epoch"] for r in records(out, "epoch")] == [0, 1, 2]
    assert train_records[-1]["loss"] < train_records[0]["loss"] / 2
    (ev,) = records(out, "eval")
    assert ev["mse"] == evaluation["mse"] and ev["step"] == 3 * STEPS_PER_EPOCH
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_max_steps_counts_this_run_and_a_corrupt_checkpoint_falls_back(penguins, tmp_path, caplog):
    data, _ = penguins
    ckpt = tmp_path / "ckpt.pt"
    out = tmp_path / "run"
    args = common(data, out, "--epochs", "2", "--checkpoint", str(ckpt), "--checkpoint-every", "10")
    assert train(*args, "--max-steps", "30") == 0
    first = torch.load(ckpt, weights_only=True)
    assert first["format"] == CHECKPOINT_FORMAT and first["step"] == 30
    assert (first["loader"]["epoch"], first["loader"]["sample_in_epoch"]) == (0, 30 * BATCH)
    assert torch.load(previous_path(ckpt), weights_only=True)["step"] == 30  # saved at 30, then again at the end

    # --max-steps 25 more steps from step 30: this run stops at 55, not at 25.
    assert train(*args, "--max-steps", "25") == 0
    second = torch.load(ckpt, weights_only=True)
    assert second["step"] == 55
    assert (second["loader"]["epoch"], second["loader"]["sample_in_epoch"]) == (1, (55 - STEPS_PER_EPOCH) * BATCH)
    assert torch.load(previous_path(ckpt), weights_only=True)["step"] == 50
    # the statistics came from the checkpoint, not a second pass: identical
    assert second["standardization"] == first["standardization"]

    # The newest checkpoint is cut in half (a crash mid-write on a filesystem without atomic rename):
    # the run resumes from .prev (step 50) with a warning and finishes the 2 epochs.
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])
    with caplog.at_level("WARNING"):
        assert train(*args) == 0
    assert f"{ckpt} is unreadable" in caplog.text and f"falling back to the previous checkpoint {previous_path(ckpt)}" in caplog.text
    done = torch.load(ckpt, weights_only=True)
    assert done["step"] == 2 * STEPS_PER_EPOCH  # 94: from 50 on, none repeated, none skipped
    assert (done["loader"]["epoch"], done["loader"]["sample_in_epoch"]) == (2, 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(previous_path(ckpt))
    assert summary["steps_this_run"] == 2 * STEPS_PER_EPOCH - 50
    steps = [r["step"] for r in records(out, "train")]
    assert steps == sorted(steps) and steps[-1] == 2 * STEPS_PER_EPOCH  # one metrics file across the 3 runs


def test_checkpoint_for_other_features_is_refused(penguins, tmp_path):
    from sparkbridge.errors import CheckpointError

    data, _ = penguins
    ckpt = tmp_path / "ckpt.pt"
    assert train(*common(data, tmp_path / "a", "--features", "flipper_mm", "--checkpoint", str(ckpt),
                         "--max-steps", "2")) == 0
    with pytest.raises(CheckpointError) as err:
        train(*common(data, tmp_path / "b", "--features", "flipper_mm,bill_mm", "--checkpoint", str(ckpt)))
    message = str(err.value)
    assert f"{ckpt} was written for" in message and "'features': ['flipper_mm']" in message
    assert message.endswith(f"Delete {ckpt} to start training over")  # saved once: no .prev yet


def test_save_keeps_the_previous_checkpoint_and_load_skips_garbage(tmp_path, caplog):
    from sparkbridge.errors import CheckpointError
    from sparkbridge.jobs.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "sub" / "c.pt"
    assert load_checkpoint(path) == (None, None)
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "loader": {}, "step": 1}
    save_checkpoint(state, path)
    assert "format" not in state  # the caller's dict is not modified
    save_checkpoint({**state, "step": 2}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt", "c.pt.prev"]  # no temporaries left
    loaded, source = load_checkpoint(path)
    assert (loaded["step"], source) == (2, path) and torch.equal(loaded["model"]["w"], torch.ones(2))

    path.write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING"):
        loaded, source = load_checkpoint(path)
    assert (loaded["step"], source) == (1, previous_path(path))
    assert "falling back to the previous checkpoint" in caplog.text

    path.unlink()  # a crash between the two renames: only .prev is there
    assert load_checkpoint(path)[0]["step"] == 1

    torch.save({"step": 3}, path)  # someone else's file
    previous_path(path).write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "is not a sparkbridge training checkpoint (format None" in str(err.value)
    assert str(err.value).endswith(f"Delete {path} and {previous_path(path)} to start training over")


def test_rank_0_decides_and_every_rank_resumes_from_its_checkpoint(tmp_path):
    """Rank 1 looks at a path that does not exist on its 'node'; it resumes from rank 0's checkpoint
    (the .prev one: the newest is corrupt) all the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sparkbridge.jobs.checkpoint import save_checkpoint
    from sparkbridge.jobs.local_cluster import free_ports

    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "optimizer": {}, "loader": {}, "step": 7}, path)
    save_checkpoint({"model": {"w": torch.zeros(3)}, "optimizer": {}, "loader": {}, "step": 8}, path)
    path.write_bytes(b"\0" * 10)
    (port,) = free_ports(1)
    script = Path(__file__).with_name("rank_resume.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(p)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, p in ((0, path), (1, tmp_path / "elsewhere" / "c.pt"))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert got == [{"rank": r, "step": 7, "source": str(previous_path(path)), "w": [0.0, 1.0, 2.0]} for r in (0, 1)]
    assert "falling back to the previous checkpoint" in outs[0][1] and outs[1][1] == ""
