"""sparkbridge.etl.read_source on real files with a real local Spark: formats, missing input, malformed CSV rows."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from sparkbridge import etl
from sparkbridge.etl.sources import MalformedRecordsError

SCHEMA = "id INT, name STRING, score DOUBLE"
# Line numbers (1-based, header = line 1): 4 has a non-integer id, 5 too few fields, 7 too many.
CSV = (
    "id,name,score\n"
    "1,a,1.5\n"
    "2,b,2.5\n"
    "bad,c,3.5\n"
    "4,d\n"
    '6,"f,g",6.5\n'
    "7,h,7.5,extra\n"
    '8,"say ""hi""",8.5\n'
)
GOOD = [(1, "a", 1.5), (2, "b", 2.5), (6, "f,g", 6.5), (8, 'say "hi"', 8.5)]


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(CSV)
    return path


def rows(df):
    return sorted(tuple(r) for r in df.collect())


def test_fail_names_file_lines_and_text(any_spark, csv_file):
    with pytest.raises(MalformedRecordsError) as info:
        etl.read_source(any_spark, csv_file, schema=SCHEMA)
    err = info.value
    assert err.count == 3
    message = str(err)
    for line, text in [(4, "bad,c,3.5"), (5, "4,d"), (7, "7,h,7.5,extra")]:
        assert f"{csv_file}:{line}: {text!r}" in message
    assert sorted((line, text) for _, line, text in err.examples) == [(4, "bad,c,3.5"), (5, "4,d"), (7, "7,h,7.5,extra")]


def test_fail_on_clean_file_returns_all_rows(spark, tmp_path):
    path = tmp_path / "clean.csv"
    path.write_text("id,name,score\n1,a,1.5\n2,b,2.5\n")
    df = etl.read_source(spark, path, schema=SCHEMA)
    assert rows(df) == [(1, "a", 1.5), (2, "b", 2.5)]


def test_drop_counts_and_is_independent_of_selected_columns(any_spark, csv_file, caplog):
    with caplog.at_level(logging.WARNING, logger="sparkbridge.etl.sources"):
        df = etl.read_source(any_spark, csv_file, schema=SCHEMA, bad_records="drop")
    assert "dropped 3 malformed CSV row(s)" in caplog.text
    assert rows(df) == GOOD
    assert df.count() == 4
    # CSV column pruning would parse only `name` here and keep the bad-id row: the guard prevents it.
    assert sorted(r.name for r in df.select("name").collect()) == sorted(g[1] for g in GOOD)
    assert df.select("name").count() == 4


def test_bad_rows_kept_in_folder(any_spark, csv_file, tmp_path):
    bad_dir = tmp_path / "bad"
    df = etl.read_source(any_spark, csv_file, schema=SCHEMA, bad_records=str(bad_dir))
    assert rows(df) == GOOD
    kept = []
    for part in sorted(bad_dir.glob("part-*.json")):
        kept.extend(json.loads(line) for line in part.read_text().splitlines() if line)
    assert sorted(k["record"] for k in kept) == ["4,d", "7,h,7.5,extra", "bad,c,3.5"]
    assert {k["file"] for k in kept} == {csv_file.as_uri()}
    assert {k["source"] for k in kept} == {str(csv_file)}


def test_inferred_schema_flags_wrong_field_counts(spark, csv_file):
    df = etl.read_source(spark, csv_file, bad_records="drop")
    assert df.schema.simpleString() == "struct<id:string,name:string,score:double>"
    assert df.count() == 5  # only "4,d" and the 4-field row are malformed when id may be a string


def test_bad_records_typo_is_refused(spark, csv_file):
    with pytest.raises(ValueError, match="bad_records must be"):
        etl.read_source(spark, csv_file, schema=SCHEMA, bad_records="skip")


def test_missing_path(any_spark, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=f"input not found: {missing}"):
        etl.read_source(any_spark, missing)


def test_unknown_filesystem_and_globs(any_spark, tmp_path, csv_file):
    with pytest.raises(ValueError, match="no Hadoop filesystem for scheme 's3'"):
        etl.read_source(any_spark, "s3://bucket/rows.csv")
    with pytest.raises(FileNotFoundError, match="input not found"):
        etl.read_source(any_spark, str(tmp_path / "nothing-*.csv"))
    df = etl.read_source(any_spark, str(tmp_path / "row*.csv"), schema=SCHEMA, bad_records="drop")
    assert rows(df) == GOOD


def test_invalid_ddl(any_spark, csv_file):
    with pytest.raises(ValueError, match="invalid schema DDL"):
        etl.read_source(any_spark, csv_file, schema="id INTEGR,")


