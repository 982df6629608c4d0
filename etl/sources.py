"""Read CSV, JSON lines or Parquet into a DataFrame, with an explicit policy for malformed rows.

Why not plain ``spark.read.csv``: its PERMISSIVE default silently turns a malformed row into nulls
(data loss nobody sees), FAILFAST dies with a JVM traceback that does not name the file, and both
depend on which columns a later query selects (CSV column pruning parses only those). Here a row is
malformed when *any* column fails to parse or the field count is wrong, decided the same way no matter
what is selected later, and the caller chooses: fail with the file and line, drop and count, or keep
the rows in a folder for inspection.
"""

from __future__ import annotations

import gzip
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union
from urllib.parse import unquote, urlparse

from sparkbridge.errors import MalformedRecordsError, SchemaError, UnsupportedTypeError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

__all__ = ["read_source", "detect_format", "MalformedRecordsError", "FORMATS", "BAD_RECORD_POLICIES",
           "quote_column"]

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "json")
BAD_RECORD_POLICIES = ("fail", "drop")  # ... or a path: keep malformed rows there
#: How many malformed rows an error quotes.
MAX_EXAMPLES = 5
#: Line numbers are looked up only in local files up to this size (a driver-side scan).
_LINE_LOOKUP_MAX_BYTES = 256 << 20

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.deflate", ".csv.lz4", ".csv.snappy", ".csv.zst")
#: JSON lines (one record per line, Spark's default JSON layout)
_JSON_SUFFIXES = tuple(base + comp for base in (".json", ".jsonl", ".ndjson") for comp in ("", ".gz", ".bz2", ".zst"))
_PARQUET_SUFFIXES = (".parquet", ".pq")
#: Spark's defaults for CSV, spelled out (and logged) so the behaviour does not depend on its version.
_CSV_DEFAULTS = {"header": "true", "escape": '"', "encoding": "UTF-8"}
_JSON_DEFAULTS = {"encoding": "UTF-8"}
#: Parquet: every file's footer decides the schema. Spark's default takes one file's, and the columns
#: only other files hold are then dropped without a word (a folder whose later files gained a column).
_PARQUET_DEFAULTS = {"mergeSchema": "true"}


# --------------------------------------------------------------------------- files and formats


def _spark_error(exc: BaseException) -> tuple[Optional[str], str]:
    """(Spark's error condition, its message's first line without the JVM stack) of a pyspark
    error, classic (py4j) or Connect (gRPC) alike."""
    condition = None
    getter = getattr(exc, "getCondition", None) or getattr(exc, "getErrorClass", None)  # Spark 4 / 3.x
    if callable(getter):
        try:
            condition = getter()
        except Exception:  # noqa: BLE001 - an error without a condition
            condition = None
    java = getattr(exc, "java_exception", None)
    text = java.toString() if java is not None else str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return condition, first


def _list_input(spark: "SparkSession", path: str) -> list[str]:
    """Data files under ``path`` (a file, a folder read recursively, or a glob), as Spark would see them.

    Why through a DataFrame: Spark's own file index (the one its readers use, with every Hadoop
    filesystem the cluster has, hidden ``_``/``.`` files skipped) answers this on a classic and on a
    Spark Connect session alike, where no ``sparkContext``/JVM gateway exists in this process.
    ``inputFiles()`` lists files without running a job; ``binaryFile`` reads no content for it.
    Raises FileNotFoundError naming the path when nothing is there.
    """
    try:
        files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(path).inputFiles()
    except Exception as exc:  # pyspark's AnalysisException (classic or Connect), a py4j error
        condition, first = _spark_error(exc)
        if condition == "PATH_NOT_FOUND":
            raise FileNotFoundError(f"input not found: {path}") from None
        if "No FileSystem for scheme" in first or "UnsupportedFileSystemException" in first:
            scheme = urlparse(path).scheme
            raise ValueError(
                f"Spark cannot read {path!r}: no Hadoop filesystem for scheme {scheme!r}"
                + (" (S3 needs the hadoop-aws jars and an s3a:// URL)" if scheme in ("s3", "s3a") else "")
                + f" ({first})"
            ) from None
        raise ValueError(f"Spark cannot list {path!r}: {first}") from None
    return sorted(files)


