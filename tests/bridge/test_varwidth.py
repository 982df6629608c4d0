"""Variable-width columns (``bytes``, ``str``, ragged ``ndarray:int32``) travel as one values buffer
plus int64 offsets per column: exact values in the loop and in a transform, with 0 and 2 workers,
empty values, rows of 0 length and a batch whose values are all empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.varwidth import Ragged, VarColumn

N, B = 120, 8
EMPTY_BATCH = range(40, 48)  # batch 5 of an unshuffled pass: every variable-width value empty


def blob_of(k: int) -> bytes:
    if k % 5 == 0 or k in EMPTY_BATCH:
        return b""
    return bytes((k * 7 + i) % 256 for i in range(k % 11 + 1))


def name_of(k: int) -> str:
    return "" if k % 3 == 0 or k in EMPTY_BATCH else f"r{k}é" * (k % 4 + 1)


def tokens_of(k: int) -> np.ndarray:
    n = 0 if k % 7 == 0 or k in EMPTY_BATCH else k % 9 + 1
    return np.arange(n, dtype=np.int32) + k * 100


def ndarray_value(a: np.ndarray, k: int) -> bytes:
    """One ``ndarray:int32`` value as Mosaic's NDArray stores it: (ndim << 2 | shape width code),
    the shape, the elements (shape widths of 1 and 4 bytes, alternating)."""
    code = 0 if k % 2 else 2
    return bytes([1 << 2 | code]) + np.array([a.size], dtype=["<u1", "", "<u4"][code]).tobytes() + a.tobytes()


@pytest.fixture(scope="module")
def var_data(tmp_path_factory):
    """Written with the format module (Mosaic's MDSWriter refuses arrays of 0 elements, which
    sparkbridge's writer stores): 12 shards of 10 rows."""
    import json

    from sparkbridge.format import mds as fmt

    out = tmp_path_factory.mktemp("varwidth") / "ds"
    out.mkdir()
    names = ["id", "blob", "name", "tokens", "x"]
    encodings = ["int64", "bytes", "str", "ndarray:int32", "float32"]
    config = fmt.shard_config(column_names=names, column_encodings=encodings, compression=None,
                              hashes=["xxh64"], size_limit=None)

    def var(values: list) -> "fmt.VarColumn":
        offsets = np.concatenate(([0], np.cumsum([len(v) for v in values]))).astype(np.int64)
        return fmt.VarColumn(offsets, np.frombuffer(b"".join(values), np.uint8))

    entries = []
    for s in range(N // 10):
        ks = range(s * 10, s * 10 + 10)
        data, sizes = fmt.pack_rows([
            fmt.FixedColumn(np.array(ks, dtype=np.int64)),
            var([blob_of(k) for k in ks]), var([name_of(k).encode() for k in ks]),
            var([ndarray_value(tokens_of(k), k) for k in ks]),
            fmt.FixedColumn(np.array([k / 2 for k in ks], dtype=np.float32)),
        ])
        raw = fmt.encode_shard(config, data, sizes)
        (out / f"shard.{s:05}.mds").write_bytes(raw)
        entries.append(fmt.index_entry(config, samples=10, raw_basename=f"shard.{s:05}.mds", raw=raw))
    (out / "index.json").write_text(json.dumps({"version": 2, "shards": entries}))
    return out


def check_batch(ids, blob, name, tokens) -> None:
    """Exact values of one batch, in the batch's row order."""
    assert [bytes(b) for b in blob] == [blob_of(k) for k in ids]
    assert all(type(b) is bytes for b in blob)
    assert list(name) == [name_of(k) for k in ids]
    assert isinstance(tokens, Ragged) and tokens.values.dtype == torch.int32
    want = [tokens_of(k) for k in ids]
    assert tokens.offsets.tolist() == np.concatenate(([0], np.cumsum([len(t) for t in want]))).tolist()
    assert tokens.values.tolist() == np.concatenate(want).tolist()
    assert [t.tolist() for t in tokens] == [t.tolist() for t in want]
    assert tokens.lengths().tolist() == [len(t) for t in want]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_loop_receives_exact_values_as_lists_and_ragged(var_data, workers, shuffle):
    loader = StreamingLoader(var_data, batch_size=B, shuffle=shuffle, seed=5, num_workers=workers)
    seen = []
    for k, batch in enumerate(loader):
        ids = batch["id"].tolist()
        assert isinstance(batch["blob"], list) and isinstance(batch["name"], list)  # as documented
        check_batch(ids, batch["blob"], batch["name"], batch["tokens"])
        assert batch["x"].tolist() == [i / 2 for i in ids]
        if not shuffle and k == 5:
            assert ids == list(EMPTY_BATCH)
            assert batch["blob"] == [b""] * B and batch["name"] == [""] * B
            assert batch["tokens"].values.numel() == 0 and batch["tokens"].offsets.tolist() == [0] * (B + 1)
        seen += ids
    loader.close()
    assert sorted(seen) == list(range(N))


def _inspect(batch):
    """A transform that reports what it received."""
    blob, name, tokens = batch["blob"], batch["name"], batch["tokens"]
    return {"id": batch["id"], "kinds": (type(blob).__name__, type(name).__name__, type(tokens).__name__),
            "blob_values": torch.from_numpy(np.asarray(blob.values).copy()),
            "blob_offsets": torch.from_numpy(np.asarray(blob.offsets).copy()),
            "blob": list(blob), "name": list(name), "tokens": tokens, "row0": blob[0] if len(blob) else None}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_transform_receives_values_and_offsets(var_data, workers, shuffle):
    loader = StreamingLoader(var_data, batch_size=B, shuffle=shuffle, seed=6, num_workers=workers,
                             transform=_inspect)
    seen = []
    for out in loader:
        ids = out["id"].tolist()
        assert out["kinds"] == ("VarColumn", "VarColumn", "Ragged")
        check_batch(ids, out["blob"], out["name"], out["tokens"])
        want = [blob_of(k) for k in ids]
        assert out["blob_values"].numpy().tobytes() == b"".join(want)
        assert out["blob_offsets"].tolist() == np.concatenate(([0], np.cumsum([len(b) for b in want]))).tolist()
        assert type(out["row0"]) is bytes and out["row0"] == want[0]
        seen += ids
    loader.close()
    assert sorted(seen) == list(range(N))


def test_a_worker_hands_over_one_buffer_without_an_object_per_row(var_data):
    from sparkbridge.bridge.iterate import iter_batches

    loader = StreamingLoader(var_data, batch_size=B, shuffle=False)
    ds = loader.dataset
    ids = np.array([3, 117, 40, 0, 64, 9, 41, 77], dtype=np.int64)  # rows of several shards
    batch = next(iter_batches(ds, ids))
    assert batch.extras == {} and set(batch.var) == {"blob", "name", "tokens"}
    assert batch.nbytes == batch.buf.nbytes
    out = ds.plan.to_tensors(batch, lists=False)
    check_batch(ids.tolist(), out["blob"], out["name"], out["tokens"])
    assert isinstance(out["blob"], VarColumn) and out["blob"] == [blob_of(k) for k in ids]
    loader.close()


def test_rows_of_more_than_one_dimension_keep_a_tensor_per_row(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "nd"), columns={"id": "int64", "m": "ndarray:float32"}) as w:
        for k in range(10):
            w.write({"id": np.int64(k), "m": np.full((k % 3 + 1, 2), k, dtype=np.float32)})
    loader = StreamingLoader(tmp_path / "nd", batch_size=5)
    got = [t for batch in loader for t in batch["m"]]
    assert [t.shape for t in got] == [(k % 3 + 1, 2) for k in range(10)]
    assert [float(t[0, 0]) for t in got] == list(range(10))
    loader.close()


@pytest.mark.parametrize("transform", [None, "identity"])
def test_a_batch_larger_than_its_shared_slot_still_arrives_whole(tmp_path, transform):
    """Slots are sized from the mean row; a batch of the longest rows travels through torch's
    shared memory instead (one buffer, still no object per row)."""
    from streaming import MDSWriter

    def blob(k: int) -> bytes:
        return bytes([k % 251]) * (20_000 if k % 10 < 5 else 3)

    with MDSWriter(out=str(tmp_path / "big"), columns={"id": "int64", "blob": "bytes"}, size_limit=120_000) as w:
        for k in range(40):
            w.write({"id": np.int64(k), "blob": blob(k)})
    fn = (lambda b: {"id": b["id"], "blob": list(b["blob"])}) if transform else None
    loader = StreamingLoader(tmp_path / "big", batch_size=5, num_workers=2, transform=fn)
    assert loader.dataset.plan.slot_bytes(5, loader.dataset.table) < 5 * 20_000  # the long batches do not fit
    got = {}
    for batch in loader:
        for k, b in zip(batch["id"].tolist(), batch["blob"]):
            got[k] = b
    loader.close()
    assert got == {k: blob(k) for k in range(40)}
