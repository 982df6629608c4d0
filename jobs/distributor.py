"""Train from a notebook with pyspark's ``TorchDistributor``: ``sparkbridge train`` on N ranks, launched by Spark.

Why: on Databricks (and any Spark cluster) the way to run torchrun from a notebook is pyspark's own
launcher, :class:`pyspark.ml.torch.distributor.TorchDistributor`: ``local_mode=True`` starts the ranks
on the driver, ``local_mode=False`` in barrier tasks on the executors. It works from a classic and a
Spark Connect session. Each rank runs :func:`sparkbridge.jobs.train.main` -- the very function
``torchrun jobs/train.py`` runs -- so every rank streams its own disjoint, equal share of the dataset
(Mosaic's partitioning by rank), DDP keeps them in step, and ``--out``/``--checkpoint`` behave the same.

    from sparkbridge.jobs.distributor import train_with_torch_distributor
    train_with_torch_distributor(["--data", "/Volumes/x/flights/train", "--label", "delayed",
                                  "--out", "/Volumes/x/runs/1"], num_processes=2, local_mode=True)
"""

from __future__ import annotations

import argparse
from typing import NoReturn, Sequence

from sparkbridge.errors import SparkbridgeError, UsageError

__all__ = ["train_with_torch_distributor"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"train_with_torch_distributor: {message}")


def train_with_torch_distributor(argv: Sequence[str], *, num_processes: int = 2, local_mode: bool = True,
                                 use_gpu: bool = False) -> int:
    """Run ``sparkbridge train`` with ``argv`` on ``num_processes`` ranks through ``TorchDistributor``.

    Needs an active SparkSession (classic or Connect). ``argv`` is checked here first, so a typo fails
    before any rank starts. Returns rank 0's exit code (0); a failed rank raises
    :class:`~sparkbridge.errors.SparkbridgeError` naming the failure.
    """
    from sparkbridge.jobs.train import add_train_arguments, main

    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise UsageError(f"num_processes must be an int >= 1, got {num_processes!r}")
    argv = [str(a) for a in argv]
    parser = _Parser(prog="sparkbridge train", add_help=False)
    add_train_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.parse_args(argv)

    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is None:
        raise UsageError("train_with_torch_distributor needs an active SparkSession (TorchDistributor launches "
                         "the ranks through it): start one first, or run `torchrun -m sparkbridge.jobs.train`")
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    try:
        code = distributor.run(main, argv)
    except SparkbridgeError:
        raise
    except Exception as exc:  # torchrun's or a barrier task's failure, as pyspark reports it
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "Error" in line), lines[0] if lines else type(exc).__name__)
        raise SparkbridgeError(f"training under TorchDistributor ({num_processes} process(es), "
                               f"local_mode={local_mode}) failed: {detail}") from None
    if code not in (0, None):
        raise SparkbridgeError(f"training under TorchDistributor exited with code {code} on rank 0 (each rank's "
                               "error line is in the ranks' output above)")
    return 0
