"""``sparkbridge inspect`` / ``validate`` on real datasets: stock MDSWriter output and write_mds output.

Each problem is planted in a real file (a flipped byte, a deleted shard, a stray attempt folder, an
edited index) and the report must name it; the clean dataset must pass.
"""

from __future__ import annotations

import json
import os
import time
import shutil

import pytest

from sparkbridge.jobs import cli
from sparkbridge.jobs.datasets import inspect_dataset, validate_dataset

STOCK_ROWS = 600


@pytest.fixture(scope="module")
def stock_dataset(tmp_path_factory):
    """Written by Mosaic's own MDSWriter: index.json only, zstd, two hashes, several shards."""
    from streaming import MDSWriter

    out = tmp_path_factory.mktemp("stock") / "ds"
    with MDSWriter(out=str(out), columns={"x": "int64", "s": "str"}, compression="zstd",
                   hashes=["sha1", "xxh64"], size_limit=1 << 12) as writer:
        for i in range(STOCK_ROWS):
            writer.write({"x": i, "s": f"row {i}"})
    return out


@pytest.fixture
def stock(stock_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(stock_dataset, copy)
    return copy


def shard_names(root):
    return [e["zip_data"]["basename"] for e in json.loads((root / "index.json").read_text())["shards"]]


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_inspect_stock_dataset(stock, capsys):
    info = inspect_dataset(str(stock))
    assert info["rows"] == STOCK_ROWS
    assert info["shards"] == len(shard_names(stock)) > 2
    assert info["compression"] == "zstd"
    assert info["hashes"] == ["sha1", "xxh64"]
    assert info["manifest"] is False
    assert [(c["name"], c["mds"], c["logical"]) for c in info["columns"]] == [("s", "str", None), ("x", "int64", None)]
    code, out = run_cli(capsys, "inspect", str(stock), "--json")
    assert code == 0 and json.loads(out)["rows"] == STOCK_ROWS
    code, out = run_cli(capsys, "inspect", str(stock))
    assert code == 0 and "rows         600" in out and "stock MDS dataset" in out


def test_validate_clean_then_each_problem(stock, capsys):
    code, out = run_cli(capsys, "validate", str(stock))
    assert code == 0, out
    assert out.startswith(f"OK: {stock}: 600 rows")

    names = shard_names(stock)
    # A reader's unpacked copy of a referenced shard is a cache, not an orphan.
    from sparkbridge.format.codecs import decompress

    raw = decompress("zstd", (stock / names[0]).read_bytes())
    (stock / names[0].removesuffix(".zstd")).write_bytes(raw)
    assert validate_dataset(str(stock), progress=False).ok

    # One flipped byte in shard 1, shard 2 deleted.
    data = bytearray((stock / names[1]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (stock / names[1]).write_bytes(bytes(data))
    (stock / names[2]).unlink()
    code, out = run_cli(capsys, "validate", str(stock))
    assert code == 1
    assert out.startswith(f"FAILED: {stock}")
    assert f"shard 1 ({names[1]}): sha1 hash is" in out
    assert f"shard 1 ({names[1]}): xxh64 hash is" in out
    assert f"shard 2 ({names[2]}): missing" in out
    report = validate_dataset(str(stock), progress=False)
    assert not any(names[0] in p for p in report.problems)
    assert all(names[1] in p or names[2] in p for p in report.problems), report.problems


def test_validate_index_problems(stock):
    index = json.loads((stock / "index.json").read_text())
    index["shards"].append(dict(index["shards"][0]))  # the same shard twice: rows read twice
    index["shards"][1]["samples"] += 1
    index["shards"][2]["zip_data"]["hashes"]["md99"] = "00"  # a hash this reader does not know
    (stock / "index.json").write_text(json.dumps(index))
    report = validate_dataset(str(stock), progress=False)
    names = shard_names(stock)
    assert any(p.startswith(f"shard 2 ({names[2]}): could not be checked:") and "md99" in p
               for p in report.problems), report.problems
    assert any(f"({names[0]}) is listed twice" in p for p in report.problems)
    assert any(f"shard 1 ({names[1]}): holds" in p and "index says" in p for p in report.problems)

    empty = stock.parent / "empty"
    empty.mkdir()
    report = validate_dataset(str(empty), progress=False)
    assert not report.ok and "no dataset at" in report.problems[0]


@pytest.mark.slow
def test_written_dataset_orphans_and_manifest(spark, tmp_path, capsys):
    from sparkbridge import etl
    from sparkbridge.log.layout import new_write_id

    out = tmp_path / "out"
    df = spark.createDataFrame([(i, f"n{i}", None if i % 3 else i / 2) for i in range(40)], "id INT, name STRING, v DOUBLE")
    result = etl.write_mds(df.repartition(2), str(out), nulls="mask")
    assert result.rows == 40
    info = inspect_dataset(str(out))
    assert info["rows"] == 40 and info["manifest_rows"] == 40 and info["nulls"] == "mask"
    cols = {c["name"]: c for c in info["columns"]}
    assert (cols["id"]["logical"], cols["id"]["mds"], cols["v"]["null_mask"]) == ("int32", "int32", "v__null")
    assert validate_dataset(str(out), progress=False).ok

    # A write that is still running (or stopped minutes ago) is not an orphan: only a note.
    stray = out / new_write_id() / "p00007-a99" / "shard.00000.mds.zstd"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x" * 10)
    report = validate_dataset(str(out), progress=False)
    assert report.ok and any("has files but no commit yet" in n for n in report.notes)
    # Leftover of a run that crashed two hours ago: an orphan, listed by vacuum --dry-run, then removed.
    old = time.time() - 7200
    os.utime(stray, (old, old))
    code, text = run_cli(capsys, "validate", str(out), "--json")
    report = json.loads(text)
    assert code == 1 and report["ok"] is False
    rel = str(stray.relative_to(out))
    assert report["orphans"] == [rel]
    assert report["problems"] == [f"orphan: {out}/{rel} (a write that never committed, idle for longer than the "
                                  "retention window; `sparkbridge vacuum` removes it)"]
    code, text = run_cli(capsys, "vacuum", str(out), "--dry-run")
    assert code == 0 and rel in text and "would delete" in text and stray.exists()
    code, text = run_cli(capsys, "vacuum", str(out))
    assert code == 0 and not stray.exists() and not stray.parent.exists()
    assert validate_dataset(str(out), progress=False).ok

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["rows"] = 41
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = validate_dataset(str(out), progress=False)
    assert report.problems == ["manifest.json says 41 rows, index.json lists 40"]


def test_validate_on_s3(s3_bucket, stock_dataset):
    """The same checks through the S3 API of a real SeaweedFS server."""
    client = s3_bucket.server.client()
    for path in sorted(stock_dataset.iterdir()):
        client.put_object(Bucket=s3_bucket.name, Key=f"ds/{path.name}", Body=path.read_bytes())
    root = s3_bucket.url("ds")
    report = validate_dataset(root, progress=False)
    assert report.ok, report.problems
    assert (report.rows, report.shards) == (STOCK_ROWS, len(shard_names(stock_dataset)))
    name = shard_names(stock_dataset)[0]
    client.put_object(Bucket=s3_bucket.name, Key=f"ds/{name}", Body=b"garbage")
    report = validate_dataset(root, progress=False)
    assert not report.ok
    assert any(p.startswith(f"shard 0 ({name}): 7 bytes, index says") for p in report.problems), report.problems
