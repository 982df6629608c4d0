"""Small shards enter the resident table through bridge/smallshard.py: the same rows as the general
path, and every damaged shard is still refused by the general path, naming it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zstd

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.smallshard import SmallShards
from sparkbridge.errors import ShardFormatError, UnsafePathError
from sparkbridge.format.paths import Confiner
from tests.bridge.util import write_numeric

N = 3000  # 16-byte rows in ~4 KB shards: ~12 shards


@pytest.fixture(scope="module", params=["zstd", None])
def data(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "ds"
    return write_numeric(out, N, compression=request.param, size_limit=1 << 12)


def read_all(loader):
    batches = [{k: v.numpy().copy() for k, v in b.items()} for b in loader]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_small_shards_are_read_quickly_and_give_the_same_rows(data):
    loader = StreamingLoader(data, batch_size=100, shuffle=True, seed=3)
    got = read_all(loader)
    order = np.argsort(got["id"])
    assert got["id"][order].tolist() == list(range(N))
    assert np.array_equal(got["x"][order], np.arange(N, dtype=np.float32) / 4)
    assert np.array_equal(got["y"][order], (np.arange(N) % 7).astype(np.int32))
    reader = loader.dataset.reader()
    # a compressed local dataset is read in place (its "origin"); an uncompressed one is its own cache
    expected = ("zip_data", "origin") if any(data.glob("*.zstd")) else ("raw_data", "cache")
    assert reader.small._source == expected
    count = loader.dataset.table.count
    assert count >= 10
    for i in range(count):  # each shard: the quick rows are the general path's, byte for byte
        quick = reader.small.rows(i)
        assert quick is not None, i
        assert quick.tobytes() == reader.load(i, spill=False).rows.tobytes()
    loader.close()


def _rewrite(path, raw: bytes, compressed: bool) -> None:
    path.write_bytes(zstd.compress(raw, 3) if compressed else raw)


def _shard_bytes(path, compressed: bool) -> bytearray:
    return bytearray(zstd.decompress(path.read_bytes()) if compressed else path.read_bytes())


def flip_a_byte(path, compressed):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def bad_offset(path, compressed):
    raw = _shard_bytes(path, compressed)
    raw[12] ^= 0x01  # the second sample offset: rows no longer 16 bytes apart
    _rewrite(path, bytes(raw), compressed)


def extra_byte(path, compressed):
    _rewrite(path, bytes(_shard_bytes(path, compressed)) + b"\0", compressed)


def wrong_count(path, compressed):
    raw = _shard_bytes(path, compressed)
    raw[0:4] = (int.from_bytes(raw[0:4], "little") - 1).to_bytes(4, "little")
    _rewrite(path, bytes(raw), compressed)


def bomb(path, compressed):
    if not compressed:
        pytest.skip("a decompression bomb needs a compressed shard")
    path.write_bytes(zstd.compress(b"\0" * (64 << 20), 3))


def missing(path, compressed):
    path.unlink()


@pytest.mark.parametrize("damage", [flip_a_byte, bad_offset, extra_byte, wrong_count, bomb, missing])
@pytest.mark.parametrize("validate_hash", [None, False])
def test_a_damaged_small_shard_is_refused_naming_it(data, tmp_path, damage, validate_hash):
    if damage is flip_a_byte and validate_hash is False:
        pytest.skip("without hashes a flipped data byte is a different value, not a detectable fault")
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    compressed = any(copy.glob("*.zstd"))
    victim = sorted(copy.glob("*.zstd" if compressed else "*.mds"))[3]
    damage(victim, compressed)
    if damage is not missing and victim.stat().st_size != json.loads((data / "index.json").read_text())[
            "shards"][3]["zip_data" if compressed else "raw_data"]["bytes"]:
        # the file's size contradicts the index: refused when the shard is read (a small shard is not
        # stat'ed when the loader is built), naming the file, by the general path
        loader = StreamingLoader(copy, batch_size=100, shuffle=True, seed=3, validate_hash=validate_hash)
        with pytest.raises(ShardFormatError, match=rf"{victim.name}.*(zip|raw)_data.bytes=\d+ but the file"):
            read_all(loader)
        loader.close()
        return
    loader = StreamingLoader(copy, batch_size=100, shuffle=True, seed=3, validate_hash=validate_hash)
    reader = loader.dataset.reader()
    reader.load_resident(0, wait=True)  # the general path finds shard 0: the quick path knows where to look
    assert reader.small._source is not None
    assert reader.small.rows(3) is None  # refused here, left to the general path
    error = FileNotFoundError if damage is missing else ShardFormatError
    with pytest.raises(error, match=victim.name):
        read_all(loader)
    loader.close()


def test_bulk_paths_confine_symlinks_like_one_path_at_a_time(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.mds").write_bytes(b"a")
    (root / "sub" / "b.mds").write_bytes(b"b")
    os.symlink(root / "a.mds", root / "sub" / "inside.mds")
    outside = tmp_path / "outside.mds"
    outside.write_bytes(b"x")
    c = Confiner(str(root))
    rels = [(0, "a.mds"), (1, "sub/b.mds"), (2, "sub/inside.mds"), (3, "sub/not-yet.mds")]
    assert c.paths(rels, where="index.json") == [c.path(rel, where="index.json") for _, rel in rels]
    assert c.paths(rels, where="index.json")[2] == os.path.realpath(root / "a.mds")
    os.symlink(outside, root / "sub" / "out.mds")
    with pytest.raises(UnsafePathError, match=r"index.json, shard 7: shard path 'sub/out.mds' resolves to"):
        Confiner(str(root)).paths([(0, "a.mds"), (7, "sub/out.mds")], where="index.json")
    with pytest.raises(UnsafePathError, match=r"index.json, shard 2: .*'\.\.'"):
        Confiner(str(root)).paths([(2, "../outside.mds")], where="index.json")


def test_the_quick_path_works_out_only_the_shards_it_reads(data, tmp_path):
    """A first batch of a shuffled pass over 100,000 shards needs ~1,000 of them: the quick path
    works out a shard's path and hash when it first reads it, not every shard's before the first
    (~1 s at 100,000 shards). A shard file that is a symlink out of the root is still refused,
    naming it, when it is read."""
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    compressed = any(copy.glob("*.zstd"))
    victim = sorted(copy.glob("*.zstd" if compressed else "*.mds"))[7]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    os.symlink(outside, victim)  # not looked at when the loader is built: a small shard is not stat'ed
    loader = StreamingLoader(copy, batch_size=100, shuffle=True, seed=3)
    reader = loader.dataset.reader()
    loader.dataset.stop_prefill(join=True)
    reader.load_resident(0, wait=True)  # the general path finds shard 0: the quick path knows where to look
    small = SmallShards(reader.table, reader.hash_names)  # a fresh one (a prefill may have read with the reader's)
    small.found(*reader.small._source)
    assert small.rows(5) is not None
    assert np.flatnonzero(small._plans[reader.small._source].known).tolist() == [5]
    with pytest.raises(UnsafePathError, match=rf"shard 7: shard path '{victim.name}' resolves to .*outside"):
        small.rows(7)
    loader.close()
