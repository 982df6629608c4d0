"""``sparkbridge demo --images``: scikit-learn's digits as PNGs -> Spark -> MDS -> a CNN through the
transform stage (2 workers), every image written once and the model far above the majority class."""

from __future__ import annotations

import json

from sparkbridge.jobs.cli import build_parser
from sparkbridge.jobs.images_demo import run_images_demo


def test_images_demo_trains_far_above_the_majority_class(spark, tmp_path):
    args = build_parser().parse_args(["demo", "--images", "--out", str(tmp_path), "--epochs", "4",
                                      "--num-workers", "2", "--no-progress"])
    assert run_images_demo(args, spark=spark) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 1797
    assert summary["rows_train"] + summary["rows_test"] == 1797
    assert summary["images_trained"] == 4 * summary["rows_train"]
    assert summary["test_accuracy"] > summary["majority_baseline_accuracy"] + 0.5
    assert (tmp_path / "images.png").stat().st_size > 10_000
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