def _format_of_name(name: str) -> Optional[str]:
    lower = name.lower()
    if lower.endswith(_CSV_SUFFIXES):
        return "csv"
    if lower.endswith(_JSON_SUFFIXES):
        return "json"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


def detect_format(path: str, files: list[str]) -> str:
    """``csv``, ``parquet`` or ``json`` from the file names under ``path``; a clear error when unclear."""
    if not files:
        raise FileNotFoundError(f"{path}: no data files (hidden '_'/'.' files are ignored)")
    found: dict[str, list[str]] = {}
    for f in files:
        lower = f.lower()
        if lower.endswith(".zip"):
            raise ValueError(f"{f}: Spark cannot read zip archives; extract it first (CSV may be .gz or .bz2)")
        found.setdefault(_format_of_name(f) or "unknown", []).append(f)
    if "unknown" in found:
        raise ValueError(
            f"{path}: cannot tell the format of {found['unknown'][0]} from its extension "
            f"(known: {', '.join(_CSV_SUFFIXES + _PARQUET_SUFFIXES + _JSON_SUFFIXES)}); "
            "pass format='csv', 'parquet' or 'json'"
        )
    if len(found) > 1:
        mixed = " and ".join(f"{fmt.upper() if fmt != 'parquet' else 'Parquet'} ({files[0]}, ...)"
                             for fmt, files in sorted(found.items()))
        raise ValueError(f"{path} mixes formats: {mixed}; read them separately")
    return next(iter(found))


# --------------------------------------------------------------------------- schema


def _to_struct(spark: "SparkSession", schema: Union[str, "StructType"]) -> "StructType":
    from pyspark.sql.types import StructType

    if isinstance(schema, StructType):
        return schema
    if not isinstance(schema, str):
        raise TypeError(f"schema must be a DDL string or a StructType, got {type(schema).__name__}")
    try:
        parsed = spark.createDataFrame([], schema).schema
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"invalid schema DDL {schema!r}: {first}") from None
    return parsed


