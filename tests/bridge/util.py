"""Test datasets for the loader, written with stock ``streaming.MDSWriter`` (Mosaic's own writer)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Optional

import numpy as np

EVERY_ENCODING = {
    "id": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "i8": "int8", "i16": "int16", "i32": "int32", "big": "int",
    "f16": "float16", "f32": "float32", "f64": "float64",
    "name": "str", "blob": "bytes", "doc": "json",
    "grid": "ndarray:float32:2,3", "seq": "ndarray:int16", "any": "ndarray",
    "si": "str_int", "sf": "str_float", "sd": "str_decimal",
}


def every_encoding_row(k: int) -> dict:
    rng = np.random.default_rng(k)
    return {
        "id": np.int64(k),
        "u8": np.uint8(k % 256), "u16": np.uint16(k * 7 % 65536), "u32": np.uint32(k * 100003), "u64": np.uint64(k) << np.uint64(40),
        "i8": np.int8(k % 256 - 128), "i16": np.int16(-k), "i32": np.int32(-k * 1000), "big": -(k << 33),
        "f16": np.float16(k / 8), "f32": np.float32(k * 0.5 - 3), "f64": np.float64(k) / 3,
        "name": f"row {k} é" * (k % 3), "blob": bytes(range(k % 17)), "doc": {"k": k, "v": [k, str(k)], "n": None},
        "grid": rng.standard_normal((2, 3)).astype(np.float32),
        "seq": np.arange(k % 5 + 1, dtype=np.int16) - 2,
        "any": rng.integers(0, 9, size=(k % 3 + 1, 2)).astype(np.float64 if k % 2 else np.uint32),
        "si": k * 37 - 500, "sf": k / 7, "sd": Decimal(k) / Decimal(8),
    }


def write_every_encoding(out: Path, rows: int, *, compression: Optional[str], size_limit: int = 4096) -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=EVERY_ENCODING, compression=compression, hashes=["xxh64"],
                   size_limit=size_limit) as w:
        for k in range(rows):
            w.write(every_encoding_row(k))
    return out


def write_numeric(out: Path, rows: int, *, compression: Optional[str] = None, size_limit: int = 1 << 14,
                  hashes=("xxh64",)) -> Path:
    """``id`` int64, ``x`` float32, ``y`` int32: small and all fixed-width (the fast path)."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"id": "int64", "x": "float32", "y": "int32"}, compression=compression,
                   hashes=list(hashes), size_limit=size_limit) as w:
        for k in range(rows):
            w.write({"id": np.int64(k), "x": np.float32(k) / 4, "y": np.int32(k % 7)})
    return out


def equal(a, b) -> bool:
    """Value equality across python/numpy/torch scalars and arrays."""
    import torch

    if isinstance(a, torch.Tensor):
        a = a.numpy()
    if isinstance(b, torch.Tensor):
        b = b.numpy()
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, np.generic):
        a = a.item()
    if isinstance(b, np.generic):
        b = b.item()
    return type(a) is type(b) and a == b


def copy_with_a_flipped_byte(data: Path, out: Path, shard: int) -> tuple[Path, Path]:
    """A copy of dataset ``data`` at ``out`` whose ``shard``-th stored file has one byte flipped
    (caught by its hash); returns the copy and that file."""
    import shutil

    shutil.copytree(data, out)
    victim = sorted(p for p in out.iterdir() if p.name != "index.json")[shard]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return out, victim


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_start(script: Path, *args: str, nproc: int = 2, env: Optional[dict] = None):
    """Start ``python -m torch.distributed.run --nproc_per_node=nproc script args`` on loopback (gloo
    on CPU in the script); the running process (text pipes for stdout and stderr)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), **(env or {}))
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(repo))


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 240, env: Optional[dict] = None):
    """:func:`torchrun_start` and wait: the finished process (``returncode``, ``stdout``, ``stderr``)."""
    import subprocess

    proc = torchrun_start(script, *args, nproc=nproc, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {script.name} ran past {timeout} s\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def take(loader, k=None):
    """The ``id`` column of each batch of ``loader`` (the first ``k`` batches when ``k`` is given)."""
    out = []
    for batch in loader:
        out.append(batch["id"].numpy().copy())
        if k is not None and len(out) == k:
            break
    return out


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
