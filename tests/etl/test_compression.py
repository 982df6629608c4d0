"""Compressed shards: one zstd frame per ``.mds.zstd`` file, read back exactly.

The writer compresses with Arrow's zstd codec (see :mod:`sparkbridge.format.codecs`); every file
must decompress with ``zstd.decompress`` (what stock Mosaic calls) to exactly the shard's bytes,
and both stock ``StreamingDataset`` and our ``StreamingLoader`` must read every value back.

One frame, not several: compressing a shard piece by piece while its batches arrive was measured
(no gain end to end on 2 busy cores) and dropped, because python-zstd (Mosaic's decompressor) reads
concatenated frames only since 1.5.5.1 and sizes its output from a loop that stops early for some
frame-size sequences ("Destination buffer is too small"). These tests pin the single frame.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkbridge import etl
from sparkbridge.format import codecs
from sparkbridge.format import mds as mf

_MAGIC = 0xFD2FB528


def zstd_frames(data: bytes) -> list[int]:
    """Content-less walk over a zstd file (RFC 8878): the byte length of each frame, in order."""
    lengths, pos = [], 0
    while pos < len(data):
        start = pos
        assert int.from_bytes(data[pos:pos + 4], "little") == _MAGIC, f"no frame magic at byte {pos}"
        desc = data[pos + 4]
        fcs_flag, single, checksum, dict_flag = desc >> 6, (desc >> 5) & 1, (desc >> 2) & 1, desc & 3
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
        pos += (1 if single else 0, 2, 4, 8)[fcs_flag]
        while True:
            header = int.from_bytes(data[pos:pos + 3], "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            pos += 3 + (1 if kind == 1 else size)
            if last:
                break
        pos += 4 * checksum
        lengths.append(pos - start)
    assert pos == len(data)
    return lengths


def _task_config(tmp_path, plans, shard_size):
    from sparkbridge.etl.task import TaskConfig
    from sparkbridge.storage import open_storage

    storage = open_storage(str(tmp_path))
    job = "j20260101T000000-00000001"
    os.makedirs(storage.local_path(f"_staging/{job}"))
    return TaskConfig(storage=storage, job_id=job, plans=tuple(plans), compression="zstd",
                      hashes=("xxh64", "sha1"), shard_size=shard_size, nulls="error")


def test_task_writes_one_frame_per_shard_that_decompresses_exactly(tmp_path):
    """Without Spark: batches of fixed and variable columns, shards of a few MiB."""
    import pyarrow as pa
    import zstd
    from pyspark.sql import types as T

    from sparkbridge.etl.task import run_task
    from sparkbridge.etl.types import plan_columns

    schema = T.StructType([T.StructField("id", T.LongType(), False), T.StructField("x", T.DoubleType(), False),
                           T.StructField("s", T.StringType(), False)])
    plans = plan_columns(schema, columns=None, nulls="error", decimals="string")
    cfg = _task_config(tmp_path, plans, shard_size=(3 << 20) + 12345)
    n, per_batch = 120_000, 7_000  # batches straddle shard boundaries
    ids = np.arange(n, dtype=np.int64)
    texts = [f"row {k} " + "ab" * (k % 9) for k in range(n)]
    batches = [pa.RecordBatch.from_arrays([pa.array(ids[i:i + per_batch]), pa.array(ids[i:i + per_batch] / 3),
                                           pa.array(texts[i:i + per_batch])], ["id", "x", "s"])
               for i in range(0, n, per_batch)]
    row = run_task(cfg, iter(batches), partition=0, task_attempt_id=1, attempt_number=0)
    folder = os.path.join(tmp_path, "_staging", cfg.job_id, row["attempt"])
    got_ids, got_x, got_s = [], [], []
    assert len(row["entries"]) >= 2
    for entry in row["entries"]:
        with open(os.path.join(folder, entry["zip_data"]["basename"]), "rb") as f:
            zipped = f.read()
        assert len(zstd_frames(zipped)) == 1
        raw = zstd.decompress(zipped)  # Mosaic's own call
        assert raw == codecs.decompress("zstd", zipped)
        assert len(raw) == entry["raw_data"]["bytes"] <= cfg.shard_size
        assert len(zipped) == entry["zip_data"]["bytes"]
        for algo in ("xxh64", "sha1"):
            assert codecs.hash_bytes(algo, raw) == entry["raw_data"]["hashes"][algo]
            assert codecs.hash_bytes(algo, zipped) == entry["zip_data"]["hashes"][algo]
        layout = mf.ShardLayout.from_index_entry(entry)
        offsets = mf.sample_offsets(raw)
        starts, sizes = mf.column_starts(raw, offsets, layout)
        got_ids += mf.gather_fixed(raw, starts[:, 0], "int64").tolist()
        got_x += mf.gather_fixed(raw, starts[:, 1], "float64").tolist()
        voff, vdata = mf.gather_var(raw, starts[:, 2], sizes[:, 2])
        got_s += [bytes(vdata[a:b]).decode() for a, b in zip(voff[:-1], voff[1:])]
    assert got_ids == ids.tolist() and got_x == (ids / 3).tolist() and got_s == texts


@pytest.mark.slow
def test_benchmark_table_read_exactly_by_stock_mosaic_and_the_loader(spark, tmp_path):
    """Real Spark, the benchmark's kind of table: exact values through both readers."""
    import zstd
    from pyspark.sql import functions as F
    from streaming import StreamingDataset

    from sparkbridge.bridge import StreamingLoader

    n = 40_000
    cols = [((F.col("id") * (k + 3)) % 1001 / 7).cast("float").alias(f"f{k:02d}") for k in range(16)]
    df = spark.range(0, n, numPartitions=2).select(
        "id", *cols, F.col("id").cast("int").alias("i32"), F.concat(F.lit("s"), F.col("id")).alias("s"))
    out = tmp_path / "ds"
    res = etl.write_mds(df, str(out))
    assert res.rows == n and res.shards == 2
    with open(out / "index.json") as f:
        shards = json.load(f)["shards"]
    for entry in shards:
        zipped = (out / entry["zip_data"]["basename"]).read_bytes()
        assert len(zstd_frames(zipped)) == 1 and entry["raw_data"]["bytes"] > 1 << 20
        assert len(zstd.decompress(zipped)) == entry["raw_data"]["bytes"]

    ids = np.arange(n)
    want = {f"f{k:02d}": (((ids * (k + 3)) % 1001) / 7).astype(np.float32) for k in range(16)}
    stock = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    assert len(stock) == n
    seen = 0
    for i in range(n):
        sample = stock[i]
        k = int(sample["id"])
        assert k == i and int(sample["i32"]) == k and sample["s"] == f"s{k}"
        for name, values in want.items():
            assert np.float32(sample[name]) == values[k], (name, k)
        seen += 1
    assert seen == n

    loader = StreamingLoader(str(out), batch_size=4096)
    got = {name: [] for name in ["id", "i32", *want]}
    for batch in loader:
        for name in got:
            got[name].append(batch[name].numpy())
    loader.close()
    order = np.concatenate(got["id"])
    assert sorted(order.tolist()) == ids.tolist()
    assert np.array_equal(np.concatenate(got["i32"]), order.astype(np.int32))
    for name, values in want.items():
        assert np.array_equal(np.concatenate(got[name]), values[order]), name
