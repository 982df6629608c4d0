"""``sparkbridge train`` / ``torchrun jobs/train.py``: a small MLP streamed from an MDS dataset.

    torchrun --nproc_per_node=2 jobs/train.py --data DIR --label arr_delay [--features a,b,c]

Every rank builds its own ``bridge.StreamingLoader`` (Mosaic gives each a disjoint, equal share),
the model is wrapped in DistributedDataParallel when the world has more than one rank, and
``--checkpoint PATH`` saves model, optimizer and loader state (rank 0) so a killed run resumes
exactly where it stopped: the same remaining samples in the same order.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["add_train_arguments", "run_train", "main"]

log = logging.getLogger("sparkbridge.train")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root: a local folder or s3://bucket/prefix")
    parser.add_argument("--local", default=None, help="local cache folder for a remote dataset")
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
    parser.add_argument("--checkpoint", default=None, help="save/resume model, optimizer and loader state here")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


add_arguments = add_train_arguments


def _default_features(loader_cls: Any, args: argparse.Namespace) -> list[str]:
    probe = loader_cls(args.data, local=args.local, batch_size=1)
    plan = probe.plan
    masks = {n for n in plan.available if n.endswith("__null")}
    feats = []
    for name in plan.available:
        enc = plan.encodings[name]
        if name == args.label or name in masks:
            continue
        if enc in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "int",
                   "float16", "float32", "float64"):
            feats.append(name)
    probe.close()
    if not feats:
        raise SystemExit(f"sparkbridge train: {args.data} has no numeric feature columns besides {args.label!r}")
    log.info("features default to every numeric column except the label: %s", feats)
    return feats


def run_train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn
    from tqdm import tqdm

    from sparkbridge.bridge import StreamingLoader

    for name in ("epochs", "batch_size", "hidden", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"sparkbridge train: --{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise SystemExit("sparkbridge train: --batch-size must be at least 2 (the model uses BatchNorm)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device is None:
        log.info("device defaults to %s", device)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)

    features = [f for f in args.features.split(",") if f] if args.features else _default_features(StreamingLoader, args)
    loader = StreamingLoader(args.data, local=args.local, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                             features=features, label=args.label, num_workers=args.num_workers, device=device)
    label_bool = any(args.label in blk.names and blk.as_bool for blk in loader.plan.blocks)
    task = args.task if args.task != "auto" else ("binary" if label_bool else "regression")
    width = loader.plan.blocks[0].shape[0]
    model: nn.Module = nn.Sequential(
        nn.BatchNorm1d(width), nn.Linear(width, args.hidden), nn.ReLU(),
        nn.Linear(args.hidden, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    step = 0
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        step = int(ckpt["step"])
        log.info("resumed from %s at step %d (epoch %d, sample %d of it)", ckpt_path, step,
                 ckpt["loader"]["epoch"], ckpt["loader"]["sample_in_epoch"])
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()

    def save() -> None:
        if ckpt_path is None or rank != 0:
            return
        inner = model.module if distributed else model
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"model": inner.state_dict(), "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                    "step": step}, tmp)
        os.replace(tmp, ckpt_path)

    rows_total, t0, stopped = 0, time.perf_counter(), False
    start_epoch = loader.epoch
    for epoch in range(start_epoch, args.epochs):
        model.train()
        bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", disable=args.no_progress or rank != 0,
                   dynamic_ncols=True)
        loss_sum, loss_rows = 0.0, 0
        for x, y in loader:
            if x.shape[0] < 2:
                # BatchNorm cannot train on one row; every rank gets the same batch sizes (Mosaic
                # pads rank shares to equal length), so all ranks skip it together and DDP stays in step
                continue
            y = y.float().reshape(-1, 1)
            ok = torch.isfinite(y).all(dim=1) & torch.isfinite(x).all(dim=1)
            out = model(torch.nan_to_num(x))
            loss = loss_fn(out[ok], y[ok]) if bool(ok.any()) else out.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            rows_total += len(y)
            loss_sum += float(loss.detach()) * int(ok.sum())
            loss_rows += int(ok.sum())
            bar.update(1)
            if step % args.checkpoint_every == 0:
                save()
            if args.max_steps is not None and step >= args.max_steps:
                stopped = True
                break
        bar.close()
        mean = loss_sum / max(1, loss_rows)
        if rank == 0:
            log.info("epoch %d: mean %s loss %.5f over %d rows", epoch, task, mean, loss_rows)
        if stopped:
            break
    save()
    seconds = time.perf_counter() - t0
    if rank == 0:
        log.info("trained %d steps, %d rows on this rank in %.1fs (%.0f rows/s per rank)", step, rows_total, seconds,
                 rows_total / max(seconds, 1e-9))
    loader.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


run = run_train


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_train(args)


if __name__ == "__main__":  # torchrun jobs/train.py (or torchrun -m sparkbridge.jobs.train)
    sys.exit(main())