def _check_parquet_schema(given: "StructType", actual: "StructType", path: str) -> None:
    """A requested column the files lack (or hold with another type) would otherwise read as nulls."""
    have = {f.name.lower(): f for f in actual.fields}
    for field in given.fields:
        got = have.get(field.name.lower())
        if got is None:
            raise ValueError(f"{path}: column {field.name!r} is not in the Parquet files; they have {actual.fieldNames()}")
        if got.dataType.simpleString() != field.dataType.simpleString():
            raise ValueError(
                f"{path}: column {field.name!r} is {got.dataType.simpleString()} in the Parquet files, "
                f"not {field.dataType.simpleString()}; cast it after reading instead"
            )


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of a Spark error, one line: the last ``Caused by:`` of its JVM stack
    (classic and Connect alike), else its first line."""
    _, first = _spark_error(exc)
    text = str(exc)
    java = getattr(exc, "java_exception", None)
    if java is not None:
        cause = java
        while cause.getCause() is not None:
            cause = cause.getCause()
        return cause.toString()
    causes = [line.strip()[len("Caused by:"):].strip() for line in text.splitlines()
              if line.strip().startswith("Caused by:")]
    return causes[-1] if causes else first


def _read_error(exc: BaseException, path: str, fmt: str) -> Exception:
    """Spark failing to read text files, as one line naming the file (Spark's message has it) and
    the innermost cause (a damaged gzip file, a permission), not a JVM stack."""
    _, first = _spark_error(exc)
    marker = "while reading file "
    where = first.split(marker, 1)[1].split(" ")[0].rstrip(".") if marker in first else path
    return ValueError(f"Spark cannot read {_local_file(where) or where} as {fmt.upper()}: {_root_cause(exc)}")


def _local_parquet_schemas(files: list[str]) -> list[tuple[str, Any]]:
    """(file, Arrow schema) of each listed Parquet file on local disk: footers only. Empty where a
    file is remote (its filesystem is Spark's, not this process's) or unreadable."""
    import pyarrow.parquet as pq

    out = []
    for url in files:
        local = _local_file(url)
        if local is None:
            return []
        try:
            out.append((local, pq.read_schema(local)))
        except (OSError, ValueError):
            return []
    return out


#: Arrow types Spark cannot read from Parquet, with the way out.
_UNREADABLE_HINTS = {
    "timestamp[ns]": "write it as microseconds (pyarrow: pq.write_table(..., coerce_timestamps='us', "
                     "allow_truncated_timestamps=True); pandas: df.to_parquet(..., coerce_timestamps='us')), "
                     "or set spark.sql.legacy.parquet.nanosAsLong=true on the session to read it as a long of "
                     "nanoseconds",
    "halffloat": "write it as float32",
}


def _unreadable_columns(schemas: list[tuple[str, Any]]) -> list[str]:
    found = []
    for local, schema in schemas:
        for field in schema:
            kind = "timestamp[ns]" if str(field.type).startswith("timestamp[ns") else str(field.type)
            if kind in _UNREADABLE_HINTS:
                found.append(f"{local}: column {field.name!r} ({kind}): {_UNREADABLE_HINTS[kind]}")
    return found


def _case_duplicates(schemas: list[tuple[str, Any]]) -> Optional[str]:
    for local, schema in schemas:
        seen: dict[str, str] = {}
        for name in schema.names:
            if name.lower() in seen and seen[name.lower()] != name:
                return f"{local}: columns {seen[name.lower()]!r} and {name!r}"
            seen[name.lower()] = name
    return None


def _type_clash(schemas: list[tuple[str, Any]]) -> Optional[str]:
    first_seen: dict[str, tuple[str, Any]] = {}
    for local, schema in schemas:
        for field in schema:
            if field.name not in first_seen:
                first_seen[field.name] = (local, field.type)
            elif first_seen[field.name][1] != field.type:
                other, kind = first_seen[field.name]
                return f"column {field.name!r} is {kind} in {other} and {field.type} in {local}"
    return None


def _parquet_error(exc: BaseException, path: str, files: list[str]) -> Exception:
    """Spark's refusal to read Parquet files, as an error naming the file and column (when the
    files are local) and what to do; Spark's own message names neither."""
    condition, first = _spark_error(exc)
    schemas = _local_parquet_schemas(files)
    if condition == "PARQUET_TYPE_ILLEGAL" or "Illegal Parquet type" in first:
        columns = _unreadable_columns(schemas)
        if columns:
            return UnsupportedTypeError("Spark cannot read these Parquet columns: " + "; ".join(columns))
        return UnsupportedTypeError(f"Spark cannot read a column type of the Parquet files at {path}: {first}")
    if condition == "COLUMN_ALREADY_EXISTS":
        pair = _case_duplicates(schemas)
        return SchemaError(
            f"{pair or path + ': two columns'} differ only in case, and Spark matches column names "
            f"case-insensitively ({first}). Rename one where the files are written, or set "
            "spark.sql.caseSensitive=true on the session")
    if "CANNOT_MERGE_SCHEMAS" in f"{condition} {first}":
        clash = _type_clash(schemas)
        return SchemaError(f"the Parquet files at {path} disagree on a column's type"
                           f"{': ' + clash if clash else ''}; rewrite them with one schema, or read them "
                           "apart and cast")
    return ValueError(f"Spark cannot read the Parquet files at {path}: {first}")


# --------------------------------------------------------------------------- malformed CSV rows


