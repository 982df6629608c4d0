"""Batch values equal stock Mosaic's per-sample values, for every encoding and writer."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

from sparkbridge.bridge import StreamingLoader
from tests.bridge.util import EVERY_ENCODING, equal, write_every_encoding, write_numeric

ROWS = 150


def _as_stock(column: str, value):
    """Our batch value in the type stock Mosaic returns for one sample."""
    if column == "si":
        return int(value)
    if column == "sf":
        return float(value)
    return value


@pytest.fixture(scope="module", params=[None, "zstd"])
def every_encoding(request, tmp_path_factory):
    return write_every_encoding(tmp_path_factory.mktemp("enc") / "ds", ROWS, compression=request.param)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_encoding_matches_stock_per_sample(every_encoding, num_workers):
    from streaming import StreamingDataset

    stock = StreamingDataset(local=str(every_encoding), batch_size=37, shuffle=True)
    stock_order = [int(s["id"]) for s in stock]
    loader = StreamingLoader(every_encoding, batch_size=37, shuffle=True, shuffle_algo="py1e", num_workers=num_workers)
    assert len(loader) == 5
    ids, checked = [], 0
    for batch in loader:
        assert set(batch) == set(EVERY_ENCODING)
        assert isinstance(batch["name"], list) and isinstance(batch["grid"], torch.Tensor)
        assert batch["grid"].shape[1:] == (2, 3) and batch["u64"].dtype == torch.uint64
        for i, k in enumerate(batch["id"].tolist()):
            ref = stock[k]
            for col, values in batch.items():
                got = _as_stock(col, values[i])
                assert equal(got, ref[col]), (col, k, got, ref[col])
                checked += 1
        ids += batch["id"].tolist()
    loader.close()
    assert checked == ROWS * len(EVERY_ENCODING)
    assert ids == stock_order  # Mosaic's sample order, untouched


def test_column_selection_and_features(tmp_path):
    ds = write_numeric(tmp_path / "num", 100)
    loader = StreamingLoader(ds, batch_size=16, columns=["y", "id"])
    first = next(iter(loader))
    assert list(first) == ["y", "id"] and first["id"].tolist() == list(range(16))
    xy = StreamingLoader(ds, batch_size=16, features=["x", "y", "id"], label="y", drop_last=True)
    batches = list(xy)
    assert len(batches) == len(xy) == 6  # 100 // 16, the partial batch dropped
    x, y = batches[1]
    assert x.dtype == torch.float32 and x.shape == (16, 3)
    ids = np.arange(16, 32)
    assert np.array_equal(x.numpy(), np.stack([ids / 4, ids % 7, ids], axis=1).astype(np.float32))
    assert y.dtype == torch.int32 and y.tolist() == (ids % 7).tolist()
    with pytest.raises(ValueError, match="unknown column"):
        StreamingLoader(ds, batch_size=4, columns=["nope"])
    with pytest.raises(ValueError, match="both `features` and `label`"):
        StreamingLoader(ds, batch_size=4, features=["x"])


def test_pickle_is_refused(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "p"), columns={"obj": "pkl"}) as w:
        w.write({"obj": {"a": 1}})
    with pytest.raises(ValueError, match=r"obj.*pkl.*pickle can run arbitrary code"):
        StreamingLoader(tmp_path / "p", batch_size=1)


@pytest.mark.slow
def test_spark_writers_manifest_types_and_dataframe_to_mds(spark, tmp_path):
    """sparkbridge.etl.write_mds (manifest: bool, date, timestamp, null masks) and Mosaic's dataframe_to_mds."""
    from pyspark.sql import types as T
    from streaming import StreamingDataset
    from streaming.base.converters import dataframe_to_mds

    from sparkbridge.etl import write_mds

    schema = T.StructType([
        T.StructField("id", T.LongType(), False),
        T.StructField("ok", T.BooleanType(), True),
        T.StructField("day", T.DateType(), True),
        T.StructField("at", T.TimestampType(), True),
        T.StructField("v", T.DoubleType(), True),
        T.StructField("s", T.StringType(), True),
    ])
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = [(i, None if i % 5 == 0 else i % 2 == 0, dt.date(2020, 1, 1) + dt.timedelta(days=i),
             base + dt.timedelta(microseconds=i * 1_000_001), None if i % 3 == 0 else i * 1.5, f"s{i}")
            for i in range(60)]
    df = spark.createDataFrame(rows, schema).repartition(3)
    write_mds(df, str(tmp_path / "ours"), nulls="mask")
    loader = StreamingLoader(tmp_path / "ours", batch_size=7, shuffle=True, seed=3)
    seen = {}
    for batch in loader:
        for i, k in enumerate(batch["id"].tolist()):
            seen[k] = {c: v[i] for c, v in batch.items()}
    assert sorted(seen) == list(range(60))
    assert seen[4]["ok"].dtype == torch.bool and seen[4]["ok"].item() is True and seen[3]["ok"].item() is False
    assert seen[5]["ok__null"].item() is True and seen[4]["ok__null"].item() is False
    assert seen[9]["v__null"].item() is True and seen[10]["v"].item() == 15.0
    assert seen[10]["day"].dtype == torch.int32
    assert seen[10]["day"].item() == (dt.date(2020, 1, 11) - dt.date(1970, 1, 1)).days
    assert seen[7]["at"].dtype == torch.int64
    assert seen[7]["at"].item() == int((base - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()) * 10**6 + 7_000_007
    assert seen[12]["s"] == "s12"

    plain = spark.createDataFrame([(i, float(i) / 2, f"n{i}") for i in range(40)], "id long, x double, s string")
    dataframe_to_mds(plain.coalesce(1), merge_index=True,  # one Python worker: each imports streaming (~10 s)
                     mds_kwargs={"out": str(tmp_path / "mosaic"), "columns": {"id": "int64", "x": "float64", "s": "str"}})
    stock = StreamingDataset(local=str(tmp_path / "mosaic"), batch_size=8)
    got = {}
    for batch in StreamingLoader(tmp_path / "mosaic", batch_size=8, shuffle=True):
        for i, k in enumerate(batch["id"].tolist()):
            got[k] = (batch["x"][i].item(), batch["s"][i])
    assert len(got) == 40
    for j in range(len(stock)):
        ref = stock[j]
        assert got[int(ref["id"])] == (ref["x"], ref["s"])


def test_all_fixed_width_fast_path_matches_stock(tmp_path):
    """Only fixed-width columns (fixed-shape ndarrays and a bool-like uint8 too): whole-row gathers."""
    from streaming import MDSWriter, StreamingDataset

    columns = {"id": "int64", "m": "ndarray:float64:2,2", "flag": "uint8", "h": "float16", "k": "int16"}
    with MDSWriter(out=str(tmp_path / "fx"), columns=columns, size_limit=700, compression="zstd") as w:
        for i in range(90):
            w.write({"id": np.int64(i), "m": np.arange(4, dtype=np.float64).reshape(2, 2) * i,
                     "flag": np.uint8(i % 2), "h": np.float16(i / 4), "k": np.int16(-i)})
    stock = StreamingDataset(local=str(tmp_path / "fx"), batch_size=13)
    loader = StreamingLoader(tmp_path / "fx", batch_size=13, shuffle=True, seed=5)
    assert loader.dataset.decoded(0).rows is not None  # the packed-row path
    seen = 0
    for batch in loader:
        assert batch["m"].shape[1:] == (2, 2) and batch["flag"].dtype == torch.uint8
        for i, k in enumerate(batch["id"].tolist()):
            ref = stock[k]
            for col in columns:
                assert equal(batch[col][i], ref[col]), (col, k)
            seen += 1
    assert seen == 90


@pytest.mark.parametrize("algo", ["py1br", "py1e", "py1s", "py2s", "naive"])
def test_sample_order_is_mosaics_for_every_shuffle_algorithm(tmp_path_factory, algo):
    from streaming import StreamingDataset

    root = tmp_path_factory.getbasetemp() / "order-ds"
    if not root.exists():
        write_numeric(root, 700, size_limit=1500)
    stock = StreamingDataset(local=str(root), batch_size=32, shuffle=True, shuffle_algo=algo, shuffle_seed=77,
                             shuffle_block_size=200)
    want = [int(s["id"]) for s in stock]
    loader = StreamingLoader(root, batch_size=32, shuffle=True, shuffle_algo=algo, seed=77, shuffle_block_size=200)
    got = [i for batch in loader for i in batch["id"].tolist()]
    assert got == want and set(got) == set(range(700))  # py1s/py2s: 64 canonical nodes repeat a few


def test_the_adapters_shard_readers_equal_mosaics_own(every_encoding):
    """bridge.mosaic builds Mosaic's MDSReader without reader_from_json's deepcopy; a Mosaic
    upgrade that changes the reader's fields must fail here, not in a training run."""
    import json

    from streaming.base.format import reader_from_json

    from sparkbridge.bridge.mosaic import _reader

    entries = json.loads((every_encoding / "index.json").read_text())["shards"]
    assert entries
    for entry in entries:
        ours, stock = _reader("/x", None, entry), reader_from_json("/x", None, entry)
        assert type(ours) is type(stock)
        assert vars(ours).keys() == vars(stock).keys()
        for key, value in vars(stock).items():
            mine = getattr(ours, key)
            if hasattr(value, "__dict__"):  # FileInfo
                assert vars(mine) == vars(value), key
            else:
                assert mine == value, key
