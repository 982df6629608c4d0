"""``sparkbridge train`` / ``torchrun jobs/train.py``: a small MLP streamed from an MDS dataset.

    torchrun --nproc_per_node=2 jobs/train.py --data DIR --label arr_delay [--features a,b,c] --out runs/1

* Inputs and a regression target are standardized with the dataset's own mean and std, computed in
  one streaming pass before training (:mod:`jobs.standardize`; no collect, NaN-aware); losses are
  reported in standardized units and in the target's own units.
* Every rank builds its own ``bridge.StreamingLoader`` (Mosaic gives each a disjoint, equal share);
  the model is wrapped in DistributedDataParallel when the world has more than one rank.
* ``--checkpoint PATH`` saves model, optimizer, loader state and the statistics (rank 0, atomically,
  the previous one kept as ``PATH.prev``); a rerun resumes exactly where the last checkpoint
  stopped: the same remaining samples in the same order. Rank 0 decides from which checkpoint and
  broadcasts it (:mod:`jobs.checkpoint`). ``--max-steps`` counts the steps of this run.
* ``--out DIR`` gets ``metrics.jsonl`` (one JSON object per ``--log-every`` steps, per epoch and per
  evaluation), ``training.png`` and ``summary.json``; ``--eval DATA`` evaluates on another dataset
  with the same standardization and writes ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from sparkbridge.errors import CheckpointError, DatasetNotFoundError, SchemaError, UsageError

__all__ = ["add_train_arguments", "run_train", "main", "METRICS_BASENAME"]

log = logging.getLogger("sparkbridge.train")

METRICS_BASENAME = "metrics.jsonl"
_NUMERIC = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "int", "float16", "float32", "float64")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root: a local folder or s3://bucket/prefix")
    parser.add_argument("--cache", "--local", dest="local", default=None,
                        help="local cache folder for a remote dataset (--cache: torchrun takes --local for its own "
                             "--local-addr)")
    parser.add_argument("--label", required=True, help="label column")
    parser.add_argument("--features", default=None,
                        help="comma-separated feature columns (default: every fixed-width numeric column "
                             "except the label and null masks)")
    parser.add_argument("--task", choices=("auto", "regression", "binary"), default="auto",
                        help="loss: MSE (regression) or BCE (binary); auto picks binary for bool labels")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per batch per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=9176)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the model is tiny; on 2 cores 2 threads measured "
                             "10x slower per step)")
    parser.add_argument("--checkpoint", default=None, help="save/resume model, optimizer and loader state here")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this run")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write metrics.jsonl, training.png, summary.json (and eval.json) here")
    parser.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl record (default 10)")
    parser.add_argument("--eval", default=None, metavar="DATA",
                        help="after training, evaluate on this dataset (same columns and standardization)")
    parser.add_argument("--eval-cache", dest="eval_local", default=None,
                        help="local cache folder for a remote --eval dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


add_arguments = add_train_arguments


# --------------------------------------------------------------------------- checks before any work


def _check_options(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "hidden", "checkpoint_every", "log_every", "torch_threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    for option, root in (("--data", args.data), ("--eval", args.eval)):
        if root is None or "://" in root and not root.startswith("file://"):
            continue
        path = root[len("file://"):] if root.startswith("file://") else root
        if not os.path.isdir(path):
            raise DatasetNotFoundError(f"{option} {root}: no such folder (give a dataset written by "
                                       "`sparkbridge convert`, or an s3://bucket/prefix URL)")
        if not os.path.isfile(os.path.join(path, "index.json")):
            raise DatasetNotFoundError(f"{option} {root}: no index.json there: not an MDS dataset, or its write "
                                       "never committed")


def _columns(loader_cls: Any, args: argparse.Namespace) -> tuple[list[str], bool]:
    """(feature columns, whether the label is bool), checked against the dataset's columns."""
    probe = loader_cls(args.data, local=args.local, batch_size=1)
    try:
        plan = probe.plan
        available = list(plan.available)
        if args.label not in available:
            raise SchemaError(f"--label {args.label!r}: {args.data} has no such column; it has {available}")
        label_bool = any(args.label in blk.names and blk.as_bool for blk in plan.blocks)
        if args.features:
            feats = [f.strip() for f in args.features.split(",") if f.strip()]
            unknown = [f for f in feats if f not in available]
            if unknown:
                raise SchemaError(f"--features: {args.data} has no column(s) {unknown}; it has {available}")
            if args.label in feats:
                raise UsageError(f"--features lists the label {args.label!r}; a model must not see its target")
            return feats, label_bool
        masks = {n for n in available if n.endswith("__null")}
        feats = [n for n in available if n != args.label and n not in masks and plan.encodings[n] in _NUMERIC]
    finally:
        probe.close()
    if not feats:
        raise SchemaError(f"{args.data} has no numeric feature columns besides {args.label!r} (it has {available}); "
                          "name them with --features")
    log.info("features default to every numeric column except the label: %s", feats)
    return feats, label_bool