def _parse_guard(columns: list[str]) -> "Column":
    """An always-true predicate that references every column.

    CSV column pruning parses only the columns a query references, so whether a row counts as
    malformed would depend on what is selected later (and ``count()`` over the corrupt-record column
    alone is refused by Spark). Referencing every column in the filter keeps the decision the same
    for every query. ``size(array(...)) >= 0`` is cheap and the optimizer does not fold it away
    (tests/etl/test_sources.py checks the counts under a narrow select).
    """
    from pyspark.sql import functions as F

    return F.size(F.array(*[F.col(quote_column(c)).isNull() for c in columns])) >= 0


def quote_column(name: str) -> str:
    """A column name as a Spark SQL identifier (backticks, so dots and spaces are literal)."""
    return "`" + name.replace("`", "``") + "`"


def _local_file(url: str) -> Optional[str]:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path)
    return None


def _line_number(url: str, record: str) -> Optional[int]:
    """1-based line of the first occurrence of ``record`` (its first line) in a local file.

    Spark does not track line numbers; for local files a bounded driver-side scan recovers them so
    an error can say ``file:line``. Remote or very large files get no number (the text is quoted).
    """
    path = _local_file(url)
    if path is None or not os.path.isfile(path) or os.path.getsize(path) > _LINE_LOOKUP_MAX_BYTES:
        return None
    target = record.splitlines()[0] if record else record
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            for number, line in enumerate(f, start=1):
                if line.rstrip("\r\n") == target:
                    return number
    except OSError:
        return None
    return None


def _examples(bad: "DataFrame", corrupt: str, file_col: str) -> list[tuple[str, Optional[int], str]]:
    rows = bad.select(file_col, corrupt).limit(MAX_EXAMPLES).collect()  # at most 5 metadata rows
    return [(r[0], _line_number(r[0], r[1]), r[1]) for r in rows]


#: What Spark puts where bytes are not valid in the files' encoding.
_REPLACEMENT = "\ufffd"


def _hints(examples: list[tuple[str, Optional[int], str]], fmt: str, encoding: str) -> str:
    """Why the shown rows are malformed, where their text tells: bytes not valid in the encoding, or
    (CSV) a quoted field that goes on over the next line."""
    hints = []
    if any(_REPLACEMENT in record for _, _, record in examples):
        hints.append(f"some text is not valid {encoding} (Spark shows such bytes as U+FFFD); pass the files' "
                     "encoding, e.g. options={'encoding': 'ISO-8859-1'}")
    if fmt == "csv" and any(record.count('"') % 2 for _, _, record in examples):
        hints.append("a quoted field seems to go on over the next line; such files need "
                     "options={'multiLine': 'true'}")
    return "".join(f"\n  hint: {h}" for h in hints)


def _format_examples(examples: list[tuple[str, Optional[int], str]]) -> str:
    lines = []
    for file, line, record in examples:
        where = f"{_local_file(file) or file}:{line}" if line is not None else f"{_local_file(file) or file}"
        text = record if len(record) <= 200 else record[:200] + "..."
        lines.append(f"  {where}: {text!r}")
    return "\n".join(lines)


