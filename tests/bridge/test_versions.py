"""The loader reads the dataset log: a cache never serves a replaced version, a version can be
pinned, a resumed run reads the version it started on, and hostile paths are refused."""

from __future__ import annotations

import json
import re
import os

import numpy as np
import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import ShardFormatError, StateError, UnsafePathError, VersionNotFoundError
from sparkbridge.log import vacuum

from tests.etl.commit_driver import write

OLD, NEW = list(range(100)), list(range(1000, 1150))


def _ids(loader) -> list[int]:
    try:
        return sorted(int(i) for batch in loader for i in batch["id"])
    finally:
        loader.close()


@pytest.fixture
def two_versions(tmp_path):
    root = str(tmp_path / "ds")
    assert write(root, mode="error", lo=0, hi=100) == 0
    return root


def test_same_cache_after_an_overwrite_reads_the_new_version(two_versions, tmp_path):
    root, cache = two_versions, str(tmp_path / "cache")
    assert _ids(StreamingLoader(root, local=cache, batch_size=16)) == OLD
    assert write(root, mode="overwrite", lo=1000, hi=1150) == 1
    loader = StreamingLoader(root, local=cache, batch_size=16)
    assert loader.version == 1
    assert _ids(loader) == NEW  # the first protocol served OLD here, silently


def test_same_cache_after_an_overwrite_on_s3(s3_bucket, tmp_path):
    root, cache = s3_bucket.url("ds"), str(tmp_path / "cache")
    write(root, mode="error", lo=0, hi=100)
    assert _ids(StreamingLoader(root, local=cache, batch_size=16)) == OLD
    write(root, mode="overwrite", lo=1000, hi=1150)
    assert _ids(StreamingLoader(root, local=cache, batch_size=16)) == NEW


def test_pin_a_version_while_it_is_retained(two_versions):
    root = two_versions
    write(root, mode="overwrite", lo=1000, hi=1150)
    assert _ids(StreamingLoader(root, batch_size=16, version=0)) == OLD
    assert _ids(StreamingLoader(root, batch_size=16)) == NEW
    with pytest.raises(VersionNotFoundError, match="version=5 does not exist"):
        StreamingLoader(root, batch_size=16, version=5)
    vacuum(root, retention_seconds=0)
    with pytest.raises(VersionNotFoundError, match="version 0 .* is no longer retained"):
        StreamingLoader(root, batch_size=16, version=0)


def test_a_resumed_run_reads_the_version_it_started_on(two_versions):
    root = two_versions
    first = StreamingLoader(root, batch_size=8, shuffle=True, seed=3)
    seen = []
    for k, batch in enumerate(first):
        seen += [int(i) for i in batch["id"]]
        if k == 4:
            break
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["version"] == 0 and state["dataset"].startswith("v0:")

    write(root, mode="append", lo=5000, hi=5050)  # the dataset moves on while the job is down
    resumed = StreamingLoader(root, batch_size=8, shuffle=True, seed=3)
    assert resumed.version == 1
    resumed.load_state_dict(state)
    assert resumed.version == 0  # rebuilt on the saved version
    rest = _ids(resumed)
    assert sorted(seen + rest) == OLD and not set(seen) & set(rest)

    vacuum(root, retention_seconds=0)
    again = StreamingLoader(root, batch_size=8, shuffle=True, seed=3)
    with pytest.raises(StateError, match="read version 0 .* can no longer be read"):
        again.load_state_dict(state)
    again.close()


def _legacy_with_basename(tmp_path, basename: str) -> str:
    from tests.bridge.util import write_numeric

    root = write_numeric(tmp_path / "legacy", 50)
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = basename
    (root / "index.json").write_text(json.dumps(index))
    return str(root)


@pytest.mark.parametrize("basename", ["../outside/shard.00000.mds", "/etc/passwd", "a/../../b.mds", "C:\\x.mds",
                                      "a//b.mds", "./shard.00000.mds"])
def test_hostile_index_paths_are_refused_naming_the_entry(tmp_path, basename):
    root = _legacy_with_basename(tmp_path, basename)
    with pytest.raises(UnsafePathError, match=r"index.json, shard 0, raw_data"):
        StreamingLoader(root, batch_size=8)
    with pytest.raises(UnsafePathError):  # with a cache: nothing is downloaded outside it either
        StreamingLoader(root, local=str(tmp_path / "cache"), batch_size=8)
    assert not (tmp_path / "outside").exists()


def test_hostile_log_entry_is_refused(two_versions):
    root = two_versions
    path = os.path.join(root, "_log", f"{0:020d}.json")
    entry = json.loads(open(path).read())
    entry["add"][0]["zip_data"]["basename"] = "../../etc/passwd"
    with open(path, "w") as f:
        json.dump(entry, f)
    with pytest.raises(UnsafePathError, match=r"_log/00000000000000000000.json, added shard 0, zip_data"):
        StreamingLoader(root, batch_size=8)


def test_a_symlink_out_of_the_cache_is_refused(two_versions, tmp_path):
    root, cache = two_versions, tmp_path / "cache"
    loader = StreamingLoader(root, local=str(cache), batch_size=8)
    first = loader.dataset.table.name(0).split("/")[0]
    loader.close()
    cache.mkdir(exist_ok=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, cache / first)  # the write's folder in the cache now points out of it
    with pytest.raises(UnsafePathError, match="outside"):
        StreamingLoader(root, local=str(cache), batch_size=8)


def test_each_batch_equals_the_written_rows(two_versions):
    loader = StreamingLoader(two_versions, batch_size=32)
    for batch in loader:
        ids = batch["id"].numpy()
        assert np.array_equal(batch["x"].numpy(), ids / 4)
    loader.close()


@pytest.mark.parametrize("column, value, message", [
    ("column_sizes", [8.0, 4, 4], "size 8.0 is not an int"),  # equal to a valid entry's 8, but not an int
    ("column_sizes", [8, 4, True], "size True is not an int"),
    ("column_sizes", [8, 4, 5], "does not have size 5"),
    ("column_names", [["id"], "x", "y"], "column names and encodings must be strings"),
    ("column_encodings", ["int64", "float32", {"int32": 1}], "column names and encodings must be strings"),
])
def test_a_later_entry_with_other_columns_is_refused_naming_it(tmp_path, column, value, message):
    """The index's layout check runs once per distinct set of columns: an entry whose columns only
    look like an earlier valid entry's is checked, and refused, on its own."""
    from tests.bridge.util import write_numeric

    root = write_numeric(tmp_path / "legacy", 3000, size_limit=1 << 12)
    index = json.loads((root / "index.json").read_text())
    assert len(index["shards"]) >= 3
    index["shards"][2][column] = value
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardFormatError, match=rf"index.json, shard 2: .*{re.escape(message)}"):
        StreamingLoader(str(root), batch_size=8)
