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




def test_put_if_absent_creates_once_and_leaves_no_temp_file(tmp_path):
    st = open_storage(str(tmp_path / "root"))
    assert st.put_if_absent("_log/00000000000000000000.json", b"first") is True
    assert st.put_if_absent("_log/00000000000000000000.json", b"second") is False
    assert st.read_bytes("_log/00000000000000000000.json") == b"first"
    assert sorted(os.listdir(st.local_path("_log"))) == ["00000000000000000000.json"]


def test_put_if_absent_from_many_threads_has_one_winner(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    st = open_storage(str(tmp_path / "root"))
    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(lambda k: st.put_if_absent("x.json", b"%d" % k), range(64)))
    assert won.count(True) == 1
    assert st.read_bytes("x.json") == b"%d" % won.index(True)


def test_swap_is_a_compare_and_swap(tmp_path):
    st = open_storage(str(tmp_path / "root"))
    data, token = st.read_token("index.json")
    assert (data, token) == (None, None)
    assert st.swap("index.json", b"v1", token) is True
    data, token = st.read_token("index.json")
    assert data == b"v1"
    assert st.swap("index.json", b"v2", token) is True
    assert st.swap("index.json", b"stale", token) is False  # replaced since this token was read
    assert st.read_bytes("index.json") == b"v2"


def test_list_info_sorted_with_times_and_start_after(tmp_path):
    st = open_storage(str(tmp_path / "root"))
    for name in ("_log/00000000000000000001.json", "_log/00000000000000000000.json", "a/b.mds"):
        st.write_bytes_atomic(name, b"12345")
    infos = st.list_info("_log/")
    assert [f.rel for f in infos] == ["_log/00000000000000000000.json", "_log/00000000000000000001.json"]
    assert all(f.size == 5 and abs(f.mtime - st.now()) < 60 for f in infos)
    assert [f.rel for f in st.list_info("_log/", start_after="_log/00000000000000000000.json")] == [
        "_log/00000000000000000001.json"]
