"""The ETL job: CSV/Parquet → (select, features) → MDS dataset, as ``spark-submit jobs/etl.py`` or ``sparkbridge convert``.

Both entries parse the same options and run :func:`convert`. Under spark-submit the master comes
from spark-submit (``--master`` here only when given); ``sparkbridge convert`` defaults to
``local[*]``. On a cluster the driver ships its copy of the ``etl`` package to the executors
(``addPyFile``), so the executors run exactly the writer the driver planned with.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

from sparkbridge.errors import DatasetExistsError, SchemaError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["add_convert_arguments", "run_convert", "convert", "add_features", "preflight", "build_session", "main"]

log = logging.getLogger("sparkbridge.convert")


# --------------------------------------------------------------------------- arguments


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("csv", "parquet"), help="input format (default: from the extension)")
    parser.add_argument("--schema", help="input schema as DDL, e.g. 'id INT, name STRING' (CSV default: inferred)")
    parser.add_argument("--mode", choices=("error", "overwrite", "append"), default="error",
                        help="when OUTPUT already holds a dataset (default: error)")
    parser.add_argument("--nulls", choices=("error", "fill", "mask"), default="error",
                        help="null values: fail naming the columns, fill per type, or add <col>__null masks")
    parser.add_argument("--bad-records", default="fail", metavar="fail|drop|DIR",
                        help="malformed CSV rows: fail (default), drop and count, or keep them in folder DIR")
    parser.add_argument("--select", nargs="+", metavar="COL",
                        help="columns to keep, in this order (names, or comma-separated lists)")
    parser.add_argument("--features", nargs="+", metavar="COL",
                        help="numeric columns packed into one fixed-shape array column (a model's input); "
                             "a row with a null feature gets a null array, handled by --nulls; "
                             "without --select the feature columns themselves are not kept")
    parser.add_argument("--features-name", default="features", help="name of that column (default: features)")
    parser.add_argument("--features-dtype", choices=("float32", "float64"), default="float32",
                        help="element type of the features array (default float32, what models take)")
    parser.add_argument("--compression", default="zstd", help="shard compression, e.g. zstd, zstd:7, none")
    parser.add_argument("--hashes", default="xxh64", help="comma-separated shard hashes (default xxh64; 'none')")
    parser.add_argument("--shard-size", default="64MB", help="uncompressed shard size limit (default 64MB)")
    parser.add_argument("--decimals", choices=("string", "float"), default="string",
                        help="decimal columns as exact strings (default) or float64")
    parser.add_argument("--commit", choices=("job", "partition"), default="job",
                        help="commit the whole job at its end (default), or each partition as soon as it is "
                             "written, so `StreamingLoader(..., follow=True)` trains while the job runs")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="WRITE_ID",
                        help="with --commit partition: finish the open write a failed run left (same input): the "
                             "one named (its error says which), or without WRITE_ID the only open write")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (last line of stdout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """``sparkbridge convert INPUT OUTPUT [options]``."""
    parser.add_argument("input", metavar="INPUT", help="CSV/Parquet file, folder or glob")
    parser.add_argument("output", metavar="OUTPUT", help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--master", default="local[*]", help="Spark master URL (default local[*])")
    _add_common(parser)


def _submit_parser() -> argparse.ArgumentParser:
    from sparkbridge.jobs.cli import Parser

    parser = Parser(
        prog="spark-submit jobs/etl.py", description="Convert CSV/Parquet into an MDS dataset (exactly once)."
    )
    parser.add_argument("--input", required=True, help="CSV/Parquet file, folder or glob")
    parser.add_argument("--output", required=True, help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--master", default=None, help="override spark-submit's master (normally not needed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    _add_common(parser)
    return parser


def _columns(select: Optional[Sequence[str]], *, option: str = "--select") -> Optional[list[str]]:
    if not select:
        return None
    cols = [c.strip() for item in select for c in item.split(",") if c.strip()]
    if len(set(cols)) != len(cols):
        raise UsageError(f"{option} names a column twice: {cols}")
    return cols


def add_features(df: Any, columns: Sequence[str], *, name: str, dtype: str) -> Any:
    """``df`` plus column ``name``: the listed numeric columns as one array (null if any is null).

    Why null and not NaN: a missing feature must meet the ``--nulls`` policy (error, fill, mask),
    never become a silent NaN inside a tensor.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    fields = {f.name: f for f in df.schema.fields}
    for col in columns:
        if col not in fields:
            raise SchemaError(f"--features: no column {col!r}; the input has {df.columns}")
        if not isinstance(fields[col].dataType, NumericType):
            raise SchemaError(f"--features: column {col!r} is {fields[col].dataType.simpleString()}, not numeric")
    if name in fields:
        raise SchemaError(f"--features-name {name!r} is already a column of the input; pick another name")
    element = "float" if dtype == "float32" else "double"
    values = [F.col(c).cast(element) for c in columns]
    any_null = functools.reduce(lambda a, b: a | b, [F.col(c).isNull() for c in columns])
    return df.withColumn(name, F.when(any_null, F.lit(None)).otherwise(F.array(*values)))


def _conf_pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--conf expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------- the job


