"""The default spill root, ``<tempdir>/sparkbridge-<uid>``, sits in a folder every user can write:
a root planted by someone else (another owner, writable by others, a symlink) is refused before a
shard is written into it or read from it (issue 23, suspected list)."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.errors import UnsafePathError
from tests.bridge.util import write_numeric


@pytest.fixture()
def temp_root(tmp_path, monkeypatch):
    """A private temp dir standing in for /tmp; returns where the default spill root goes."""
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.delenv("SPARKBRIDGE_CACHE_DIR", raising=False)
    uid = os.getuid()
    return base / f"sparkbridge-{uid}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("spillroot") / "ds", 500, compression="zstd", size_limit=4000)


def test_the_default_root_is_made_private(temp_root, data):
    loader = StreamingLoader(data, batch_size=100)
    assert sum(len(b["id"]) for b in loader) == 500
    loader.close()
    st = os.lstat(temp_root)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.parametrize("plant", ["other-owner", "writable-by-others", "symlink"])
def test_a_planted_default_root_is_refused(temp_root, data, tmp_path, plant):
    if plant == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        os.symlink(elsewhere, temp_root)
    else:
        temp_root.mkdir(mode=0o700)
        if plant == "other-owner":
            if os.getuid() != 0:
                pytest.skip("only root can give a folder to another user")
            os.chown(temp_root, 12345, 12345)
        else:
            os.chmod(temp_root, 0o777)
    with pytest.raises(UnsafePathError, match=rf"{temp_root}.*SPARKBRIDGE_CACHE_DIR"):
        StreamingLoader(data, batch_size=100)


def test_the_follow_cache_of_a_remote_dataset_lives_under_the_private_root(temp_root, data):
    # where follow=True lands a remote dataset's shards without local=: was <tmp>/sparkbridge-follow,
    # one predictable folder shared by every user of the machine
    loader = StreamingLoader(data, batch_size=100)
    path = loader._follow_cache()
    assert os.path.dirname(os.path.dirname(path)) == str(temp_root)
    loader.close()
    os.chmod(temp_root, 0o777)
    with pytest.raises(UnsafePathError, match=str(temp_root)):
        loader._follow_cache()
