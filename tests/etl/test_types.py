"""The Spark type → MDS mapping, and bad options failing before any Spark job runs."""

from __future__ import annotations

import pytest

from sparkbridge import etl
from sparkbridge.etl.types import SchemaError, UnsupportedTypeError, plan_columns
from sparkbridge.etl.writer import parse_size


def _schema(*fields):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(name, dtype, nullable) for name, dtype, nullable in fields])


def test_mapping_keeps_signs_and_logical_types():
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    plans = plan_columns(_schema(
        ("s", T.StringType(), True),
        ("b", T.ByteType(), False),
        ("h", T.ShortType(), True),
        ("flag", T.BooleanType(), True),
        ("day", T.DateType(), True),
        ("ts", T.TimestampType(), True),
        ("ntz", T.TimestampNTZType(), True),
        ("dec", T.DecimalType(38, 18), True),
        ("arr", T.ArrayType(T.LongType()), True),
        ("vec", VectorUDT(), True),
        ("st", T.StructType([T.StructField("a", T.IntegerType())]), True),
        ("m", T.MapType(T.StringType(), T.DoubleType()), True),
        ("nested", T.ArrayType(T.ArrayType(T.DoubleType())), True),
        ("raw", T.BinaryType(), True),
    ))
    by = {p.name: p for p in plans}
    assert [(by[n].encoding, by[n].spec.logical) for n in ("b", "h", "flag", "day", "ts", "ntz")] == [
        ("int8", "int8"), ("int16", "int16"), ("uint8", "bool"), ("int32", "date"), ("int64", "timestamp"),
        ("int64", "timestamp_ntz"),
    ]
    assert by["dec"].encoding == "str_decimal" and by["s"].encoding == "str" and by["raw"].encoding == "bytes"
    assert by["arr"].encoding == "ndarray:int64" and by["arr"].spec.element == "int64"
    assert by["vec"].encoding == "ndarray:float64" and by["vec"].spec.logical == "vector"
    assert by["st"].encoding == by["m"].encoding == by["nested"].encoding == "json"
    assert not by["b"].spec.nullable
    # fixed-width first (user order), variable-width after
    assert [p.name for p in plans] == ["b", "h", "flag", "day", "ts", "ntz",
                                       "s", "dec", "arr", "vec", "st", "m", "nested", "raw"]


def test_decimal_as_float_and_masks():
    from pyspark.sql import types as T

    schema = _schema(("x", T.DecimalType(10, 2), True), ("y", T.IntegerType(), False), ("z", T.StringType(), True))
    plans = plan_columns(schema, nulls="mask", decimals="float")
    assert [(p.name, p.encoding) for p in plans] == [
        ("x", "float64"), ("y", "int32"), ("x__null", "uint8"), ("z__null", "uint8"), ("z", "str"),
    ]
    assert plans[0].spec.null_mask == "x__null" and plans[1].spec.null_mask is None


def test_columns_subset_and_errors():
    from pyspark.sql import types as T

    schema = _schema(("a", T.IntegerType(), True), ("b", T.DoubleType(), True), ("a__null", T.IntegerType(), True))
    assert [p.name for p in plan_columns(schema, columns=["b", "a"])] == ["b", "a"]
    with pytest.raises(SchemaError, match=r"\['nope'\] are not in the DataFrame"):
        plan_columns(schema, columns=["a", "nope"])
    with pytest.raises(SchemaError, match="a__null"):
        plan_columns(schema, nulls="mask")
    with pytest.raises(ValueError, match="nulls must be one of"):
        plan_columns(schema, nulls="drop")
    with pytest.raises(ValueError, match="decimals must be one of"):
        plan_columns(schema, decimals="exact")


def test_unsupported_types_are_all_named():
    from pyspark.sql import types as T

    schema = _schema(
        ("ok", T.IntegerType(), True),
        ("gap", T.DayTimeIntervalType(), True),
        ("months", T.YearMonthIntervalType(), True),
        ("deep", T.StructType([T.StructField("i", T.CalendarIntervalType())]), True),
        ("nothing", T.NullType(), True),
    )
    with pytest.raises(UnsupportedTypeError) as info:
        plan_columns(schema)
    message = str(info.value)
    for name in ("'gap'", "interval day to second", "'months'", "'deep'", "'nothing'", "void"):
        assert name in message, message
    assert "'ok'" not in message


def test_parse_size():
    assert parse_size("64MB") == 64 << 20
    assert parse_size("512KB") == 512 << 10
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size(4096) == 4096
    for bad in ("64 parsecs", "", "-1MB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="at least 1 KiB"):
        parse_size(10)
    with pytest.raises(ValueError, match="below 4 GiB"):
        parse_size("4GB")


def test_bad_input_fails_before_any_spark_job(spark, tmp_path):
    df = spark.range(5).selectExpr("id", "INTERVAL '1' DAY AS gap")
    sc = spark.sparkContext
    sc.setJobGroup("h1-types-no-job", "must stay empty")
    try:
        with pytest.raises(UnsupportedTypeError, match=r"column 'gap' has type interval day"):
            etl.write_mds(df, str(tmp_path / "a"))
        for kwargs, match in [
            ({"mode": "replace"}, "mode must be one of"),
            ({"compression": "lz5"}, "unsupported compression 'lz5'"),
            ({"hashes": ["md17"]}, "unsupported hash 'md17'"),
            ({"shard_size": "big"}, "not a size"),
            ({"nulls": "ignore"}, "nulls must be one of"),
        ]:
            with pytest.raises(ValueError, match=match):
                etl.write_mds(df.select("id"), str(tmp_path / "b"), **kwargs)
        assert sc.statusTracker().getJobIdsForGroup("h1-types-no-job") == []
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
