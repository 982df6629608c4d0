"""``sparkbridge demo --images``: images end to end, on scikit-learn's handwritten digits.

The 1,797 digits that ship inside scikit-learn (8x8, 17 grey levels) are written out as PNG files,
a folder per class, upscaled to 32x32. Spark reads the folder
(:func:`sparkbridge.etl.images.read_images`, label from the path), splits it into train and test
by a hash of each file's path, and writes two MDS datasets with the PNG bytes still encoded. A small
CNN then trains on the train split through ``StreamingLoader(transform=...)``: the transform decodes
the PNGs (``torchvision.io.decode_png``) and applies a random shift, in ``--num-workers`` processes.
The test split is decoded without augmentation; ``summary.json`` holds the accuracy next to the
majority-class baseline's, and ``images.png`` the loss and accuracy curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from sparkbridge.errors import SparkbridgeError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["run_images_demo", "write_digit_pngs", "decode_digits", "augment_digits"]

log = logging.getLogger(__name__)

SIDE = 32  # the 8x8 digits upscaled 4x: a PNG a decoder has real work on
TEST_FRACTION_PER_10 = 2  # paths whose hash % 10 < 2 go to test (~20%)


def write_digit_pngs(folder: Path) -> int:
    """scikit-learn's digits as ``<folder>/<label>/<index>.png``; returns how many were written."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SparkbridgeError(f"demo --images needs scikit-learn (its digits data set): {exc}; "
                               "pip install scikit-learn (it is in sparkbridge's demo extra)") from None
    import numpy as np
    import torch
    from torchvision.io import encode_png

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    big = np.repeat(np.repeat(pixels, SIDE // 8, axis=1), SIDE // 8, axis=2)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for k, (img, label) in enumerate(zip(big, digits.target.tolist())):
        png = encode_png(torch.from_numpy(img)[None])  # [1, H, W] grey
        (folder / str(label) / f"{k:04d}.png").write_bytes(png.numpy().tobytes())
    return len(big)


def decode_digits(batch: dict) -> dict:
    """The test transform: PNG bytes -> float images in [0, 1], ``[B, 1, 32, 32]``."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    imgs = torch.stack([decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.GRAY)
                        for b in batch["image"]])
    return {"x": imgs.float().div_(255.0), "y": batch["label"]}


def augment_digits(batch: dict) -> dict:
    """The training transform: decode, then shift each image by up to 3 pixels (pad and crop)."""
    import torch
    import torch.nn.functional as F

    out = decode_digits(batch)
    x = F.pad(out["x"], (3, 3, 3, 3))
    b = x.shape[0]
    dy, dx = torch.randint(0, 7, (b,)), torch.randint(0, 7, (b,))
    rows = (dy[:, None] + torch.arange(SIDE)[None, :])[:, None, :, None].expand(b, 1, SIDE, SIDE + 6)
    x = torch.gather(x, 2, rows)
    cols = (dx[:, None] + torch.arange(SIDE)[None, :])[:, None, None, :].expand(b, 1, SIDE, SIDE)
    out["x"] = torch.gather(x, 3, cols)
    return out


def _model() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _etl(spark: "SparkSession", pngs: Path, out: Path) -> dict:
    from pyspark.sql import functions as F

    from sparkbridge.etl import write_mds
    from sparkbridge.etl.images import read_images

    df = read_images(spark, str(pngs), label_pattern=r"^(\d)/", label_type="int")
    df = df.withColumn("_split", F.pmod(F.hash("path"), F.lit(10)))
    train = df.where(F.col("_split") >= TEST_FRACTION_PER_10).drop("_split")
    test = df.where(F.col("_split") < TEST_FRACTION_PER_10).drop("_split")
    written = {}
    for name, part in (("train", train), ("test", test)):
        result = write_mds(part.select("image", "label"), str(out / name), mode="overwrite", shard_size="1MB")
        written[name] = result.rows
    return written


def _evaluate(model: Any, root: str, batch_size: int, workers: int) -> tuple[float, int, list[int]]:
    import torch

    from sparkbridge.bridge import StreamingLoader

    loader = StreamingLoader(root, batch_size=batch_size, num_workers=workers, transform=decode_digits)
    correct, seen, counts = 0, 0, [0] * 10
    model.eval()
    with torch.no_grad():
        for b in loader:
            pred = model(b["x"]).argmax(1)
            correct += int((pred == b["y"]).sum())
            seen += int(b["y"].numel())
            for v in b["y"].tolist():
                counts[v] += 1
    loader.close()
    model.train()
    return correct / max(seen, 1), seen, counts


def run_images_demo(args: argparse.Namespace, *, spark: Optional["SparkSession"] = None) -> int:
    import torch

    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.jobs.spark import spark_session

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pngs = out / "digits"
    images = write_digit_pngs(pngs)
    log.info("wrote %d digit PNGs under %s", images, pngs)
    created = False
    if spark is None:
        spark, created = spark_session(args.master, remote=getattr(args, "remote", None),
                                       app_name="sparkbridge-demo-images")
    try:
        written = _etl(spark, pngs, out / "mds")
    finally:
        if created:
            spark.stop()
    if written["train"] + written["test"] != images:
        raise SparkbridgeError(f"the ETL wrote {written} rows for {images} images")
    log.info("Spark wrote %d train and %d test images as MDS (PNG bytes)", written["train"], written["test"])

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.torch_threads))
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = min(args.batch_size, 256)
    loader = StreamingLoader(str(out / "mds" / "train"), batch_size=batch, shuffle=True, seed=args.seed,
                             num_workers=args.num_workers, transform=augment_digits)
    history: dict[str, list] = {"epoch": [], "loss": [], "test_accuracy": []}
    t_train = time.perf_counter()
    trained = 0
    for epoch in range(args.epochs):
        losses = []
        for b in loader:
            loss = torch.nn.functional.cross_entropy(model(b["x"]), b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            trained += int(b["y"].numel())
        acc, _, _ = _evaluate(model, str(out / "mds" / "test"), batch, args.num_workers)
        history["epoch"].append(epoch + 1)
        history["loss"].append(sum(losses) / len(losses))
        history["test_accuracy"].append(acc)
        log.info("epoch %d: mean loss %.3f, test accuracy %.3f", epoch + 1, history["loss"][-1], acc)
    train_seconds = time.perf_counter() - t_train
    loader.close()
    accuracy, test_rows, counts = _evaluate(model, str(out / "mds" / "test"), batch, args.num_workers)
    baseline = max(counts) / max(test_rows, 1)
    plot = out / "images.png"
    _plot(history, baseline, plot)
    summary = {
        "demo": "images",
        "images": images,
        "rows_train": written["train"],
        "rows_test": written["test"],
        "epochs": args.epochs,
        "num_workers": args.num_workers,
        "images_trained": trained,
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(trained / train_seconds, 1) if train_seconds > 0 else None,
        "test_accuracy": round(accuracy, 4),
        "majority_baseline_accuracy": round(baseline, 4),
        "history": history,
        "plot": str(plot),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("test accuracy %.3f vs %.3f for the majority class; wrote %s and %s", accuracy, baseline,
             out / "summary.json", plot)
    return 0


def _plot(history: dict, baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(history["epoch"], history["loss"], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean training loss")
    ax_acc.plot(history["epoch"], history["test_accuracy"], marker="o", label="CNN")
    ax_acc.axhline(baseline, color="grey", linestyle="--", label="majority class")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(loc="lower right")
    fig.suptitle("sparkbridge demo --images: digits PNGs, Spark -> MDS -> transform stage -> CNN", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
