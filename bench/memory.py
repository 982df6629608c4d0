"""Memory benchmark: anonymous memory and rows/s of one shuffled epoch under a decoded-shard budget.

For each dataset size (default 1M and 4M rows, 16 float32 + int32 + int64 columns, zstd + xxh64
shards written with the shared format code) and each budget (``decoded_cache_bytes=64 MiB`` and the
default, the in-memory case), a fresh child process builds a ``StreamingLoader(shuffle=True)`` with
Mosaic's default shuffle and reads one epoch from a fresh copy of the shards. It reports

* RssAnon (anonymous resident memory, /proc/self/status) after the imports, its peak while
  iterating (sampled every batch) and its growth (peak - baseline);
* rows/s of that cold epoch, and of a second (warm) epoch;
* RssFile at the end (page cache mapped by the process: the spilled shards);
* the peak private dirty memory of its child processes, summed (DataLoader workers and the
  order process; pages they still share with the parent are not counted).

A child that runs past ``--timeout`` is reported as such (the old loader did not finish 4M rows in
180 s under a 64 MiB budget). Ratios are against the in-memory case measured in the same run.

    python bench/memory.py [--rows 1000000 4000000] [--budget-mib 64] [--out bench-output/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CHILD = r"""
import json, sys, time
def status():
    out = dict()
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out
from _common import children_private_mb as children_private  # the bench folder is on PYTHONPATH
import numpy, torch
from sparkbridge.bridge import StreamingLoader
path, budget, timeout, workers = {path!r}, {budget!r}, {timeout!r}, {workers!r}
base = status()["RssAnon"]
t0 = time.perf_counter()
loader = StreamingLoader(path, batch_size=1024, shuffle=True, decoded_cache_bytes=budget, num_workers=workers)
peak, kids, rows, done = base, 0.0, 0, True
for k, batch in enumerate(loader):
    rows += len(batch["i32"])
    if k % 8 == 0:
        peak = max(peak, status()["RssAnon"])
        if k % 64 == 0:  # a scan of /proc: rarer
            kids = max(kids, children_private())
        if time.perf_counter() - t0 > timeout:
            done = False
            break
cold = time.perf_counter() - t0
peak = max(peak, status()["RssAnon"])
warm_rows, warm = 0, None
if done:
    t1 = time.perf_counter()
    for k, batch in enumerate(loader):
        warm_rows += len(batch["i32"])
        if k % 8 == 0:
            peak = max(peak, status()["RssAnon"])
            if k % 64 == 0:
                kids = max(kids, children_private())
    warm = time.perf_counter() - t1
end = status()
print(json.dumps(dict(rows=rows, finished=done, cold_s=cold, cold_rows_per_s=rows / cold,
                      warm_rows_per_s=(warm_rows / warm if warm else None), anon_base_mb=base,
                      anon_peak_mb=peak, anon_growth_mb=peak - base, file_end_mb=end["RssFile"],
                      children_private_peak_mb=kids)))
"""


def run_child(path: Path, budget, timeout: float, workers: int) -> dict:
    code = _CHILD.format(path=str(path), budget=budget, timeout=timeout, workers=workers)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             timeout=timeout * 3 + 120, env=env)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"child failed:\n{exc.stderr[-3000:]}") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import numpy as np
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, load {os.getloadavg()[0]:.1f}, python "
            f"{platform.python_version()}, numpy {np.__version__}, streaming {metadata.version('mosaicml-streaming')}")


def write_outputs(out: Path, rows: list[dict], facts: str) -> None:
    """A markdown table and a PNG (this bench's own helper; bench/_common.py is being extended)."""
    head = ["rows", "budget", "workers", "finished", "cold rows/s", "warm rows/s", "vs in-memory (cold)",
            "anon base MB", "anon peak MB", "anon growth MB", "file-backed MB", "workers' private MB (peak)"]
    lines = [f"machine: {facts}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        warm = f"{r['warm_rows_per_s']:,.0f}" if r["warm_rows_per_s"] else "-"
        lines.append("| " + " | ".join([
            f"{r['n']:,}", r["budget_label"], str(r["workers"]), "yes" if r["finished"] else "no (timeout)",
            f"{r['cold_rows_per_s']:,.0f}", warm, f"{r.get('ratio', float('nan')):.2f}x",
            f"{r['anon_base_mb']:.0f}", f"{r['anon_peak_mb']:.0f}", f"{r['anon_growth_mb']:.0f}",
            f"{r['file_end_mb']:.0f}", f"{r['children_private_peak_mb']:.0f}"]) + " |")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['n'] // 1000}k\n{r['budget_label']}\nw{r['workers']}" for r in rows]
    a.bar(labels, [r["anon_growth_mb"] for r in rows], color="tab:red")
    a.set_ylabel("RssAnon growth (MB)")
    a.set_title("anonymous memory growth, one shuffled epoch")
    b.bar(labels, [r["cold_rows_per_s"] / 1e6 for r in rows], color="tab:blue")
    b.set_ylabel("M rows/s (cold epoch)")
    b.set_title("throughput")
    fig.suptitle(facts, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=1 << 18)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench-output" / "memory")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from loader import fresh_copy, write_dataset  # the loader bench's dataset, same layout

    args.out.mkdir(parents=True, exist_ok=True)
    facts = machine()
    print(f"machine: {facts}")
    results = []
    for n in args.rows:
        data = args.out / f"data-{n}"
        if not (data / "index.json").exists():
            write_dataset(data, n, shard_rows=args.shard_rows)
        for w in args.workers:
            per: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for label, budget in (("in-memory", None), (f"{args.budget_mib} MiB", args.budget_mib << 20)):
                    copy = fresh_copy(data, args.out / "work")
                    r = run_child(copy, budget, args.timeout, w)
                    per.setdefault(label, []).append(r)
                    shutil.rmtree(copy, ignore_errors=True)
            for label, runs in per.items():
                runs.sort(key=lambda r: r["cold_rows_per_s"])
                r = dict(runs[len(runs) // 2], n=n, budget_label=label, workers=w)  # the median run
                r["cold_spread"] = [round(x["cold_rows_per_s"]) for x in runs]
                results.append(r)
            mem = results[-2]
            for r in results[-2:]:
                r["ratio"] = r["cold_rows_per_s"] / mem["cold_rows_per_s"]
                print(f"{n:>9,} rows, {r['budget_label']:>9}, workers={w}: "
                      f"{'finished' if r['finished'] else 'TIMED OUT'}, cold {r['cold_rows_per_s']:,.0f} rows/s "
                      f"({r['ratio']:.2f}x in-memory; runs {r['cold_spread']}), warm "
                      f"{(r['warm_rows_per_s'] or 0):,.0f} rows/s; RssAnon {r['anon_base_mb']:.0f} -> peak "
                      f"{r['anon_peak_mb']:.0f} MB (growth {r['anon_growth_mb']:.0f} MB); file-backed "
                      f"{r['file_end_mb']:.0f} MB")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_outputs(args.out, results, facts)
    print(f"wrote {args.out / 'memory.md'} and {args.out / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
