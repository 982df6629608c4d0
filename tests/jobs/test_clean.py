"""``sparkbridge clean``: stale shared memory only (never a live process's), real shard caches only."""

from __future__ import annotations

import json
import mmap
import os
import time

import pytest

from sparkbridge.jobs import cli
from sparkbridge.jobs.clean import NotACacheError, scan_cache
from tests.bridge.util import write_numeric

SHM = "/dev/shm"


def clean(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["clean", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def segments():
    """A stale Mosaic-named segment (nobody maps it) and a live one (this process maps it)."""
    stale, live = "987651_locals", "987652_barrier"
    for name in (stale, live):
        with open(os.path.join(SHM, name), "wb") as f:
            f.write(b"\0" * 4096)
    old = time.time() - 120  # settled: a segment changed in the last minute is never stale
    for name in (stale, live):
        os.utime(os.path.join(SHM, name), (old, old))
    f = open(os.path.join(SHM, live), "r+b")
    mapped = mmap.mmap(f.fileno(), 4096)
    yield stale, live
    mapped.close()
    f.close()
    for name in (stale, live):
        if os.path.exists(os.path.join(SHM, name)):
            os.unlink(os.path.join(SHM, name))


@pytest.mark.skipif(not os.path.isdir(SHM), reason="no /dev/shm")
def test_shared_memory_only_stale_segments(capsys, segments):
    stale, live = segments
    code, out, _ = clean(capsys, "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and stale in report["shared_memory"] and live not in report["shared_memory"]
    assert os.path.exists(os.path.join(SHM, stale))  # dry run
    code, out, _ = clean(capsys)
    assert code == 0 and out.startswith("shared memory: deleted ")
    assert not os.path.exists(os.path.join(SHM, stale))
    assert os.path.exists(os.path.join(SHM, live))  # mapped by a live process: never touched


def test_cache_of_a_remote_dataset_is_deleted_and_datasets_are_refused(tmp_path, capsys, s3_bucket):
    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.storage import open_storage

    data = write_numeric(tmp_path / "remote", 3000, compression="zstd", size_limit=1 << 12)
    remote = open_storage(s3_bucket.url("train"))
    for f in open_storage(str(data)).list_info(""):  # the same dataset, on S3
        remote.write_bytes_atomic(f.rel, (data / f.rel).read_bytes())
    cache = tmp_path / "cache" / "train"
    loader = StreamingLoader(s3_bucket.url("train"), local=str(cache), batch_size=500)
    assert sum(len(b["id"]) for b in loader) == 3000
    loader.close()
    assert not (cache / "index.json").exists()  # the loader reads the dataset itself, never a cached index
    index = json.loads((data / "index.json").read_text())
    shards = sorted(e["raw_data"]["basename"] for e in index["shards"])
    assert len(shards) > 2 and all((cache / s).exists() or (cache / (s + ".zstd")).exists() for s in shards)
    cached = sorted(str(p.relative_to(tmp_path / "cache")) for p in cache.rglob("*") if p.is_file())
    assert "train/.sparkbridge-cache.json" in cached

    contents = scan_cache(tmp_path / "cache")  # a folder of caches
    assert contents.datasets == ["train"]
    assert sorted(contents.files) == cached
    code, out, _ = clean(capsys, "--no-shm", "--cache", str(tmp_path / "cache"), "--dry-run")
    assert code == 0
    assert out.splitlines()[0] == (f"cache {tmp_path / 'cache'}: would delete {len(cached)} file(s), "
                                   f"{contents.bytes / 1e6:,.1f} MB (1 dataset cache(s))")
    assert all((tmp_path / "cache" / f).exists() for f in cached)
    code, out, _ = clean(capsys, "--no-shm", "--cache", str(tmp_path / "cache"))
    assert code == 0 and out.startswith(f"cache {tmp_path / 'cache'}: deleted {len(cached)} file(s)")
    assert not (tmp_path / "cache").exists()

    # The dataset itself keeps its shards compressed: refused, nothing deleted.
    with pytest.raises(NotACacheError, match="is stored only compressed, as in a dataset"):
        scan_cache(data)
    before = sorted(p.name for p in data.iterdir())
    code, _, err = clean(capsys, "--no-shm", "--cache", str(data))
    assert code == 1 and err.startswith(f"sparkbridge clean: error: --cache {data}: ")
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_folder_with_other_files_is_refused(tmp_path):
    data = write_numeric(tmp_path / "ds", 100)  # uncompressed: looks like a cache...
    assert len(scan_cache(data).files) == 2  # index.json + one shard
    (data / "notes.txt").write_text("mine")  # ...until something else lives there
    with pytest.raises(NotACacheError) as err:
        scan_cache(data)
    assert str(err.value) == (f"--cache {data}: {data / 'notes.txt'} is not a file of the shard cache {data} "
                              "(its index.json does not list it); refusing to delete anything")
    (data / "notes.txt").unlink()
    (data / "_log").mkdir()
    with pytest.raises(NotACacheError, match="is a dataset log"):
        scan_cache(data)


def test_vacuum(tmp_path, capsys):
    import os
    import time

    from tests.etl.commit_driver import write

    code, _, err = clean(capsys, "--no-shm", "--vacuum", str(tmp_path / "none"))
    assert code == 1 and "no dataset" in err and err.count("\n") == 1
    root = tmp_path / "ds"
    write(str(root), mode="error", lo=0, hi=10)
    stray = root / "j20260101T000000-0000abcd" / "p00000-a1" / "shard.00000.mds"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    old = time.time() - 3 * 3600
    os.utime(stray, (old, old))
    code, out, _ = clean(capsys, "--no-shm", "--vacuum", str(root), "--dry-run")
    assert code == 0 and "would delete" in out and stray.exists()
    code, out, _ = clean(capsys, "--no-shm", "--vacuum", str(root), "--retention-hours", "2")
    assert code == 0 and "deleted" in out and not stray.exists()
    code, _, err = clean(capsys, "--retention-hours", "2")
    assert code == 2 and err == "sparkbridge clean: error: --retention-hours goes with --vacuum DATASET\n"
