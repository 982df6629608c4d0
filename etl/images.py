"""A folder of images as a DataFrame ``(path, image, label)``: Spark's ``binaryFile`` source plus
a label taken from each file's path or from a CSV.

Why not ``binaryFile`` alone: a label is what makes images a training set, and the two usual
layouts are a folder per class (``cats/001.jpg``) and a CSV next to the images. Either way an image
without a label is a silent hole in the data, so it is refused naming the file (or dropped and
counted, with ``bad_records="drop"``). The bytes stay encoded (``jpeg``/``png``, ~10x smaller than
pixels); the loader's transform stage decodes them in parallel
(:mod:`sparkbridge.bridge.transform`). Plain DataFrame API: works on classic and Connect sessions.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional, Union

from sparkbridge.errors import MalformedRecordsError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["read_images", "IMAGE_SUFFIXES", "LABEL_TYPES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("png", "jpg", "jpeg")
LABEL_TYPES = ("string", "int")
_EXAMPLES = 5


def _glob(suffixes: tuple[str, ...]) -> str:
    # Hadoop's glob is case-sensitive: list both cases of each suffix
    names = sorted({s.lower() for s in suffixes} | {s.upper() for s in suffixes})
    return "*.{" + ",".join(names) + "}"


def _root_tail(path: str) -> str:
    """The root as it appears inside Spark's file URIs (``file:/abs/dir``, ``s3a://bucket/dir``)."""
    if "://" in path:
        return path.split("://", 1)[1].rstrip("/")
    if path.startswith("file:"):
        path = path[len("file:"):]
    return os.path.abspath(path).rstrip("/")


def _examples(df: "DataFrame", column: str = "path") -> str:
    rows = df.select(column).orderBy(column).limit(_EXAMPLES).collect()
    return ", ".join(repr(r[0]) for r in rows)


def read_images(
    spark: "SparkSession",
    path: Union[str, "os.PathLike[str]"],
    *,
    label_pattern: Optional[str] = None,
    labels: Optional[Union[str, "os.PathLike[str]"]] = None,
    label_type: str = "string",
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    bad_records: str = "fail",
) -> "DataFrame":
    """``path`` (string, relative to the folder), ``image`` (the file's bytes) and, with a label
    source, ``label`` (string, or int64 with ``label_type="int"``), for every image under ``path``.

    - ``label_pattern``: a regular expression with one group, searched in each file's path relative
      to the folder: ``r"^(\\w+)/"`` for a folder per class, ``r"_(\\d+)\\.png$"`` for a label in the
      name. Spark evaluates it (Java regex: the usual syntax).
    - ``labels``: a CSV with a header and columns ``path`` (relative to the folder) and ``label``.
    - ``bad_records``: ``"fail"`` (default) refuses images without a label (or with one that is not
      an int under ``label_type="int"``) naming up to 5 of them; ``"drop"`` drops them and logs how many.
    """
    from pyspark.sql import functions as F

    if spark is None:
        raise UsageError("read_images needs a SparkSession")
    root = os.fspath(path)
    if not isinstance(root, str) or not root:
        raise UsageError(f"read_images: path must be a non-empty string, got {path!r}")
    if label_pattern is not None and labels is not None:
        raise UsageError("read_images: pass label_pattern= or labels=, not both")
    if label_type not in LABEL_TYPES:
        raise UsageError(f"read_images: label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    if bad_records not in ("fail", "drop"):
        raise UsageError(f"read_images: bad_records must be 'fail' or 'drop', got {bad_records!r}")
    if label_pattern is not None:
        import re

        try:
            groups = re.compile(label_pattern).groups
        except re.error as exc:
            raise UsageError(f"read_images: label_pattern {label_pattern!r} is not a regular expression ({exc})") from None
        if groups != 1:
            raise UsageError(f"read_images: label_pattern must have exactly one group (the label), "
                             f"{label_pattern!r} has {groups}")
    if not suffixes or not all(isinstance(s, str) and s.isalnum() for s in suffixes):
        raise UsageError(f"read_images: suffixes are file extensions such as ('png', 'jpg'), got {suffixes!r}")

    reader = (spark.read.format("binaryFile").option("pathGlobFilter", _glob(tuple(suffixes)))
              .option("recursiveFileLookup", "true"))
    try:
        raw = reader.load(root)
        found = raw.limit(1).count()
    except Exception as exc:  # pyspark's AnalysisException: the path does not exist
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            raise FileNotFoundError(f"read_images: {root} does not exist") from None
        raise
    if not found:
        raise FileNotFoundError(f"read_images: no {'/'.join(suffixes)} files under {root}")
    tail = _root_tail(root)
    df = raw.select(
        F.regexp_extract("path", r"\Q" + tail + r"\E/(.+)$", 1).alias("path"),
        F.col("content").alias("image"),
    )
    if label_pattern is None and labels is None:
        return df

    if label_pattern is not None:
        df = df.withColumn("label", F.regexp_extract("path", label_pattern, 1))
        df = df.withColumn("label", F.when(F.col("label") == "", None).otherwise(F.col("label")))
        what = f"whose path does not match label_pattern {label_pattern!r}"
    else:
        csv = os.fspath(labels)
        try:
            table = spark.read.options(header="true").csv(csv)
            names = table.columns
        except Exception as exc:
            if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
                raise FileNotFoundError(f"read_images: labels file {csv} does not exist") from None
            raise
        if "path" not in names or "label" not in names:
            raise UsageError(f"read_images: {csv} must have a header with columns 'path' and 'label', has {names}")
        table = table.select(F.col("path").alias("_lpath"), F.col("label"))
        dup = table.groupBy("_lpath").count().where("count > 1")
        if dup.limit(1).count():
            raise MalformedRecordsError(f"{csv}: images listed more than once: {_examples(dup, '_lpath')}")
        df = df.join(table, df["path"] == table["_lpath"], "left").drop("_lpath")
        what = f"without a row in {csv}"

    if label_type == "int":
        df = df.withColumn("_raw_label", F.col("label")).withColumn("label", F.col("label").try_cast("long"))
        unparsed = df.where(F.col("_raw_label").isNotNull() & F.col("label").isNull())
        if unparsed.limit(1).count():
            message = (f"read_images: labels that are not ints under {root} (label_type='int'): "
                       + ", ".join(f"{r[0]!r}: {r[1]!r}" for r in unparsed.select("path", "_raw_label")
                                   .orderBy("path").limit(_EXAMPLES).collect()))
            if bad_records == "fail":
                raise MalformedRecordsError(message)
        df = df.drop("_raw_label")
    missing = df.where(F.col("label").isNull())
    n_missing = missing.count()
    if n_missing:
        message = f"read_images: {n_missing} image(s) under {root} {what}: {_examples(missing)}"
        if bad_records == "fail":
            raise MalformedRecordsError(message + " (bad_records='drop' drops them)")
        log.warning("%s; dropped", message)
        df = df.where(F.col("label").isNotNull())
    return df
