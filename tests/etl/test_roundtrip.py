"""Every supported type, written by ``etl.write_mds`` with real Spark and read back by stock
``streaming.StreamingDataset``: values must equal the source rows exactly, under each null policy."""

from __future__ import annotations

import datetime as dt
import json
import os
from decimal import Decimal

import numpy as np
import pytest

from sparkbridge import etl
from sparkbridge.format.manifest import Manifest
from sparkbridge.etl.writer import NullValuesError, WriteError

pytestmark = pytest.mark.slow

UTC = dt.timezone.utc
EPOCH_DATE = dt.date(1970, 1, 1)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def _schema():
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("id", T.LongType(), False),
        T.StructField("b", T.ByteType()),
        T.StructField("sh", T.ShortType()),
        T.StructField("i", T.IntegerType()),
        T.StructField("l", T.LongType()),
        T.StructField("f", T.FloatType()),
        T.StructField("d", T.DoubleType()),
        T.StructField("bo", T.BooleanType()),
        T.StructField("day", T.DateType()),
        T.StructField("ts", T.TimestampType()),
        T.StructField("ntz", T.TimestampNTZType()),
        T.StructField("dec", T.DecimalType(38, 18)),
        T.StructField("s", T.StringType()),
        T.StructField("bin", T.BinaryType()),
        T.StructField("arr", T.ArrayType(T.IntegerType())),
        T.StructField("fixed", T.ArrayType(T.DoubleType())),
        T.StructField("vec", VectorUDT()),
        T.StructField("st", T.StructType([T.StructField("a", T.IntegerType()), T.StructField("b", T.StringType())])),
        T.StructField("m", T.MapType(T.StringType(), T.IntegerType())),
        T.StructField("words", T.ArrayType(T.StringType())),
    ])


def _rows(n: int = 24):
    from pyspark.ml.linalg import Vectors

    rows = []
    for k in range(n):
        sign = -1 if k % 2 else 1
        rows.append((
            k,
            [-128, 127, -1, 0][k % 4] if k < 4 else sign * (k % 100),
            [-32768, 32767][k % 2] if k < 2 else sign * k * 100,
            sign * (2**31 - 1 - k),
            sign * (2**63 - 1 - k),
            float(np.float32(sign * k / 3)),
            sign * k / 7,
            k % 3 == 0,
            dt.date(1969, 12, 31) + dt.timedelta(days=k * 400),
            dt.datetime(1960, 1, 1, 0, 0, 0, 123456, tzinfo=UTC) + dt.timedelta(days=k * 1000, microseconds=k),
            dt.datetime(2030, 6, 1, 12, 0, 0, 1) + dt.timedelta(hours=k),
            Decimal(f"{'-' if sign < 0 else ''}1234567890123456789{k % 10}.12345678901234567{k % 10}"),
            ["", "héllo wörld", "日本語テキスト", "emoji 🚀", "a\x00b"][k % 5] + ("" if k < 5 else str(k)),
            bytes([k % 256, 0, 255]) * (k % 3),
            list(range(-k, k % 5 - k)),  # includes empty arrays
            [k + 0.5, -k - 0.25, 1e300],
            Vectors.dense([k, -1.5]) if k % 2 else Vectors.sparse(2, {1: float(k)}),
            (k, f"s{k}"),
            {"k": k, "z": -k},
            [f"w{k}", "", "ü"],
        ))
    return rows


def _read(path: str) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, batch_size=1, shuffle=False)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        del ds


def _micros(value: dt.datetime) -> int:
    delta = value - (EPOCH if value.tzinfo else EPOCH.replace(tzinfo=None))
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _expect(row: tuple) -> dict:
    (k, b, sh, i, l, f, d, bo, day, ts, ntz, dec, s, bin_, arr, fixed, vec, st, m, words) = row
    return {
        "id": k, "b": b, "sh": sh, "i": i, "l": l, "f": np.float32(f), "d": d, "bo": int(bo),
        "day": (day - EPOCH_DATE).days, "ts": _micros(ts), "ntz": _micros(ntz), "dec": dec, "s": s,
        "bin": bin_, "arr": arr, "fixed": fixed, "vec": [float(x) for x in vec.toArray()],
        "st": {"a": st[0], "b": st[1]}, "m": m, "words": words,
    }