def _read_text(
    spark: "SparkSession",
    path: str,
    fmt: str,
    *,
    schema: Optional["StructType"],
    bad_records: str,
    options: Mapping[str, str],
) -> "DataFrame":
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    what = "CSV row(s)" if fmt == "csv" else "JSON record(s)"
    reader_options = dict(_CSV_DEFAULTS if fmt == "csv" else _JSON_DEFAULTS)
    reader_options.update({k: str(v) for k, v in options.items()})
    if schema is None:
        log.info("%s: no schema given; inferring column types from the data (an extra pass)", path)
        try:
            if fmt == "csv":
                schema = spark.read.options(**reader_options).option("inferSchema", "true").csv(path).schema
            else:  # JSON inference adds its own corrupt-record column when a line does not parse: not data
                inferred = spark.read.options(**reader_options).option("columnNameOfCorruptRecord", "_corrupt_record")
                schema = StructType([f for f in inferred.json(path).schema.fields if f.name != "_corrupt_record"])
        except Exception as exc:  # pyspark's (classic or Connect) or py4j's: a file Spark cannot read
            raise _read_error(exc, path, fmt) from None
    columns = schema.fieldNames()
    if not columns:
        if fmt == "json":
            raise ValueError(f"{path}: no columns: empty, or not JSON lines (one record per line); a JSON "
                             "document over several lines needs options={'multiLine': 'true'}")
        raise ValueError(f"{path}: no columns (empty file or header?)")
    corrupt = "_corrupt_record"
    while corrupt in columns:
        corrupt = "_" + corrupt
    file_col = "_source_file"
    while file_col in columns:
        file_col = "_" + file_col
    log.info("%s: %s reader options %s", path, fmt.upper(), reader_options)

    checked = (
        spark.read.schema(StructType(schema.fields + [StructField(corrupt, StringType(), True)]))
        .options(**reader_options)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", corrupt)
        .format(fmt)
        .load(path)
    )
    guard = _parse_guard(columns)
    # A row is malformed when it does not parse, or when Spark replaced bytes that are not valid in
    # the encoding (it does so silently); the record shown for the latter is its text as decoded.
    malformed = F.col(corrupt).isNotNull()
    strings = [quote_column(f.name) for f in schema.fields if isinstance(f.dataType, StringType)]
    for name in strings:
        malformed = malformed | F.coalesce(F.col(name).contains(_REPLACEMENT), F.lit(False))
    record = F.coalesce(F.col(corrupt), F.concat_ws(",", *[F.col(quote_column(c)).cast("string") for c in columns]))
    bad = checked.filter(malformed & guard).withColumn(corrupt, record).withColumn(file_col, F.input_file_name())
    good = checked.filter(~malformed & guard).drop(corrupt)
    try:
        n_bad = bad.count()  # one pass that parses every column of every row
    except Exception as exc:  # pyspark's (classic or Connect) or py4j's: a file Spark cannot read
        raise _read_error(exc, path, fmt) from None

    if n_bad == 0:
        log.info("%s: no malformed rows", path)
        if bad_records == "fail":
            # Clean data: a plain read, FAILFAST in case the files change under us.
            return (spark.read.schema(schema).options(**reader_options).option("mode", "FAILFAST").format(fmt)
                    .load(path))
        return good
    if bad_records == "fail":
        examples = _examples(bad, corrupt, file_col)
        raise MalformedRecordsError(
            f"{path}: {n_bad} malformed {what} under schema <{schema.simpleString()}> "
            f"(first {len(examples)} shown; use bad_records='drop' or a folder to keep them):\n"
            + _format_examples(examples) + _hints(examples, fmt, reader_options.get("encoding", "UTF-8")),
            count=n_bad,
            examples=examples,
        )
    if bad_records == "drop":
        log.warning("%s: dropped %d malformed %s (bad_records='drop')", path, n_bad, what)
        return good
    (
        bad.select(F.col(file_col).alias("file"), F.col(corrupt).alias("record"))
        .withColumn("source", F.lit(path))
        .withColumn("detected_at", F.current_timestamp())
        .write.mode("append")
        .json(bad_records)
    )
    log.warning("%s: %d malformed %s written to %s (JSON: file, record); continuing without them",
                path, n_bad, what, bad_records)
    return good


# --------------------------------------------------------------------------- entry point


def _read_images(spark: "SparkSession", path: str, *, bad_records: str, options: dict) -> "DataFrame":
    """``format="images"``: :func:`sparkbridge.etl.images.read_images`, its keywords in ``options``."""
    from sparkbridge.errors import UsageError
    from sparkbridge.etl.images import read_images

    allowed = ("label_pattern", "labels", "label_type", "suffixes")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"read_source(format='images'): unknown options {unknown}; the options are {list(allowed)}")
    return read_images(spark, path, bad_records=bad_records, **options)


