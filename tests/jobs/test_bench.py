"""``sparkbridge bench``: which scripts it runs and with what (the benchmarks themselves live in bench/)."""

from __future__ import annotations

import argparse
import sys

from sparkbridge.jobs import bench


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_and_command_lines():
    args = parse()
    assert (args.which, args.rows, args.extra) == ("all", None, "")
    args = parse("loader", "--rows", "5000", "--args", "--repeats 1 --out /tmp/x")
    assert (args.which, args.rows) == ("loader", 5000)
    assert bench.bench_command("loader", rows=5000, extra=["--repeats", "1"]) == [
        sys.executable, str(bench.REPO / "bench" / "loader.py"), "--rows", "5000", "--repeats", "1"]
    assert bench.bench_command("etl") == [sys.executable, str(bench.REPO / "bench" / "etl.py")]


def test_rejects_non_positive_rows():
    import pytest

    from sparkbridge.errors import UsageError

    with pytest.raises(UsageError, match="--rows must be positive, got 0"):
        bench.run_bench(parse("loader", "--rows", "0"))


def test_every_benchmark_script_exists_and_parses_its_arguments():
    import subprocess

    for name, script in bench.BENCHMARKS.items():
        path = bench.REPO / script
        assert path.exists(), name
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                              cwd=str(bench.REPO), timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-2000:])
        assert "--rows" in proc.stdout, f"{name}: `sparkbridge bench --rows N` passes --rows to every script"