def _normal(sample: dict) -> dict:
    out = {}
    for key, value in sample.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def test_every_type_round_trips_exactly(any_spark, tmp_path):
    rows = _rows()
    df = any_spark.createDataFrame(rows, _schema()).repartition(3, "id").sortWithinPartitions("id")
    out = str(tmp_path / "ds")
    result = etl.write_mds(df, out, shard_size="2KB")
    assert result.rows == len(rows) and result.shards >= 3

    manifest = Manifest.from_json(open(os.path.join(out, "manifest.json")).read())
    enc = {c.name: c.encoding for c in manifest.columns}
    assert enc["b"] == "int8" and enc["sh"] == "int16" and enc["bo"] == "uint8"
    assert enc["day"] == "int32" and enc["ts"] == "int64" and enc["dec"] == "str_decimal"
    assert enc["arr"] == "ndarray:int32"  # some rows are empty → variable shape
    assert enc["fixed"] == "ndarray:float64:3" and enc["vec"] == "ndarray:float64:2"
    assert enc["st"] == enc["m"] == enc["words"] == "json"
    index = json.load(open(os.path.join(out, "index.json")))
    names = index["shards"][0]["column_names"]
    sizes = index["shards"][0]["column_sizes"]
    assert all(s is not None for s in sizes[:sizes.index(None)])  # fixed-width columns come first
    assert all(s is None for s in sizes[sizes.index(None):])
    assert set(names) == {f.name for f in _schema().fields}

    got = sorted((_normal(s) for s in _read(out)), key=lambda s: s["id"])
    want = [_expect(r) for r in rows]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == w, (g, w)
    assert isinstance(got[0]["dec"], Decimal) and str(got[1]["dec"]) == "-12345678901234567891.123456789012345671"


def _null_frame(spark):
    from pyspark.sql import types as T

    schema = T.StructType([
        T.StructField("id", T.LongType(), False),
        T.StructField("x", T.DoubleType()),
        T.StructField("n", T.IntegerType()),
        T.StructField("bo", T.BooleanType()),
        T.StructField("day", T.DateType()),
        T.StructField("s", T.StringType()),
        T.StructField("dec", T.DecimalType(10, 2)),
        T.StructField("arr", T.ArrayType(T.FloatType())),
        T.StructField("st", T.StructType([T.StructField("a", T.IntegerType())])),
        T.StructField("ts", T.TimestampType()),
        T.StructField("ntz", T.TimestampNTZType()),
        T.StructField("bin", T.BinaryType()),
    ])
    rows = []
    for k in range(12):
        null = k % 3 == 1
        rows.append((k, None if null else k * 1.5, None if k % 4 == 2 else -k, None if null else True,
                     None if null else dt.date(2020, 1, 1), None if null else f"v{k}",
                     None if null else Decimal(f"{k}.25"), None if null else [float(k), 1.0],
                     None if null else (k,), None if null else dt.datetime(2020, 1, 1, 0, 0, k, tzinfo=UTC),
                     None if null else dt.datetime(2020, 1, 1, 0, 0, k), None if null else bytes([k, 7])))
    return rows, spark.createDataFrame(rows, schema).coalesce(2)


def test_nulls_error_names_each_column_and_count(any_spark, tmp_path):
    _, df = _null_frame(any_spark)
    out = tmp_path / "ds"
    with pytest.raises(NullValuesError) as info:
        etl.write_mds(df, str(out))
    message = str(info.value)
    for col, count in [("x", 4), ("n", 3), ("bo", 4), ("day", 4), ("s", 4), ("dec", 4), ("arr", 4), ("st", 4)]:
        assert f"'{col}': {count} null" in message, message
    assert "'id'" not in message
    assert not (out / "index.json").exists()
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


