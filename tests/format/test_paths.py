"""Shard paths from an index are untrusted: what Confiner accepts and refuses, on real files."""

import os

import pytest

from sparkbridge.errors import UnsafePathError
from sparkbridge.format.paths import Confiner, check_relpath, confined_path


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "w" / "p00000-a0").mkdir(parents=True)
    (r / "w" / "p00000-a0" / "shard.00000.mds").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    return r


@pytest.mark.parametrize("bad", ["../outside/secret", "/etc/passwd", "w/../../x", "w//x", "./x", "C:\\x",
                                 "w\\x", "a\x00b", "a\nb", ""])
def test_lexically_unsafe_paths_are_refused(bad):
    with pytest.raises(UnsafePathError):
        check_relpath(bad, where="index.json, shard 3")


def test_a_plain_path_resolves_inside_the_root(root):
    c = Confiner(str(root))
    path = c.path("w/p00000-a0/shard.00000.mds", where="t")
    assert path == os.path.join(os.path.realpath(root), "w", "p00000-a0", "shard.00000.mds")
    assert c.path("w/p00000-a0/shard.00001.mds", where="t").endswith("shard.00001.mds")  # not there yet: fine
    assert confined_path(str(root), "w/p00000-a0/shard.00000.mds", where="t") == path


def test_a_shard_file_symlinked_out_of_the_root_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside" / "secret", root / "w" / "p00000-a0" / "shard.00002.mds")
    c = Confiner(str(root))
    c.path("w/p00000-a0/shard.00000.mds", where="t")  # the folder is resolved and remembered first
    with pytest.raises(UnsafePathError, match=r"shard\.00002\.mds.*outside"):
        c.path("w/p00000-a0/shard.00002.mds", where="index.json, shard 2")


def test_a_symlink_that_stays_inside_is_accepted(root):
    os.symlink(root / "w" / "p00000-a0" / "shard.00000.mds", root / "w" / "p00000-a0" / "alias.mds")
    path = Confiner(str(root)).path("w/p00000-a0/alias.mds", where="t")
    assert path == os.path.realpath(root / "w" / "p00000-a0" / "shard.00000.mds")


def test_a_folder_symlinked_out_of_the_root_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside", root / "escape")
    with pytest.raises(UnsafePathError, match="outside"):
        Confiner(str(root)).path("escape/secret", where="t")
    with pytest.raises(UnsafePathError, match="outside"):
        Confiner(str(root)).path("escape", where="t")  # the folder itself, as ShardTable checks folders
