"""Local storage semantics the commit protocol relies on (S3 is covered with a real server)."""

import os

import pytest

from etl.storage import LocalStorage, open_storage


def test_atomic_write_list_delete(tmp_path):
    st = open_storage(str(tmp_path / "root"))
    assert isinstance(st, LocalStorage)
    st.write_bytes_atomic("index.json", b"{}")
    st.write_bytes_atomic("a/b/shard.00000.mds", b"x" * 10)
    assert st.read_bytes("index.json") == b"{}"
    assert st.list_files() == [("a/b/shard.00000.mds", 10), ("index.json", 2)]
    assert [n for n in os.listdir(st.root) if n.endswith(".tmp")] == []
    assert st.delete_prefix("a") == 1
    assert st.list_files() == [("index.json", 2)]
    st.delete(["index.json", "missing"])
    assert not st.exists("index.json")


def test_errors_name_the_path(tmp_path):
    st = open_storage(f"file://{tmp_path}")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        st.read_bytes("nope.json")
    with pytest.raises(ValueError, match="leaves the dataset root"):
        st.local_path("../escape")
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")