def test_nulls_fill_writes_documented_values(any_spark, tmp_path):
    rows, df = _null_frame(any_spark)
    out = str(tmp_path / "ds")
    etl.write_mds(df, out, nulls="fill")
    got = sorted((_normal(s) for s in _read(out)), key=lambda s: s["id"])
    assert [g["id"] for g in got] == list(range(12))
    for g, r in zip(got, rows):
        k = r[0]
        null = k % 3 == 1
        assert g["x"] == (0.0 if null else k * 1.5)
        assert g["n"] == (0 if k % 4 == 2 else -k)
        assert g["bo"] == (0 if null else 1)
        assert g["day"] == (0 if null else (dt.date(2020, 1, 1) - EPOCH_DATE).days)
        assert g["s"] == ("" if null else f"v{k}")
        assert g["dec"] == (Decimal(0) if null else Decimal(f"{k}.25"))
        assert g["ts"] == (0 if null else _micros(dt.datetime(2020, 1, 1, 0, 0, k, tzinfo=UTC)))
        assert g["ntz"] == (0 if null else _micros(dt.datetime(2020, 1, 1, 0, 0, k)))
        assert g["bin"] == (b"" if null else bytes([k, 7]))
        assert g["arr"] == ([0.0, 0.0] if null else [float(k), 1.0])  # fixed shape: zeros
        assert g["st"] == ({} if null else {"a": k})
    manifest = Manifest.from_json(open(os.path.join(out, "manifest.json")).read())
    assert manifest.column("s").fill == "" and manifest.column("x").fill == 0.0
    assert manifest.column("arr").fill == [0, 0] and manifest.column("st").fill == "{}"
    assert manifest.column("dec").fill == "0" and manifest.column("day").fill == 0
    assert manifest.column("id").fill is None  # not nullable


def test_nulls_mask_adds_null_columns(any_spark, tmp_path):
    rows, df = _null_frame(any_spark)
    out = str(tmp_path / "ds")
    etl.write_mds(df, out, nulls="mask", columns=["id", "s", "x", "n"])
    got = sorted((_normal(s) for s in _read(out)), key=lambda s: s["id"])
    assert set(got[0]) == {"id", "s", "x", "n", "s__null", "x__null", "n__null"}
    for g, r in zip(got, rows):
        k = r[0]
        null = k % 3 == 1
        assert g["x__null"] == int(null) and g["s__null"] == int(null) and g["n__null"] == int(k % 4 == 2)
        assert g["x"] == (0.0 if null else k * 1.5)
        assert g["s"] == ("" if null else f"v{k}")
    manifest = Manifest.from_json(open(os.path.join(out, "manifest.json")).read())
    assert manifest.column("x").null_mask == "x__null"
    assert [c.name for c in manifest.columns] == ["id", "s", "x", "n"]


def test_uncompressed_float_decimals_and_several_hashes(spark, tmp_path):
    import hashlib

    df = spark.sql("SELECT id, CAST(id / 3 AS DECIMAL(20, 4)) AS d, CAST(id AS STRING) AS s FROM range(100)")
    out = str(tmp_path / "ds")
    result = etl.write_mds(df, out, compression=None, hashes=("xxh64", "sha1"), decimals="float", shard_size=2048)
    assert result.rows == 100 and result.bytes == result.raw_bytes
    index = json.load(open(os.path.join(out, "index.json")))
    for shard in index["shards"]:
        assert shard["zip_data"] is None and shard["compression"] is None
        with open(os.path.join(out, shard["raw_data"]["basename"]), "rb") as f:
            assert hashlib.sha1(f.read()).hexdigest() == shard["raw_data"]["hashes"]["sha1"]
    got = sorted((_normal(s) for s in _read(out)), key=lambda s: s["id"])
    assert [(g["id"], g["s"]) for g in got] == [(k, str(k)) for k in range(100)]
    assert all(g["d"] == float(Decimal(k) / 3).__round__(4) for g, k in zip(got, range(100)))


