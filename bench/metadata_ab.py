"""Two source trees, the same datasets, alternated: opening a dataset at scale, before and after.

    python bench/metadata_ab.py build --root DIR [--shards 100000] [--entries 10000]
    python bench/metadata_ab.py time --root DIR --base TREE [--rounds 3]

``build`` writes the datasets of ``bench/metadata.py`` once (one write of N shards through
``WriteJob``; a log of E entries through ``commit``) into ``DIR``, so the comparison does not
rebuild them. ``time`` measures, each in a fresh process, alternately with the base tree (a
checkout of another commit, ``TREE/sparkbridge`` with ``bridge``, ``etl``, ``jobs`` linked inside
it: put first on ``PYTHONPATH``) and this tree: the replay of the latest version
(``LogReader.snapshot``, and from the entries alone for a log), and ``StreamingLoader`` build +
first batch (imports timed apart). Prints each figure per round and the ratio head / base of the
medians: the machine is shared, so only figures of one run are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPLAY_CHILD = r"""
import json, sys, time
from sparkbridge.log.snapshot import LogReader
from sparkbridge.storage import open_storage
root, checkpoints = sys.argv[1], sys.argv[2] == "1"
reader = LogReader(open_storage(root))
if not checkpoints:
    reader._load_checkpoint = lambda version: None
t0 = time.perf_counter()
snap = reader.snapshot(take=True)
print(json.dumps({"replay": time.perf_counter() - t0, "shards": len(snap.shards), "version": snap.version}))
"""


def _child(code: str, args: list[str], tree: str | None) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        env.pop("PYTHONPATH", None)
    for attempt in range(4):
        # cwd: "-c" puts the working directory first on sys.path, before PYTHONPATH (a checkout there
        # would shadow the base tree)
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd="/",
                              timeout=900)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        if "File exists" not in proc.stderr or attempt == 3:  # Mosaic's shared memory names: retry
            raise SystemExit(f"child failed ({tree or 'head'}):\n{proc.stderr[-3000:]}")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def build(root: str, shards: int, entries: int) -> None:
    """The datasets, with progress on stderr (every 30 s: the log of 10,000 entries takes a while)."""
    from metadata import _plans, build_log, write_job
    from tqdm import tqdm

    plans = _plans()
    os.makedirs(root, exist_ok=True)
    if shards:
        t0 = time.perf_counter()
        with tqdm(total=shards, unit="shard", desc="one write", mininterval=30) as bar:
            write_job(os.path.join(root, f"one-{shards}"), shards, mode="error", plans=plans, progress=bar)
        print(f"built one write of {shards:,} shards in {time.perf_counter() - t0:.1f}s", flush=True)
    if entries:
        t0 = time.perf_counter()
        with tqdm(total=entries, unit="entry", desc="log", mininterval=30) as bar:
            got = build_log(os.path.join(root, f"log-{entries}"), entries, 10, plans=plans, progress=bar)
        print(f"built a log of {entries:,} entries ({got['shards']:,} shards) in {time.perf_counter() - t0:.1f}s",
              flush=True)


def time_them(root: str, base: str, rounds: int, loader: bool) -> None:
    from metadata import LOADER_CHILD

    datasets = sorted(d for d in os.listdir(root) if d.startswith(("one-", "log-")))
    results: dict[tuple[str, str, str], list[float]] = {}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for r in range(rounds):
        for tree, label in ((base, "base"), (None, "head")):
            for d in datasets:
                path = os.path.join(root, d)
                got = _child(REPLAY_CHILD, [path, "1"], tree)
                results.setdefault((d, "replay", label), []).append(got["replay"])
                if d.startswith("log-"):
                    got = _child(REPLAY_CHILD, [path, "0"], tree)
                    results.setdefault((d, "replay_no_checkpoint", label), []).append(got["replay"])
                if loader:
                    got = _child(LOADER_CHILD, [path], tree)
                    for k in ("build", "first"):
                        results.setdefault((d, f"loader_{k}", label), []).append(got[k])
                    results.setdefault((d, "open_plus_first", label), []).append(got["build"] + got["first"])
                print(f"round {r + 1} {label} {d}: " + ", ".join(
                    f"{m} {v[-1]:.3f}" for (dd, m, lab), v in results.items() if dd == d and lab == label),
                    flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print("\n| dataset | measure | base (median s) | head (median s) | head / base |\n|:--|:--|--:|--:|--:|")
    for d in datasets:
        for m in ("replay", "replay_no_checkpoint", "loader_build", "loader_first", "open_plus_first"):
            b, h = results.get((d, m, "base")), results.get((d, m, "head"))
            if b and h:
                mb, mh = statistics.median(b), statistics.median(h)
                print(f"| {d} | {m} | {mb:.3f} | {mh:.3f} | {mh / mb:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["build", "time"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--shards", type=int, default=100000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--base", help="the base source tree (time)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-loader", action="store_true")
    args = ap.parse_args()
    if args.what == "build":
        build(args.root, args.shards, args.entries)
    else:
        if not args.base:
            raise SystemExit("time needs --base TREE")
        time_them(args.root, args.base, args.rounds, not args.no_loader)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