def read_source(
    spark: "SparkSession",
    path: Union[str, "os.PathLike[str]"],
    *,
    format: Optional[str] = None,
    schema: Optional[Union[str, "StructType"]] = None,
    bad_records: Union[str, "os.PathLike[str]"] = "fail",
    options: Optional[Mapping[str, Any]] = None,
) -> "DataFrame":
    """A DataFrame over CSV, JSON lines or Parquet at ``path`` (a file, folder or glob; local, file://
    or any Hadoop filesystem Spark has), from a classic or a Spark Connect session alike.

    - ``format="images"``: a folder of PNG/JPEG files as ``(path, image, label)``
      (:func:`sparkbridge.etl.images.read_images`; ``options`` holds its ``label_pattern``,
      ``labels``, ``label_type`` and ``suffixes``).
    - ``format``: ``"csv"``, ``"json"`` or ``"parquet"``; by default from the file extensions
      (``.csv``, ``.csv.gz``, ``.json``/``.jsonl``/``.ndjson`` (+ ``.gz``), ``.parquet``, or the
      files inside a folder).
    - ``schema``: a DDL string (``"id INT, name STRING"``) or a StructType. CSV/JSON without one is
      inferred (one extra pass). Parquet with one is checked against the files' own schema. Parquet
      merges every file's schema (``mergeSchema``: Spark's default takes one file's and drops the
      columns only other files hold); a type Spark cannot read, columns equal but for case and
      files that disagree on a type are errors naming the file and column (local files).
    - ``bad_records`` (CSV, JSON): ``"fail"`` raises :class:`MalformedRecordsError` naming the files,
      line numbers and text of up to 5 malformed rows (a field that does not parse as its type, a
      wrong field count, a line that is not JSON, text not valid in the ``encoding``, which Spark
      would turn into U+FFFD); ``"drop"`` drops them and logs the count; any other
      string is a folder where malformed rows are appended as JSON (``file``, ``record``, ``source``,
      ``detected_at``) before the good rows are returned. Checking costs one extra pass over the input.
    - ``options``: extra Spark reader options (e.g. ``{"nullValue": "NA"}``); they win over the
      defaults (CSV: header, RFC 4180 ``""`` escapes, UTF-8; JSON: UTF-8).
    """
    if spark is None:
        raise ValueError("read_source needs a SparkSession")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    bad_records = os.fspath(bad_records) if isinstance(bad_records, os.PathLike) else bad_records
    if not isinstance(bad_records, str) or not (
        bad_records in BAD_RECORD_POLICIES or "/" in bad_records or os.sep in bad_records
    ):
        # A bare word is almost surely a typo of a policy, not a folder name: refuse it.
        raise ValueError(
            f"bad_records must be 'fail', 'drop' or a folder path containing a '/' (e.g. './bad_rows'), "
            f"got {bad_records!r}"
        )
    if format is not None:
        format = format.lower()
        if format not in FORMATS + ("images",):
            raise ValueError(f"format must be one of {FORMATS + ('images',)}, got {format!r}")
    options = dict(options or {})
    if format == "images":
        return _read_images(spark, path, bad_records=bad_records, options=options)

    files = _list_input(spark, path)
    if format is None:
        format = detect_format(path, files)
        log.info("%s: format %s (from the file extension%s)", path, format, "s" if len(files) > 1 else "")
    struct = _to_struct(spark, schema) if schema is not None else None

    if format == "parquet":
        if bad_records not in ("fail", "drop"):
            log.info("%s: bad_records=%r applies to CSV and JSON only; Parquet rows are typed by the file",
                     path, bad_records)
        reader_options = {**_PARQUET_DEFAULTS, **options}
        try:
            df = spark.read.options(**reader_options).parquet(path)
            df.schema  # a Connect session analyses lazily: the files' schema errors surface here
        except Exception as exc:  # pyspark's AnalysisException (classic or Connect), a py4j error
            raise _parquet_error(exc, path, files) from None
        if struct is not None:
            _check_parquet_schema(struct, df.schema, path)
            df = df.select(*[quote_column(f.name) for f in struct.fields])
        return df
    return _read_text(spark, path, format, schema=struct, bad_records=bad_records, options=options)