def test_source_changing_between_passes_is_a_clear_error(spark, tmp_path):
    from pyspark.sql import functions as F

    out = tmp_path / "ds"
    staging = str(out / "_staging")

    @F.udf("array<double>")
    def arr(i):  # 2 elements while shapes are measured, 3 once the write has started
        return [float(i)] * (3 if os.path.isdir(staging) else 2)

    df = spark.range(20, numPartitions=2).select("id", arr("id").alias("a"))
    with pytest.raises(WriteError, match=r"column 'a': every array was expected to have 2 elements"):
        etl.write_mds(df, str(out))
    assert not (out / "index.json").exists() and not os.path.exists(staging)


def test_task_cuts_shards_under_the_size_limit_without_spark(tmp_path):
    """The executor-side writer on plain Arrow batches: every shard within the limit (header
    included), rows in order, each shard's bytes decode back to its rows."""
    import pyarrow as pa
    from pyspark.sql import types as T

    from sparkbridge.format import codecs
    from sparkbridge.format import mds as mf
    from sparkbridge.storage import open_storage
    from sparkbridge.etl.task import TaskConfig, run_task
    from sparkbridge.etl.types import plan_columns

    plans = plan_columns(T.StructType([T.StructField("id", T.LongType(), False), T.StructField("s", T.StringType())]))
    storage = open_storage(str(tmp_path))
    os.makedirs(storage.local_path("_staging/j20260101T000000-00000000"))
    cfg = TaskConfig(storage=storage, job_id="j20260101T000000-00000000", plans=tuple(plans), compression="zstd",
                     hashes=("xxh64",), shard_size=4096, nulls="error")
    texts = ["é" * (k % 37) for k in range(1000)]
    batches = [pa.RecordBatch.from_arrays([pa.array(range(i, i + 100), pa.int64()), pa.array(texts[i:i + 100])],
                                          ["id", "s"]) for i in range(0, 1000, 100)]
    row = run_task(cfg, iter(batches), partition=3, task_attempt_id=7, attempt_number=0)
    assert row["attempt"] == "p00003-a7" and row["rows"] == 1000 and row["nulls"] == {}
    got_ids, got_texts = [], []
    for k, entry in enumerate(row["entries"]):
        assert entry["raw_data"]["basename"] == f"shard.{k:05d}.mds"
        assert entry["raw_data"]["bytes"] <= 4096
        with open(os.path.join(tmp_path, "_staging", cfg.job_id, "p00003-a7", entry["zip_data"]["basename"]), "rb") as f:
            raw = codecs.decompress("zstd", f.read())
        assert len(raw) == entry["raw_data"]["bytes"]
        assert codecs.hash_bytes("xxh64", raw) == entry["raw_data"]["hashes"]["xxh64"]
        layout = mf.ShardLayout.from_index_entry(entry)
        offsets = mf.sample_offsets(raw)
        starts, sizes = mf.column_starts(raw, offsets, layout)
        got_ids += mf.gather_fixed(raw, starts[:, 0], "int64").tolist()
        var_offsets, data = mf.gather_var(raw, starts[:, 1], sizes[:, 1])
        got_texts += [bytes(data[a:b]).decode() for a, b in zip(var_offsets[:-1], var_offsets[1:])]
    assert len(row["entries"]) > 5
    parts = [np.arange(k, k + 10, dtype=np.uint8) for k in range(3)]
    sizes = np.array([5, 5, 10, 10], dtype=np.int64)
    assert mf.encode_shard_chunks({"a": 1}, parts, sizes) == mf.encode_shard({"a": 1}, np.concatenate(parts), sizes)
    with pytest.raises(mf.ShardFormatError, match="do not match|does not match"):
        mf.encode_shard_chunks({"a": 1}, parts, sizes[:3])
    assert got_ids == list(range(1000)) and got_texts == texts