# --------------------------------------------------------------------------- the job


def run_train(args: argparse.Namespace) -> int:
    _check_options(args)

    import torch
    import torch.distributed as dist
    from torch import nn

    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.jobs.checkpoint import resume_for_all_ranks, save_checkpoint
    from sparkbridge.jobs.loop import fit
    from sparkbridge.jobs.model import mlp
    from sparkbridge.jobs.standardize import Standardization, compute_standardization, feature_names

    torch.set_num_threads(args.torch_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = world > 1
    created_group = False
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_group = True
    rank = dist.get_rank() if distributed else 0
    loaders: list[Any] = []
    guard = None
    if distributed:
        from sparkbridge.jobs.cli import error_line
        from sparkbridge.jobs.rank_failure import RankGuard, default_store

        guard = RankGuard(rank=rank, store=default_store(), message=lambda exc: error_line(exc)[0]).__enter__()
    failed = False
    try:
        features, label_bool = _columns(StreamingLoader, args)
        task = args.task if args.task != "auto" else ("binary" if label_bool else "regression")
        ckpt_path = Path(args.checkpoint) if args.checkpoint else None
        config = {"features": features, "label": args.label, "task": task, "hidden": args.hidden}

        def same_config(state: dict) -> None:
            if state.get("config") != config:
                raise CheckpointError(f"{ckpt_path} was written for {state.get('config')}, this run has {config}: "
                                      "use another --checkpoint, or the options it was written with")

        state, source = resume_for_all_ranks(ckpt_path, validate=same_config,
                                             device=device if device.type == "cuda" else None)
        torch.manual_seed(args.seed)

        def loader_for(root: str, local: Optional[str], *, shuffle: bool, batch_size: int,
                       pad_ranks: bool = True) -> Any:
            loader = StreamingLoader(root, local=local, batch_size=batch_size, shuffle=shuffle, seed=args.seed,
                                     features=features, label=args.label, num_workers=args.num_workers,
                                     device=device, pad_ranks=pad_ranks)
            loaders.append(loader)
            return loader

        loader = loader_for(args.data, args.local, shuffle=True, batch_size=args.batch_size)
        if state is not None:
            stats = Standardization.from_dict(state["standardization"])
        else:
            # One pass of the training loader itself (order does not matter for sums), then back to
            # the start of epoch 0: no second Mosaic dataset, and the same shards stay cached.
            stats = _statistics(loader, features=features, label=args.label, task=task,
                                compute=compute_standardization, names=feature_names,
                                progress=not args.no_progress and rank == 0, announce=rank == 0)
            loader.set_epoch(0)
        width = loader.plan.blocks[0].shape[0]
        model: nn.Module = mlp(width, hidden=args.hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            step = int(state["step"])
            if rank == 0:
                log.info("resumed from %s at step %d (epoch %d, sample %d of it)", source, step,
                         state["loader"]["epoch"], state["loader"]["sample_in_epoch"])
        inner = model
        if distributed:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        where = _where(rank, world, device, len(loader))
        log.info("rank %d of %d on %s (pid %d, %s): %d batches of %d per epoch from %s", rank, world,
                 where["host"], where["pid"], device, where["batches_per_epoch"], args.batch_size, args.data)
        loss_fn = nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()
        scale = stats.loss_scale if task == "regression" else 1.0
        out = Path(args.out) if args.out and rank == 0 else None
        metrics = _Metrics(out, every=args.log_every, world=world, scale=scale) if out else None

        def train_step(batch: Any, epoch: int) -> tuple[float, int]:
            x, y = batch
            x = stats.apply(x.float())
            y = y.float().reshape(-1, 1)
            ok = torch.isfinite(y).reshape(-1)
            if task == "regression":
                y = stats.apply_target(y)
            pred = model(x)
            # every rank runs forward and backward on every step (even on a batch without a finite
            # label) so DDP's gradient all-reduce stays in step
            loss = loss_fn(pred[ok], y[ok]) if bool(ok.any()) else pred.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach()), int(ok.sum())

        def save(at_step: int) -> None:
            if ckpt_path is not None and rank == 0:
                save_checkpoint({"model": inner.state_dict(), "optimizer": opt.state_dict(),
                                 "loader": loader.state_dict(), "step": at_step,
                                 "standardization": stats.to_dict(), "config": config}, ckpt_path)

        def on_step(record: Any) -> None:
            if record.step % args.checkpoint_every == 0:
                save(record.step)
            if metrics is not None:
                metrics.step(record)

        def on_epoch_end(epoch: int, result: Any) -> None:
            if rank == 0:
                last = [v for v, e in zip(result.history["loss"], result.history["epoch"]) if e == epoch + 1]
                mean = sum(last) / len(last) if last else float("nan")
                log.info("epoch %d: mean %s loss %.5f (standardized), %.5g in the target's units", epoch + 1,
                         task, mean, mean * scale)
            if metrics is not None:
                metrics.epoch(epoch, result)

        model.train()
        result = fit(loader, train_step, epochs=args.epochs, start_step=step, max_steps=args.max_steps,
                     on_step=on_step, on_epoch_end=on_epoch_end, progress=not args.no_progress and rank == 0)
        save(result.last_step)
        ranks = _gather(where | {"rows": result.rows, "steps": result.steps}, distributed)
        evaluation = None
        if args.eval:
            evaluation = _evaluate(inner, loader_for(args.eval, args.eval_local, shuffle=False,
                                                     batch_size=max(args.batch_size, 4096), pad_ranks=False),
                                   stats=stats, task=task, progress=not args.no_progress and rank == 0)
            evaluation["data"] = args.eval
        if rank == 0:
            final = result.final_loss()
            log.info("trained %d steps in this run (%d in all), %d rows on this rank in %.1fs (%.0f rows/s per rank, "
                     "%.0f%% of the time waiting for data); final loss %.5f standardized, %.5g in the target's units",
                     result.steps, result.last_step, result.rows, result.seconds, result.rows_per_second,
                     100 * result.wait_share, final, final * scale)
            if evaluation is not None:
                log.info("eval on %s: %s", args.eval, {k: v for k, v in evaluation.items() if k != "data"})
            if out is not None:
                _write_outputs(out, metrics, result, evaluation, stats=stats, task=task, scale=scale,
                               ranks=ranks, args=args, source=source, features=features)
        return 0
    except BaseException as exc:
        # No collective after a failure: this rank posts its error (or names the rank whose failure
        # broke this one's collective) and leaves; the others learn of it within seconds.
        failed = True
        if guard is None:
            raise
        explained = guard.explain(exc)
        if explained is exc:
            raise
        raise explained from exc
    finally:
        try:
            for loader in loaders:
                loader.close()
            if created_group and not failed:
                dist.barrier()
                dist.destroy_process_group()
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)