def test_format_detection(any_spark, tmp_path):
    gz = tmp_path / "g.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("x,y\n1,2\n3,4\n")
    df = etl.read_source(any_spark, gz, schema="x INT, y INT")
    assert rows(df) == [(1, 2), (3, 4)]

    # A folder written by Spark (part files + _SUCCESS + .crc): detected as Parquet.
    pq = tmp_path / "pq"
    any_spark.createDataFrame([(1, "u"), (2, "v"), (3, "w")], "k LONG, s STRING").repartition(2).write.parquet(str(pq))
    df = etl.read_source(any_spark, pq)
    assert rows(df) == [(1, "u"), (2, "v"), (3, "w")]
    assert rows(etl.read_source(any_spark, pq, schema="s STRING")) == [("u",), ("v",), ("w",)]
    with pytest.raises(ValueError, match="column 'zz' is not in the Parquet files"):
        etl.read_source(any_spark, pq, schema="zz INT")

    # A folder of CSV files.
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "a.csv").write_text("x,y\n1,2\n")
    (folder / "b.csv").write_text("x,y\n3,4\n")
    assert rows(etl.read_source(any_spark, folder, schema="x INT, y INT")) == [(1, 2), (3, 4)]

    (folder / "c.parquet").write_bytes((next(pq.glob("part-*.parquet"))).read_bytes())
    with pytest.raises(ValueError, match="mixes formats"):
        etl.read_source(any_spark, folder)

    txt = tmp_path / "data.txt"
    txt.write_text("x,y\n5,6\n")
    with pytest.raises(ValueError, match="pass format='csv', 'parquet' or 'json'"):
        etl.read_source(any_spark, txt)
    assert rows(etl.read_source(any_spark, txt, format="csv", schema="x INT, y INT")) == [(5, 6)]

    z = tmp_path / "f.csv.zip"
    z.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ValueError, match="cannot read zip archives"):
        etl.read_source(any_spark, z)
    with pytest.raises(ValueError, match="format must be one of"):
        etl.read_source(any_spark, txt, format="orc")


# JSON lines (1-based): 3 has a non-integer id, 5 is not JSON at all.
JSONL = (
    '{"id": 1, "name": "a", "score": 1.5}\n'
    '{"id": 2, "name": "b", "score": 2.5}\n'
    '{"id": "bad", "name": "c", "score": 3.5}\n'
    '{"id": 6, "name": "f,g", "score": 6.5}\n'
    '{"id": 7, "name": \n'
    '{"id": 8, "name": "say \\"hi\\"", "score": 8.5}\n'
)