def _ship_etl_package(spark: "SparkSession") -> str:
    """Zip this driver's Spark-side code (``sparkbridge`` with ``etl``, ``format``, ``storage``, the
    errors; never ``bridge`` or ``jobs``) and add it to the executors' Python path, so executors run
    exactly the writer the driver planned with. Returns the zip's path, which the caller deletes once
    the session stopped (executors fetch it from the driver's file server at their first task)."""
    import tempfile
    import zipfile

    import sparkbridge
    import sparkbridge.etl

    roots = [(sparkbridge.__path__[0], "sparkbridge", ("bridge", "etl", "jobs")),
             (sparkbridge.etl.__path__[0], "sparkbridge/etl", ())]
    fd, zpath = tempfile.mkstemp(prefix="sparkbridge-etl-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, arcroot, skip in roots:
            for folder, dirs, files in os.walk(root):
                if folder == root:
                    dirs[:] = [d for d in dirs if d not in skip]
                for name in files:
                    if name.endswith(".py"):
                        full = os.path.join(folder, name)
                        zf.write(full, f"{arcroot}/{os.path.relpath(full, root)}".replace(os.sep, "/"))
    spark.sparkContext.addPyFile(zpath)
    log.info("shipped the Spark side of sparkbridge to the executors (%s)", zpath)
    return zpath


def build_session(*, master: Optional[str], conf: dict[str, str], app_name: str = "sparkbridge-convert",
                  verbose: bool = False) -> "SparkSession":
    """A SparkSession for the job (:func:`jobs.spark.spark_session`); ``master=None`` keeps what
    spark-submit configured. Executors get the driver's S3 settings with each write's tasks
    (:mod:`sparkbridge.etl.credentials`), not through ``spark.executorEnv``, where Spark's redaction
    leaves ``AWS_ACCESS_KEY_ID`` readable."""
    from sparkbridge.jobs.spark import spark_session

    spark, _ = spark_session(master, app_name=app_name, conf=dict(conf), verbose=verbose)
    return spark


def convert(spark: "SparkSession", args: argparse.Namespace, *, progress: bool = True) -> Any:
    """Read ``args.input``, keep ``--select`` columns, write ``args.output``; returns the WriteResult."""
    from sparkbridge import etl
    columns = _columns(args.select)
    features = _columns(getattr(args, "features", None), option="--features")
    compression = None if str(args.compression).lower() in ("none", "") else args.compression
    hashes = tuple(h.strip() for h in str(args.hashes).split(",") if h.strip() and h.strip().lower() != "none")
    from sparkbridge.jobs.progress import SparkProgress

    with SparkProgress(spark, enabled=progress) as bar:
        with bar.phase("read"):
            log.info("reading %s", args.input)
            df = etl.read_source(spark, args.input, format=args.format, schema=args.schema,
                                 bad_records=args.bad_records)
        if columns is not None:
            missing = [c for c in columns if c not in df.columns]
            if missing:
                raise SchemaError(f"--select: no column(s) {missing} in {args.input}; it has {df.columns}")
        if features:
            df = add_features(df, features, name=args.features_name, dtype=args.features_dtype)
            if columns is None:
                columns = [c for c in df.columns if c not in features and c != args.features_name]
            columns = columns + [args.features_name]
            log.info("features: %s → %s (%s array)", features, args.features_name, args.features_dtype)
        log.info("writing %s (mode=%s, nulls=%s, compression=%s, hashes=%s, shard size %s)",
                 args.output, args.mode, args.nulls, compression, list(hashes), args.shard_size)
        with bar.phase("write"):
            return etl.write_mds(
                df,
                args.output,
                mode=args.mode,
                columns=columns,
                nulls=args.nulls,
                compression=compression,
                hashes=hashes,
                shard_size=args.shard_size,
                decimals=args.decimals,
                commit=getattr(args, "commit", "job"),
                resume=getattr(args, "resume", False),
            )


def _summary(result: Any) -> str:
    mb = result.bytes / 1e6
    return (f"wrote {result.rows:,} rows in {result.shards} shards ({mb:,.1f} MB) to {result.out} "
            f"in {result.seconds:.1f} s ({result.rows_per_second:,.0f} rows/s)")


def preflight(args: argparse.Namespace) -> None:
    """Checks that need no Spark, so a typo fails in a second instead of after a JVM start.

    Raises FileNotFoundError for a missing local input and DatasetExistsError when ``--mode error``
    meets an existing dataset (write_mds checks both again; this is only the early answer).
    """
    from sparkbridge.etl.commit import WriteJob
    from sparkbridge.storage import is_remote, open_storage

    source = str(args.input)
    if not is_remote(source) and not any(ch in source for ch in "*?[{"):
        local = source[len("file://"):] if source.startswith("file://") else source
        if not os.path.exists(local):
            raise FileNotFoundError(f"input not found: {source}")
    if args.mode == "error" and not getattr(args, "resume", False):
        try:
            WriteJob(open_storage(str(args.output)), "error")
        except DatasetExistsError:
            raise DatasetExistsError(f"{args.output} already holds a dataset: pass --mode overwrite to replace it "
                                     "or --mode append to add to it") from None


def _run(args: argparse.Namespace, *, master: Optional[str]) -> int:
    """Check the options, then run the job; errors propagate to ``cli.run_command`` (one line, exit code)."""
    conf = _conf_pairs(args.conf)
    _columns(args.select)
    _columns(args.features, option="--features")
    preflight(args)  # a missing input or a refused write fails here, before a JVM starts
    spark = build_session(master=master, conf=conf, verbose=getattr(args, "verbose", False))
    shipped: Optional[str] = None
    try:
        if not spark.sparkContext.master.startswith("local"):
            shipped = _ship_etl_package(spark)
        result = convert(spark, args, progress=not args.no_progress)
    finally:
        spark.stop()
        if shipped is not None:
            with contextlib.suppress(OSError):
                os.unlink(shipped)
    print(_summary(result))
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    return _run(args, master=args.master)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """spark-submit entry: the same options, errors and exit codes as ``sparkbridge convert``."""
    from sparkbridge.jobs.cli import configure_logging, run_command

    args = _submit_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_command("spark-submit jobs/etl.py", lambda a: _run(a, master=a.master), args, verbose=args.verbose)


if __name__ == "__main__":  # spark-submit jobs/etl.py
    sys.exit(main())
