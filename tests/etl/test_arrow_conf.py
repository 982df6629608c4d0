"""The write switches Spark's per-row Arrow size check off only where it can never end a batch,
and gives the user's settings back."""

from __future__ import annotations

import pytest

from sparkbridge import etl
from sparkbridge.etl.arrow_conf import MAX_BYTES_KEY, MAX_RECORDS_KEY, arrow_row_bound, arrow_stream_conf, \
    parse_bytes
from sparkbridge.etl.types import plan_columns
from tests.etl.helpers import stock_ids


def _fixed_frame(spark, n):
    """Every fixed-width kind the writer streams: numbers, bool, date, timestamp, fixed arrays."""
    from pyspark.sql import functions as F

    return spark.range(0, n, numPartitions=2).select(
        "id",
        (F.col("id") % 100).cast("tinyint").alias("b"),
        (F.col("id") / 3).cast("float").alias("f"),
        (F.col("id") % 2 == 0).alias("bo"),
        F.date_from_unix_date(F.col("id").cast("int")).alias("day"),
        F.timestamp_micros(F.col("id")).alias("ts"),
        F.array(F.col("id").cast("double"), F.lit(1.5), F.lit(2.5)).alias("arr"),
        F.when(F.col("id") % 5 == 0, None).otherwise(F.col("id")).alias("maybe"),
    )


def test_parse_bytes_reads_sparks_byte_strings():
    assert [parse_bytes(v) for v in ("67108864b", "64m", "64MB", "1g", "1000", "2147483647")] == \
        [64 << 20, 64 << 20, 64 << 20, 1 << 30, 1000, (1 << 31) - 1]
    assert parse_bytes("lots") is None and parse_bytes(None) is None


def test_row_bound_only_for_fixed_widths():
    from pyspark.sql import types as T

    fixed = T.StructType([T.StructField("a", T.FloatType()), T.StructField("b", T.BooleanType()),
                          T.StructField("t", T.TimestampType())])
    assert arrow_row_bound(plan_columns(fixed, columns=None, nulls="error", decimals="string")) == 1 + 5 + 2 + 9
    masked = plan_columns(fixed, columns=None, nulls="mask", decimals="string")
    assert arrow_row_bound(masked) == 17 + 3 * 2
    text = T.StructType([T.StructField("a", T.FloatType()), T.StructField("s", T.StringType())])
    assert arrow_row_bound(plan_columns(text, columns=None, nulls="error", decimals="string")) is None


@pytest.mark.parametrize("nulls", ["fill", "mask"])
def test_bound_holds_for_the_batches_spark_streams(spark, nulls):
    """With the byte limit set to the least value at which the writer drops it, Spark's own size
    check must still let every batch reach ``maxRecordsPerBatch`` rows: the bound is an upper bound."""
    import pyarrow as pa

    from sparkbridge.etl.prepare import measure_array_shapes, prepare_frame

    df = _fixed_frame(spark, 5000)
    plans = measure_array_shapes(df, plan_columns(df.schema, columns=None, nulls=nulls, decimals="string"))
    assert [p.kind for p in plans if p.name == "arr"] == ["ndarray_fixed"]
    bound = arrow_row_bound(plans)
    assert bound is not None
    records = 1000
    least = records * bound + 256 * (len(plans) + 1) + 1
    prepared = prepare_frame(df, plans, nulls=nulls)

    def sizes(batches):
        for b in batches:
            yield pa.RecordBatch.from_arrays([pa.array([b.num_rows], pa.int64())], ["n"])

    spark.conf.set(MAX_RECORDS_KEY, str(records))
    spark.conf.set(MAX_BYTES_KEY, str(least))
    try:
        with arrow_stream_conf(spark, plans) as changed:
            assert changed and spark.conf.get(MAX_BYTES_KEY) == str((1 << 31) - 1)
        assert spark.conf.get(MAX_BYTES_KEY) == str(least)  # given back
        got = [r["n"] for r in prepared.mapInArrow(sizes, "n long").collect()]  # with the user's limit
    finally:
        spark.conf.unset(MAX_BYTES_KEY)
        spark.conf.unset(MAX_RECORDS_KEY)
    assert sum(got) == 5000 and sorted(got) == [500, 500] + [1000] * 4  # 2 partitions of 2500 rows


def test_write_restores_the_users_settings(spark, tmp_path):
    from pyspark.sql import functions as F

    df = _fixed_frame(spark, 300).select("id", "f", "ts", "arr")
    assert spark.conf.get(MAX_BYTES_KEY, None) is None
    etl.write_mds(df, str(tmp_path / "a"))
    assert spark.conf.get(MAX_BYTES_KEY, None) is None  # unset again, not pinned to the default
    spark.conf.set(MAX_BYTES_KEY, "32m")
    try:
        etl.write_mds(df, str(tmp_path / "b"))
        assert spark.conf.get(MAX_BYTES_KEY) == "32m"
        text = df.withColumn("s", F.concat(F.lit("s"), F.col("id")))
        with arrow_stream_conf(spark, plan_columns(text.schema, columns=None, nulls="error",
                                                   decimals="string")) as changed:
            assert not changed and spark.conf.get(MAX_BYTES_KEY) == "32m"  # strings: limit kept
        etl.write_mds(text, str(tmp_path / "c"))
        assert spark.conf.get(MAX_BYTES_KEY) == "32m"
        spark.conf.set(MAX_RECORDS_KEY, "0")  # unlimited rows: the byte limit is the only limit
        with arrow_stream_conf(spark, plan_columns(df.schema, columns=None, nulls="error",
                                                   decimals="string")) as changed:
            assert not changed
    finally:
        spark.conf.unset(MAX_BYTES_KEY)
        spark.conf.unset(MAX_RECORDS_KEY)
    for name in "abc":
        assert sorted(stock_ids(str(tmp_path / name))) == list(range(300))


def test_a_failed_write_restores_the_setting_too(spark, tmp_path):
    """A job that fails inside the ``mapInArrow`` pass (a Python UDF upstream raises)."""
    from pyspark.sql import functions as F

    def boom(x):
        raise ValueError("boom")

    df = spark.range(0, 10).select("id", F.udf(boom, "double")(F.col("id")).alias("x"))
    with pytest.raises(Exception, match="boom"):
        etl.write_mds(df, str(tmp_path / "n"))
    assert spark.conf.get(MAX_BYTES_KEY, None) is None