def test_json_lines_with_every_bad_record_policy(any_spark, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(JSONL)
    with pytest.raises(MalformedRecordsError) as info:
        etl.read_source(any_spark, path, schema=SCHEMA)
    assert info.value.count == 2
    for line, text in [(3, '{"id": "bad", "name": "c", "score": 3.5}'), (5, '{"id": 7, "name": ')]:
        assert f"{path}:{line}: {text!r}" in str(info.value)
    assert "malformed JSON record(s)" in str(info.value)
    assert rows(etl.read_source(any_spark, path, schema=SCHEMA, bad_records="drop")) == GOOD
    assert rows(etl.read_source(any_spark, path, schema=SCHEMA, bad_records="drop").select("name")) == sorted(
        (g[1],) for g in GOOD)
    bad_dir = tmp_path / "bad"
    assert rows(etl.read_source(any_spark, path, schema=SCHEMA, bad_records=str(bad_dir))) == GOOD
    kept = [json.loads(line) for part in sorted(bad_dir.glob("part-*.json")) for line in part.read_text().splitlines()]
    assert sorted(k["record"] for k in kept) == ['{"id": "bad", "name": "c", "score": 3.5}', '{"id": 7, "name": ']
    # inferred: no schema given, the malformed line is still found; the clean file reads as JSON by extension
    assert etl.read_source(any_spark, path, bad_records="drop").count() == 5
    clean = tmp_path / "clean.json"
    clean.write_text('{"x": 1}\n{"x": 2}\n')
    assert rows(etl.read_source(any_spark, clean, schema="x INT")) == [(1,), (2,)]


def test_parquet_types_spark_cannot_read_name_the_file_column_and_a_way_out(any_spark, tmp_path):
    """Spark refuses nanosecond timestamps and float16 in Parquet with an AnalysisException that
    names neither the file nor the column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3], "t": pa.array([5], pa.timestamp("ns"))}), folder / "b.parquet")
    with pytest.raises(TypeError, match=r"b\.parquet.*column 't' \(timestamp\[ns\]\).*coerce_timestamps='us'.*"
                                        r"spark\.sql\.legacy\.parquet\.nanosAsLong") as info:
        etl.read_source(any_spark, str(folder))
    assert "AnalysisException" not in str(info.value) and "SQLSTATE" not in str(info.value)

    half = tmp_path / "half.parquet"
    pq.write_table(pa.table({"h": pa.array(np.array([1, 2], np.float16))}), half)
    with pytest.raises(TypeError, match=r"half\.parquet.*column 'h' \(halffloat\).*float32"):
        etl.read_source(any_spark, str(half))


def test_parquet_columns_that_differ_only_in_case_are_named(any_spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cases.parquet"
    pq.write_table(pa.table({"Score": [1, 2], "score": [3, 4], "id": [5, 6]}), path)
    with pytest.raises(ValueError, match=r"cases\.parquet: columns 'Score' and 'score' differ only in case.*"
                                         r"spark\.sql\.caseSensitive"):
        etl.read_source(any_spark, str(path))


def test_csv_headers_with_dots_and_spaces(any_spark, tmp_path):
    """The malformed-row check referenced each column by its bare name: a dot in a header split it."""
    path = tmp_path / "dots.csv"
    path.write_text("id,x.y,a b\n1,2.5,u\n2,bad,v\n3,4.5,w\n")
    df = etl.read_source(any_spark, path, schema="id INT, `x.y` DOUBLE, `a b` STRING", bad_records="drop")
    assert rows(df) == [(1, 2.5, "u"), (3, 4.5, "w")]
    with pytest.raises(MalformedRecordsError, match=r"dots\.csv:3"):
        etl.read_source(any_spark, path, schema="id INT, `x.y` DOUBLE, `a b` STRING")


def test_parquet_files_with_different_columns_are_merged_not_dropped(any_spark, tmp_path):
    """Spark's default takes one file's schema: a column that only later files hold was dropped
    without a word. Every footer counts now; the rows without it are nulls, which write_mds's
    ``nulls="error"`` then names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "drift"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": [3], "extra": [30]}), folder / "part-1.parquet")
    df = etl.read_source(any_spark, str(folder))
    assert sorted(df.columns) == ["extra", "id"]
    assert rows(df.select("id", "extra")) == [(1, None), (2, None), (3, 30)]
    with pytest.raises(ValueError, match=r"'extra': 2 nulls"):
        etl.write_mds(df, str(tmp_path / "out"))

    clash = tmp_path / "clash"
    clash.mkdir()
    pq.write_table(pa.table({"id": [1]}), clash / "part-0.parquet")
    pq.write_table(pa.table({"id": ["x"]}), clash / "part-1.parquet")
    with pytest.raises(ValueError, match=r"clash disagree on a column's type: column 'id' is int64 in \S+part-0\.parquet "
                                         r"and string in \S+part-1\.parquet") as info:
        etl.read_source(any_spark, str(clash))
    assert "SQLSTATE" not in str(info.value) and "Exception" not in str(info.value)


def test_bytes_that_are_not_the_files_encoding_are_malformed_not_replaced(any_spark, tmp_path):
    """Spark decodes invalid UTF-8 as U+FFFD without a word: 'café' in Latin-1 became 'caf\ufffd'."""
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,name\n1,caf\xe9\n2,plain\n".encode("latin-1"))
    with pytest.raises(MalformedRecordsError, match=r"(?s)1 malformed CSV row.*not valid UTF-8.*'encoding'") as info:
        etl.read_source(any_spark, path, schema="id INT, name STRING")
    assert info.value.count == 1
    assert rows(etl.read_source(any_spark, path, schema="id INT, name STRING", bad_records="drop")) == [(2, "plain")]
    assert rows(etl.read_source(any_spark, path, schema="id INT, name STRING", options={"encoding": "ISO-8859-1"})) == \
        [(1, "café"), (2, "plain")]


def test_a_quoted_field_over_two_lines_says_how_to_read_it(any_spark, tmp_path):
    path = tmp_path / "multiline.csv"
    path.write_text('id,text\n1,"first\nsecond"\n2,plain\n')
    with pytest.raises(MalformedRecordsError, match=r"multiLine"):
        etl.read_source(any_spark, path, schema="id INT, text STRING")
    df = etl.read_source(any_spark, path, schema="id INT, text STRING", options={"multiLine": "true"})
    assert rows(df) == [(1, "first\nsecond"), (2, "plain")]


def test_a_damaged_compressed_file_is_named_with_its_cause(any_spark, tmp_path):
    path = tmp_path / "rows.csv.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"rows\.csv\.gz.*(GZIP|gzip)") as info:
        etl.read_source(any_spark, path, schema="id INT")
    assert "Py4J" not in str(info.value) and "\tat " not in str(info.value)


def test_pretty_printed_json_says_it_is_not_json_lines(any_spark, tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('{\n  "a": 1\n}\n')
    with pytest.raises(ValueError, match=r"doc\.json.*JSON lines.*multiLine"):
        etl.read_source(any_spark, path)