def test_null_elements_inside_arrays_under_mask_name_the_column(spark, tmp_path):
    df = spark.sql("SELECT id, IF(id = 3, array(1.0D, NULL), array(1.0D, 2.0D)) AS arr FROM range(6)")
    out = tmp_path / "ds"
    with pytest.raises(WriteError, match=r"column 'arr': 1 null element inside arrays; nulls='mask' marks a "
                                         r"whole value null"):
        etl.write_mds(df, str(out), nulls="mask")
    assert not (out / "index.json").exists() and not (out / "_staging").exists()


def test_unexpected_task_error_is_one_line_naming_partition_and_attempt(spark, tmp_path, monkeypatch):
    import sparkbridge.etl.writer as writer

    from tests.etl.helpers import FullDiskInTasks

    out = tmp_path / "ds"
    monkeypatch.setattr(writer, "open_storage", FullDiskInTasks)
    with pytest.raises(WriteError) as info:
        etl.write_mds(spark.range(10, numPartitions=1), str(out))
    message = str(info.value)
    assert message.startswith("partition 0 attempt ")
    assert "OSError: [Errno 28] No space left on device" in message and "_staging" in message
    assert "Traceback" not in message and "py4j" not in message.lower() and "\n" not in message
    assert not (out / "index.json").exists() and not (out / "_staging").exists()


def test_column_names_with_dots_spaces_and_backticks_round_trip(any_spark, tmp_path):
    """pyspark's own ``mapInArrow`` resolves every column by its bare name, so a name with a dot
    (``x.y``: common in Parquet written by pandas) failed inside pyspark with UNRESOLVED_COLUMN."""
    names = ["x.y", "a b", "c`d", "é", "id"]
    df = any_spark.createDataFrame([(k * 1.5, k * 10, f"s{k}", k % 2 == 0, k) for k in range(7)], names).coalesce(2)
    out = str(tmp_path / "ds")
    result = etl.write_mds(df, out)
    assert result.rows == 7
    manifest = Manifest.from_json(open(os.path.join(out, "manifest.json")).read())
    assert [c.name for c in manifest.columns] == names
    got = sorted(_read(out), key=lambda s: s["id"])
    assert [(s["x.y"], s["a b"], s["c`d"], s["é"], s["id"]) for s in got] == \
        [(k * 1.5, k * 10, f"s{k}", int(k % 2 == 0), k) for k in range(7)]


def test_decimals_inside_structs_arrays_and_maps_stay_exact(any_spark, tmp_path):
    """Nested values are stored as JSON. A decimal there became a JSON number, which a reader
    parses as a float: 38 digits came back as 17, without a word. With ``decimals="string"`` (the
    default) they are JSON strings now, digit for digit; ``decimals="float"`` keeps numbers."""
    from pyspark.sql import types as T

    big = Decimal("12345678901234567890.123456789012345678")
    negative = Decimal("-12345678901234567890.123456789012345678")  # not -big: that rounds to 28 digits
    schema = T.StructType([
        T.StructField("id", T.LongType(), False),
        T.StructField("st", T.StructType([T.StructField("d", T.DecimalType(38, 18)), T.StructField("x", T.DoubleType())])),
        T.StructField("arr", T.ArrayType(T.DecimalType(10, 2))),
        T.StructField("m", T.MapType(T.StringType(), T.DecimalType(38, 18))),
    ])
    df = any_spark.createDataFrame([(1, (big, 0.5), [Decimal("1.10"), Decimal("-2.25")], {"k": negative})], schema)
    out = str(tmp_path / "exact")
    etl.write_mds(df, out)
    (got,) = _read(out)
    assert got["st"] == {"d": str(big), "x": 0.5}
    assert got["arr"] == ["1.10", "-2.25"]
    assert got["m"] == {"k": str(negative)}

    out = str(tmp_path / "float")
    etl.write_mds(df, out, decimals="float")
    (got,) = _read(out)
    assert got["st"] == {"d": float(big), "x": 0.5} and got["arr"] == [1.1, -2.25] and got["m"] == {"k": float(negative)}
