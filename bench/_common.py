"""Small helpers shared by the benchmarks: machine facts, a timer, and the report every benchmark
leaves in ``bench-output/`` (a markdown table and a PNG chart, issue 11). Benchmarks print peers'
figures from the same run; these facts make a printed ratio interpretable later."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

__all__ = ["machine_facts", "versions", "timer", "format_facts", "summarize", "markdown_table",
           "write_report", "REPORT_DIR"]

#: Where benchmarks leave their markdown + PNG reports (ignored by git).
REPORT_DIR = Path(__file__).resolve().parents[1] / "bench-output"


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


def summarize(values: Sequence[float]) -> dict[str, float]:
    """best / median / worst of repeated timings (the spread is the noise of a shared machine)."""
    return {"best": min(values), "median": statistics.median(values), "worst": max(values), "n": len(values)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    numeric = [bool(rows) and all(re.match(r"^[-+]?[\d.,]+", str(r[i])) for r in rows)
               for i in range(len(headers))]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(name: str, *, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 bars: Mapping[str, float], bar_label: str, facts: Mapping[str, Any],
                 notes: Sequence[str] = (), errors: Optional[Mapping[str, tuple[float, float]]] = None,
                 out_dir: Optional[Path] = None) -> tuple[Path, Optional[Path]]:
    """Write ``<name>.md`` (title, table, notes, machine facts) and ``<name>.png`` (one horizontal
    bar per entry of ``bars``; ``errors`` gives (low, high) whiskers, e.g. best..worst) under
    ``out_dir`` (default ``bench-output/``). Returns the two paths (PNG None without matplotlib)."""
    out = Path(out_dir) if out_dir is not None else REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    png: Optional[Path] = out / f"{name}.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = list(bars)
        values = [bars[k] for k in labels]
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.4))
        xerr = None
        if errors:
            xerr = [[max(0.0, bars[k] - errors[k][0]) for k in labels],
                    [max(0.0, errors[k][1] - bars[k]) for k in labels]]
        ax.barh(labels, values, xerr=xerr, color="#4c72b0", capsize=4)
        ax.invert_yaxis()
        ax.set_xlabel(bar_label)
        ax.set_title(title, fontsize=10)
        for i, (k, v) in enumerate(zip(labels, values)):  # the value, right of its whisker
            ax.text(max(v, errors[k][1]) if errors else v, i, f"  {v:,.3g}", va="center", fontsize=8)
        ax.set_xlim(0, max(max(e[1] for e in errors.values()) if errors else 0, max(values)) * 1.15)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    except ImportError:
        png = None
    md = [f"# {title}", "", markdown_table(headers, rows), ""]
    md += [f"- {n}" for n in notes]
    md += ["", "Machine: " + format_facts(dict(facts)), ""]
    if png is not None:
        md += [f"![{name}]({png.name})", ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    return path, png


def children_private_mb() -> float:
    """Private dirty memory of this process's children (DataLoader workers, the order process), in
    MB: what they add (their pages still shared with this process are not counted). For the
    memory benchmarks' child processes, which import this module."""
    me, total = os.getpid(), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != me:
                    continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty")) / 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total
