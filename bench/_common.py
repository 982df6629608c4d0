"""Small helpers shared by the benchmarks: machine facts and a timer. Benchmarks print peers'
figures from the same run; these facts make a printed ratio interpretable later."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Iterator, Sequence

__all__ = ["machine_facts", "versions", "timer", "format_facts"]


def versions(packages: Sequence[str] = ("pyspark", "pyarrow", "numpy", "mosaicml-streaming", "zstd", "xxhash")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_facts() -> dict[str, object]:
    """Cores, load average (1/5/15 min), CPU model and memory: the context of a timing."""
    facts: dict[str, object] = {
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            facts["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return facts


def format_facts(facts: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items())


@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)
