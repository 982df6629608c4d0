"""Local storage semantics the commit protocol relies on (S3 is covered with a real server)."""

import os

import pytest

from sparkbridge.storage import LocalStorage, open_storage


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


class _IndexWriteFails(LocalStorage):
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        if rel == "index.json":
            raise OSError(28, "No space left on device", self.local_path(rel))
        super().write_bytes_atomic(rel, data)


def test_failed_index_write_puts_the_previous_manifest_back(tmp_path):
    from sparkbridge.etl.commit import _write_manifest_then_index

    st = _IndexWriteFails(str(tmp_path))
    LocalStorage(str(tmp_path)).write_bytes_atomic("manifest.json", b"old")
    with pytest.raises(OSError, match="No space left"):
        _write_manifest_then_index(st, b"new", b"{}")
    assert st.read_bytes("manifest.json") == b"old"

    fresh = _IndexWriteFails(str(tmp_path / "fresh"))
    with pytest.raises(OSError, match="No space left"):
        _write_manifest_then_index(fresh, b"new", b"{}")
    assert not fresh.exists("manifest.json")
