"""The shared MDS format module against Mosaic's own writer and reader, byte for byte."""

import json
import os

import numpy as np
import pytest

from sparkbridge.format import codecs
from sparkbridge.format import mds as fmt


def _stock_shard(tmp_path, columns, samples, compression=None):
    from streaming import MDSWriter

    out = str(tmp_path / "stock")
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=["xxh64"], size_limit=None) as w:
        for s in samples:
            w.write(s)
    index = json.load(open(os.path.join(out, "index.json")))
    entry = index["shards"][0]
    path = os.path.join(out, (entry["zip_data"] or entry["raw_data"])["basename"])
    data = open(path, "rb").read()
    return entry, codecs.decompress(entry["compression"], data)


def test_pack_rows_matches_stock_writer_bytes(tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    ints = rng.integers(-128, 127, n).astype(np.int8)
    floats = rng.standard_normal(n).astype(np.float32)
    words = ["", "é", "naïve", "x" * 300] + [f"w{i}" for i in range(n - 4)]
    vecs = [rng.standard_normal(3).astype(np.float64) for _ in range(n)]
    columns = {"a_int": "int8", "b_str": "str", "c_float": "float32", "d_vec": "ndarray:float64:3"}
    samples = [{"a_int": ints[i], "b_str": words[i], "c_float": floats[i], "d_vec": vecs[i]} for i in range(n)]
    entry, stock = _stock_shard(tmp_path, columns, samples)

    encoded = [w.encode("utf-8") for w in words]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    data, sizes = fmt.pack_rows([
        fmt.FixedColumn(ints),
        fmt.VarColumn(offsets, np.frombuffer(b"".join(encoded), np.uint8)),
        fmt.FixedColumn(floats),
        fmt.FixedColumn(np.stack(vecs)),
    ])
    config = fmt.shard_config(
        column_names=sorted(columns), column_encodings=[columns[k] for k in sorted(columns)],
        compression=None, hashes=["xxh64"], size_limit=None,
    )
    ours = fmt.encode_shard(config, data, sizes)
    assert ours == stock
    assert config["column_sizes"] == entry["column_sizes"]


def test_decode_gathers_match_values(tmp_path):
    n = 20
    columns = {"i": "int64", "s": "str", "f": "float64", "arr": "ndarray:int32", "j": "json"}
    samples = [
        {"i": -i, "s": "é" * i, "f": i / 3, "arr": np.arange(i + 1, dtype=np.int32), "j": {"k": i}}
        for i in range(n)
    ]
    entry, raw = _stock_shard(tmp_path, columns, samples, compression="zstd")
    layout = fmt.ShardLayout.from_index_entry(entry)
    offsets = fmt.sample_offsets(raw)
    assert len(offsets) == n + 1
    rows = np.array([5, 0, 19, 5])
    starts, sizes = fmt.column_starts(raw, offsets, layout, rows)
    c = {name: k for k, name in enumerate(layout.column_names)}
    assert fmt.gather_fixed(raw, starts[:, c["i"]], "int64").tolist() == [-5, 0, -19, -5]
    assert fmt.gather_fixed(raw, starts[:, c["f"]], "float64").tolist() == [5 / 3, 0.0, 19 / 3, 5 / 3]
    voff, vdata = fmt.gather_var(raw, starts[:, c["s"]], sizes[:, c["s"]])
    strings = [bytes(vdata[voff[k]:voff[k + 1]]).decode() for k in range(len(rows))]
    assert strings == ["é" * 5, "", "é" * 19, "é" * 5]
    for k, r in enumerate(rows):
        s, z = starts[k, c["arr"]], sizes[k, c["arr"]]
        arr = fmt.decode_var_value("ndarray:int32", memoryview(raw)[s:s + z])
        np.testing.assert_array_equal(arr, np.arange(r + 1, dtype=np.int32))
        s, z = starts[k, c["j"]], sizes[k, c["j"]]
        assert fmt.decode_var_value("json", memoryview(raw)[s:s + z]) == {"k": int(r)}


def test_fixed_only_rows_view_as_struct():
    a = np.arange(10, dtype=np.int32)
    b = np.linspace(0, 1, 10).astype(np.float64)
    data, sizes = fmt.pack_rows([fmt.FixedColumn(a), fmt.FixedColumn(b)])
    layout = fmt.ShardLayout(("a", "b"), ("int32", "float64"), (4, 8))
    rows = np.frombuffer(data.tobytes(), dtype=layout.row_dtype())
    np.testing.assert_array_equal(rows["a"], a)
    np.testing.assert_array_equal(rows["b"], b)
    assert sizes.tolist() == [12] * 10


def test_corrupt_offsets_are_named():
    with pytest.raises(fmt.ShardFormatError, match="my.mds"):
        fmt.sample_offsets(b"\x05\x00\x00\x00" + b"\x00" * 8, name="my.mds")


def test_pickle_is_refused():
    assert not fmt.is_supported_encoding("pkl")
    with pytest.raises(fmt.ShardFormatError, match="pickle"):
        fmt.decode_var_value("pkl", b"")


def test_empty_ndarray_header_roundtrip():
    head = bytes([1 << 2 | 0, 0])  # Mosaic's dynamic-shape prefix: ndim 1, 1-byte sizes; size 0
    arr = fmt.decode_ndarray("ndarray:float32", head)
    assert arr.shape == (0,) and arr.dtype == np.float32


@pytest.mark.parametrize("algo", [None, "zstd", "zstd:7", "gz", "bz2"])
def test_compression_roundtrip(algo):
    payload = os.urandom(1000) + b"a" * 5000
    assert codecs.decompress(algo, codecs.compress(algo, payload)) == payload


def test_fixed_only_rows_copy_each_columns_bytes_as_they_are():
    """The strided fast path for fixed-width rows, against a byte-wise reference: odd widths,
    big-endian values, sliced (non-contiguous) and 2-D columns, zero rows."""
    rng = np.random.default_rng(3)
    n = 41
    columns = [
        fmt.FixedColumn(rng.integers(0, 255, n).astype(np.uint8)),
        fmt.FixedColumn(rng.standard_normal(n).astype(">f8")),
        fmt.FixedColumn(rng.standard_normal((n, 3, 2)).astype(np.float32)),
        fmt.FixedColumn(rng.integers(-9, 9, (n, 6)).astype(np.int16)[:, ::2]),
        fmt.FixedColumn(np.arange(3 * n, dtype="<i8")[::3]),
    ]
    reference = np.concatenate([c.as_bytes() for c in columns], axis=1).reshape(-1)
    data, sizes = fmt.pack_rows(columns)
    assert data.dtype == np.uint8 and data.tobytes() == reference.tobytes()
    assert sizes.tolist() == [1 + 8 + 24 + 6 + 8] * n
    empty, none = fmt.pack_rows([fmt.FixedColumn(c.values[:0]) for c in columns])
    assert empty.size == 0 and none.size == 0


@pytest.mark.parametrize("algo", ["zstd", "zstd:1", "zstd:-5", "zstd:19"])
def test_zstd_writes_one_standard_frame_from_any_buffer(algo):
    """Compression may use Arrow's zstd (no copy, one thread); readers use ``zstd.decompress``, as
    Mosaic does, which needs the content size in the frame header."""
    import zstd

    payload = np.frombuffer(os.urandom(3000) + bytes(range(256)) * 400, dtype=np.uint8)
    for buf in (payload.tobytes(), memoryview(payload), payload, payload[7:]):
        zipped = codecs.compress(algo, buf)
        assert isinstance(zipped, bytes)
        assert zstd.decompress(zipped) == bytes(memoryview(buf)) == codecs.decompress(algo, zipped)
        desc = zipped[4]  # frame header descriptor: a content size is there unless both are 0
        assert int.from_bytes(zipped[:4], "little") == 0xFD2FB528 and (desc >> 6 or desc >> 5 & 1)



def test_an_index_checks_each_layout_once_and_its_entries_share_the_column_lists():
    import copy

    from sparkbridge.errors import ShardFormatError
    from sparkbridge.format.index import check_index

    def entry(k, names=("id", "x"), encodings=("int64", "float32"), sizes=(8, 4)):
        return {"column_names": list(names), "column_encodings": list(encodings), "column_sizes": list(sizes),
                "compression": None, "format": "mds", "hashes": [], "samples": 10, "size_limit": 1 << 20,
                "version": 2, "raw_data": {"basename": f"shard.{k:05d}.mds", "bytes": 1000, "hashes": {}},
                "zip_data": None}

    shards = [entry(0), entry(1), entry(2, names=("id", "y")), entry(3)]
    before = copy.deepcopy(shards)
    out = check_index({"version": 2, "shards": shards}, where="index.json")
    assert out == before  # the same values
    assert out[1]["column_names"] is out[0]["column_names"] is out[3]["column_names"]
    assert out[1]["column_sizes"] is out[0]["column_sizes"]
    assert out[2]["column_names"] is not out[0]["column_names"]  # another layout keeps its own
    bad = [entry(0), entry(1, sizes=(8, 4.0))]  # equal to entry 0's sizes, and not ints
    with pytest.raises(ShardFormatError, match=r"index.json, shard 1: column 'x': size 4.0 is not an int"):
        check_index({"version": 2, "shards": bad}, where="index.json")


def _index_entry(k: int = 0) -> dict:
    return {"column_names": ["id", "s"], "column_encodings": ["int64", "str"], "column_sizes": [8, None],
            "compression": "zstd", "format": "mds", "hashes": ["xxh64"], "samples": 16, "size_limit": 1 << 20,
            "version": 2,
            "raw_data": {"basename": f"w/p0/shard.{k:05d}.mds", "bytes": 4 * 18 + 16 * 12, "hashes": {"xxh64": "ab"}},
            "zip_data": {"basename": f"w/p0/shard.{k:05d}.mds.zstd", "bytes": 90, "hashes": {"xxh64": "cd"}}}


#: one change each, in place, to a valid entry (the second of an index, after one that registered
#: its layout); "not a dict" replaces it
_MUTATIONS = {
    "not a dict": None,
    "format": lambda e: e.update(format="parquet"),
    "format absent": lambda e: e.pop("format"),
    "samples bool": lambda e: e.update(samples=True),
    "samples negative": lambda e: e.update(samples=-1),
    "samples 2^32": lambda e: e.update(samples=1 << 32),
    "samples float": lambda e: e.update(samples=16.0),
    "samples too many for the bytes": lambda e: e.update(samples=17),
    "names a tuple": lambda e: e.update(column_names=("id", "s")),
    "names unhashable": lambda e: e.update(column_names=[["id"], "s"]),
    "sizes float": lambda e: e.update(column_sizes=[8.0, None]),
    "another layout": lambda e: e.update(column_names=["id", "t"]),
    "raw missing": lambda e: e.pop("raw_data"),
    "raw name absolute": lambda e: e["raw_data"].update(basename="/etc/passwd"),
    "raw name dotdot": lambda e: e["raw_data"].update(basename="w/../../x.mds"),
    "raw name not plain but safe": lambda e: e["raw_data"].update(basename="w/p0/shard 0.mds"),
    "raw name int": lambda e: e["raw_data"].update(basename=7),
    "raw bytes bool": lambda e: e["raw_data"].update(bytes=True),
    "raw bytes negative": lambda e: e["raw_data"].update(bytes=-1),
    "raw bytes 4 GiB + 1": lambda e: e["raw_data"].update(bytes=(1 << 32) + 1),
    "raw hashes a list": lambda e: e["raw_data"].update(hashes=["ab"]),
    "raw hashes an int value": lambda e: e["raw_data"].update(hashes={"xxh64": 7}),
    "raw hashes empty list": lambda e: e["raw_data"].update(hashes=[]),
    "raw hashes absent": lambda e: e["raw_data"].pop("hashes"),
    "zip absent": lambda e: e.pop("zip_data"),
    "zip None": lambda e: e.update(zip_data=None),
    "zip without compression": lambda e: e.update(compression=None),
    "zip a string": lambda e: e.update(zip_data="x.zstd"),
    "zip name dotdot": lambda e: e["zip_data"].update(basename="../x.zstd"),
    "zip bytes string": lambda e: e["zip_data"].update(bytes="90"),
}


@pytest.mark.parametrize("name", sorted(_MUTATIONS))
def test_the_fast_index_check_accepts_exactly_what_the_full_check_accepts(name):
    """:func:`check_index_entries` decides most entries on a fast path; for every change to an
    entry it must accept and refuse what :func:`check_index_entry` (the full check) does, with the
    same error naming the entry."""
    from sparkbridge.errors import SparkbridgeError
    from sparkbridge.format.index import check_index_entries, check_index_entry

    def mutated():
        if _MUTATIONS[name] is None:
            return ["x"]
        e = _index_entry(1)
        _MUTATIONS[name](e)
        assert repr(e) != repr(_index_entry(1))
        return e

    full_error = fast_error = None
    try:
        check_index_entry(mutated(), where="x.json, shard 1")
    except SparkbridgeError as exc:
        full_error = f"{type(exc).__name__}: {exc}"
    first, second = _index_entry(0), mutated()
    try:
        out = check_index_entries([first, second], where="x.json")
    except SparkbridgeError as exc:
        fast_error = f"{type(exc).__name__}: {exc}"
    assert fast_error == full_error
    if full_error is None:
        assert out == [_index_entry(0), mutated()] and out[1] is second
        if out[1]["column_names"] == out[0]["column_names"]:  # the same layout: its lists are shared
            assert out[1]["column_names"] is out[0]["column_names"]