# --------------------------------------------------------------------------- pieces


def _statistics(loader: Any, *, features: list[str], label: str, task: str, compute: Any, names: Any,
                progress: bool, announce: bool) -> Any:
    from tqdm.auto import tqdm

    expanded = names(loader.plan.feature_parts)
    with tqdm(total=len(loader), desc="statistics", unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        stats = compute(loader, features=expanded, target=label, standardize_target=task == "regression",
                        progress=lambda rows: bar.update(1))
    if announce:
        log.info("standardization from %d rows: %d feature(s)%s", stats.rows, len(expanded),
                 f", target {label!r} mean {stats.target_mean:.6g} std {stats.target_std:.6g}"
                 if task == "regression" else "")
    return stats


def _where(rank: int, world: int, device: Any, batches: int) -> dict[str, Any]:
    return {"rank": rank, "world": world, "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(device), "batches_per_epoch": batches}


def _gather(obj: dict[str, Any], distributed: bool) -> list[dict[str, Any]]:
    if not distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _evaluate(model: Any, loader: Any, *, stats: Any, task: str, progress: bool) -> dict[str, Any]:
    """Loss on ``loader`` (every rank its share, summed over ranks) in both units. ``loader`` has
    ``pad_ranks=False``: each row counts once (no collective per batch, so ranks may take
    different numbers of batches)."""
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # rows, squared error / BCE sum, abs error / correct, -
    with torch.no_grad():
        for x, y in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True):
            y = y.float().reshape(-1, 1)
            ok = torch.isfinite(y).reshape(-1)
            pred = model(stats.apply(x.float()))[ok]
            y = y[ok]
            if task == "regression":
                err = pred - stats.apply_target(y)
                sums += torch.tensor([ok.sum().item(), float((err ** 2).sum()), float(err.abs().sum()), 0.0],
                                     dtype=torch.float64)
            else:
                bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, y, reduction="sum")
                correct = ((pred > 0).float() == y).sum()
                sums += torch.tensor([ok.sum().item(), float(bce), float(correct), 0.0], dtype=torch.float64)
    model.train()
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dev = sums.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(dev)
            sums = dev.cpu()
        else:
            dist.all_reduce(sums)
    rows = int(sums[0])
    if rows == 0:
        raise SchemaError(f"{loader.dataset.source}: no row with a finite label to evaluate on")
    if task == "regression":
        mse = float(sums[1]) / rows
        return {"rows": rows, "mse": mse, "mse_original": mse * stats.loss_scale,
                "rmse_original": (mse * stats.loss_scale) ** 0.5, "mae_original": float(sums[2]) / rows * stats.target_std}
    return {"rows": rows, "bce": float(sums[1]) / rows, "accuracy": float(sums[2]) / rows}


