"""``ShardSource``: one place opens, checks and decodes a shard file, for snapshot and followed epochs.

Before it, a followed epoch (:mod:`sparkbridge.bridge.follow`) had its own read/check/decode, and
the checks the snapshot path had gained (a stored file's size held against the index's claim
before it is read) did not reach it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.decode import CorruptShardError
from tests.bridge.follow_log import PartitionedWrite
from tests.bridge.util import write_numeric

BRIDGE = Path(__file__).resolve().parents[2] / "bridge"


def _grow(path: str, extra: bytes) -> None:
    with open(path, "ab") as f:
        f.write(extra)


def _stored(root: str, shard: dict) -> str:
    return os.path.join(root, (shard.get("zip_data") or shard["raw_data"])["basename"])


def test_a_followed_epoch_checks_a_stored_files_size_claim_before_reading_it(tmp_path):
    """A zstd shard whose file grew after its commit (a replaced or appended-to file): refused
    naming the index's claim and the file's size, as a snapshot epoch refuses it."""
    root = str(tmp_path / "ds")
    w = PartitionedWrite(root, compression="zstd", size_limit=2_000)
    w.partition(300)
    victim = _stored(root, w.reader.refresh().shards[0])
    declared = os.path.getsize(victim)
    _grow(victim, b"\0" * 100)
    loader = StreamingLoader(root, batch_size=50, follow=True, follow_poll=0.02)
    w.complete()
    name = os.path.relpath(victim, root)
    with pytest.raises(CorruptShardError, match=rf"shard '{name}': zip_data.bytes={declared} but the file "
                                                rf".* has {declared + 100} bytes"):
        for _ in loader:
            pass
    loader.close()


def test_a_snapshot_epoch_names_the_same_claim(tmp_path):
    """The same fault read as a snapshot: the same message (one implementation)."""
    root = write_numeric(tmp_path / "ds", 300, compression="zstd", size_limit=2_000)
    victim = sorted(Path(root).glob("*.zstd"))[1]
    declared = victim.stat().st_size
    loader = StreamingLoader(root, batch_size=50, local=str(tmp_path / "cache"))  # checked when read, not at build
    _grow(str(victim), b"\0" * 100)
    with pytest.raises(CorruptShardError, match=rf"shard '{victim.name}': zip_data.bytes={declared} but the file "
                                                rf".* has {declared + 100} bytes"):
        for _ in loader:
            pass
    loader.close()


def _calls(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def test_only_the_shard_source_opens_checks_or_decodes_a_shard_file():
    """Structural: no other module of sparkbridge.bridge calls the shard check, the decoder, the
    file map or a storage read, nor opens a file in binary mode (index and marker files are text)."""
    offenders = []
    for path in sorted(BRIDGE.glob("*.py")):
        if path.name in ("shard_source.py", "mapped.py"):  # mapped.py: the map primitive itself
            continue
        tree = ast.parse(path.read_text())
        bad = _calls(tree) & {"check_shard", "decode_shard", "map_file", "fromfile", "read_bytes"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant) and "b" in str(node.args[1].value)):
                bad.add(f"open(..., {node.args[1].value!r}) at line {node.lineno}")
        if path.name == "source.py":  # the index.json of a plain remote dataset, read once to parse it
            bad = {b for b in bad if not b.startswith("open(") or "'rb'" not in b}
        if bad:
            offenders.append(f"{path.name}: {sorted(bad)}")
    assert offenders == []