class _Metrics:
    """metrics.jsonl on rank 0: one record per ``every`` steps of the loop, plus epochs and evals."""

    def __init__(self, out: Path, *, every: int, world: int, scale: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_BASENAME
        self.every, self.world, self.scale = every, world, scale
        self._window: list[Any] = []
        self._file = open(self.path, "a", encoding="utf-8")  # a resumed run continues the file

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def step(self, rec: Any) -> None:
        self._window.append(rec)
        if len(self._window) >= self.every:
            self.flush()

    def flush(self) -> None:
        w, self._window = self._window, []
        if not w:
            return
        seconds = sum(r.seconds for r in w)
        rows = sum(r.rows for r in w)
        loss = sum(r.loss for r in w) / len(w)
        self.write({"kind": "train", "step": w[-1].step, "epoch": w[-1].epoch, "steps": len(w),
                    "loss": loss, "loss_original": loss * self.scale, "rows": rows * self.world,
                    "seconds": seconds, "rows_per_s": rows * self.world / seconds if seconds > 0 else 0.0,
                    "data_wait_share": sum(r.wait_seconds for r in w) / seconds if seconds > 0 else 0.0,
                    "time": time.time()})

    def epoch(self, epoch: int, result: Any) -> None:
        self.flush()
        losses = [v for v, e in zip(result.history["loss"], result.history["epoch"]) if e == epoch + 1]
        mean = sum(losses) / len(losses) if losses else float("nan")
        self.write({"kind": "epoch", "epoch": epoch, "step": result.last_step, "loss": mean,
                    "loss_original": mean * self.scale, "time": time.time()})

    def close(self) -> None:
        self.flush()
        self._file.close()


def _write_outputs(out: Path, metrics: Optional[_Metrics], result: Any, evaluation: Optional[dict], *, stats: Any,
                   task: str, scale: float, ranks: list, args: argparse.Namespace, source: Any,
                   features: list[str]) -> None:
    from sparkbridge.jobs.plotting import plot_training

    if metrics is not None:
        if evaluation is not None:
            metrics.write({"kind": "eval", "step": result.last_step, **evaluation, "time": time.time()})
        metrics.close()
    if evaluation is not None:
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    records = [json.loads(line) for line in (out / METRICS_BASENAME).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        history = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
                   "rows": [r["rows"] for r in train], "seconds": [r["seconds"] for r in train],
                   "epoch": [r["epoch"] for r in train]}
        plot_training(history, out / "training.png", loss_label=f"{'MSE' if task == 'regression' else 'BCE'} "
                      "(standardized)", title=f"sparkbridge train: {args.data}")
    final = result.final_loss()
    summary = {
        "data": args.data, "label": args.label, "features": features, "task": task,
        "steps_this_run": result.steps, "steps_total": result.last_step, "rows_this_run": result.rows * len(ranks),
        "seconds": round(result.seconds, 3), "rows_per_s": result.rows * len(ranks) / result.seconds if result.seconds else 0.0,
        "data_wait_share": result.wait_share, "final_loss": final, "final_loss_original": final * scale,
        "standardization": stats.to_dict(), "resumed_from": str(source) if source else None,
        "ranks": ranks, "eval": evaluation,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


run = run_train


def main(argv: Optional[list[str]] = None) -> int:
    """torchrun entry: the same options, errors and exit codes as ``sparkbridge train``."""
    from sparkbridge.jobs.cli import Parser, configure_logging, run_command

    parser = Parser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level and show tracebacks")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_command("jobs/train.py", run_train, args, verbose=args.verbose)


if __name__ == "__main__":  # torchrun jobs/train.py (or torchrun -m sparkbridge.jobs.train)
    sys.exit(main())
