"""Every command's typical mistakes, through the real console command: exit code 2 for a usage
error, 1 for a failure, and exactly ONE line on stderr naming the file, column or option -- no
traceback unless ``-v``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bridge.util import write_numeric

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("sparkbridge")
#: the installed console script; `python -m` where the venv has none (a worktree sharing a venv)
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sparkbridge.jobs.cli"]


def sparkbridge(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    return subprocess.run([*COMMAND, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def numeric(tmp_path_factory) -> Path:
    return write_numeric(tmp_path_factory.mktemp("numeric") / "ds", 50)


def usage(cmd: str, option: str, message: str) -> str:
    return f"sparkbridge{' ' + cmd if cmd else ''}: error: {message} (see sparkbridge{' ' + cmd if cmd else ''} --help)"


CASES = {
    # name: (argv, exit code, the stderr line) -- {tmp} is the test's folder, {ds} a numeric dataset
    "no command": ([], 2, usage("", "", "the following arguments are required: COMMAND")),
    "unknown command": (["trian"], 2, usage("", "", "argument COMMAND: invalid choice: 'trian' (choose from 'demo', "
                                                    "'convert', 'inspect', 'validate', 'vacuum', 'train', 'bench', 'clean', "
                                                    "'cluster-demo')")),
    "train without --label": (["train", "--data", "{ds}"], 2,
                              usage("train", "", "the following arguments are required: --label")),
    "train, not a number": (["train", "--data", "{ds}", "--label", "y", "--batch-size", "abc"], 2,
                            usage("train", "", "argument --batch-size: invalid int value: 'abc'")),
    "train --epochs 0": (["train", "--data", "{ds}", "--label", "y", "--epochs", "0"], 2,
                         "sparkbridge train: error: --epochs must be at least 1, got 0"),
    "train, missing data": (["train", "--data", "{tmp}/missing", "--label", "x"], 1,
                            "sparkbridge train: error: --data {tmp}/missing: no such folder (give a dataset written by "
                            "`sparkbridge convert`, or an s3://bucket/prefix URL)"),
    "train, folder without index": (["train", "--data", "{tmp}", "--label", "x"], 1,
                                    "sparkbridge train: error: --data {tmp}: no index.json there: not an MDS dataset, "
                                    "or its write never committed"),
    "train, missing eval data": (["train", "--data", "{ds}", "--label", "y", "--eval", "{tmp}/nope"], 1,
                                 "sparkbridge train: error: --eval {tmp}/nope: no such folder (give a dataset written "
                                 "by `sparkbridge convert`, or an s3://bucket/prefix URL)"),
    "convert, missing input": (["convert", "{tmp}/nope.csv", "{tmp}/out"], 1,
                               "sparkbridge convert: error: input not found: {tmp}/nope.csv"),
    "convert onto a dataset": (["convert", "{csv}", "{ds}"], 1,
                               "sparkbridge convert: error: {ds} already holds a dataset: pass --mode overwrite to "
                               "replace it or --mode append to add to it"),
    "convert, bad --conf": (["convert", "{csv}", "{tmp}/out", "--conf", "spark.x"], 2,
                            "sparkbridge convert: error: --conf expects KEY=VALUE, got 'spark.x'"),
    "convert, bad --mode": (["convert", "{csv}", "{tmp}/out", "--mode", "replace"], 2,
                            usage("convert", "", "argument --mode: invalid choice: 'replace' (choose from 'error', "
                                                 "'overwrite', 'append')")),
    "convert, column twice": (["convert", "{csv}", "{tmp}/out", "--select", "a,a"], 2,
                              "sparkbridge convert: error: --select names a column twice: ['a', 'a']"),
    "demo --epochs 0": (["demo", "--out", "{tmp}/demo", "--epochs", "0"], 2,
                        "sparkbridge demo: error: --epochs must be at least 1, got 0"),
    "demo --rows -5": (["demo", "--out", "{tmp}/demo", "--rows", "-5"], 2,
                       "sparkbridge demo: error: --rows must be positive, got -5"),
    "demo --follow-shuffle-rows without --live": (["demo", "--out", "{tmp}/demo", "--follow-shuffle-rows", "100"], 2,
                                                  "sparkbridge demo: error: --follow-shuffle-rows mixes the epoch that "
                                                  "follows a live write: it needs --live and a number of rows >= 0, "
                                                  "got 100 without --live"),
    "bench --rows 0": (["bench", "loader", "--rows", "0"], 2, "sparkbridge bench: error: --rows must be positive, got 0"),
    "bench, unknown benchmark": (["bench", "gpu"], 2,
                                 usage("bench", "", "argument which: invalid choice: 'gpu' (choose from 'etl', "
                                                    "'loader', 'grid', 'memory', 'scale', 'order', 'first_batch', 'live', 'shuffle', 's3', 'media', 'sequences', 'peers', 'all')")),
    "clean, not a cache": (["clean", "--cache", "{tmp}"], 1,
                           "sparkbridge clean: error: --cache {tmp}: refusing to delete a folder that is not a shard "
                           "cache (no cache marker or index.json in it or in its subfolders)"),
    "clean, missing cache": (["clean", "--cache", "{tmp}/nope"], 1,
                             "sparkbridge clean: error: --cache {tmp}/nope: no such folder"),
    "clean, negative retention": (["clean", "--vacuum", "{ds}", "--retention-hours", "-1"], 2,
                                  "sparkbridge clean: error: --retention-hours must be >= 0, got -1.0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_and_exit_code(case, tmp_path, numeric):
    argv, code, line = CASES[case]
    csv = tmp_path / "in.csv"
    csv.write_text("a,b\n1,2\n")
    subs = {"tmp": str(tmp_path), "ds": str(numeric), "csv": str(csv)}
    proc = sparkbridge(*[a.format(**subs) for a in argv], cwd=tmp_path)
    assert (proc.returncode, proc.stderr.splitlines()) == (code, [line.format(**subs)]), proc.stderr


def test_unknown_label_names_the_column_and_lists_the_available_ones(tmp_path, numeric):
    proc = sparkbridge("train", "--data", str(numeric), "--label", "nosuch", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"sparkbridge train: error: --label 'nosuch': {numeric} has no such column; it has ['id', 'x', 'y']"]


def test_unknown_or_label_feature_is_refused(numeric):
    import argparse

    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.errors import SchemaError, UsageError
    from sparkbridge.jobs.train import _columns

    args = argparse.Namespace(data=str(numeric), local=None, label="y", features="x,z")
    with pytest.raises(SchemaError) as err:
        _columns(StreamingLoader, args)
    assert str(err.value) == f"--features: {numeric} has no column(s) ['z']; it has ['id', 'x', 'y']"
    with pytest.raises(UsageError, match="--features lists the label 'y'"):
        _columns(StreamingLoader, argparse.Namespace(data=str(numeric), local=None, label="y", features="x,y"))
    assert _columns(StreamingLoader, argparse.Namespace(data=str(numeric), local=None, label="y", features=None)) == (
        ["id", "x"], False)


def test_inspect_missing_dataset(tmp_path):
    proc = sparkbridge("inspect", str(tmp_path / "nope"), cwd=tmp_path)
    nope = tmp_path / "nope"
    assert (proc.returncode, proc.stderr.splitlines()) == (1, [
        f"sparkbridge inspect: error: no dataset at {nope}: neither {nope}/_log/ nor {nope}/index.json exists"])


def test_verbose_shows_the_traceback_and_still_ends_with_the_line(tmp_path):
    for argv in (["-v", "train"], ["train", "-v"]):
        proc = sparkbridge(*argv, "--data", str(tmp_path / "missing"), "--label", "x", cwd=tmp_path)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1
        assert lines[0] == "Traceback (most recent call last):"
        assert lines[-1].startswith(f"sparkbridge train: error: --data {tmp_path / 'missing'}: no such folder")


def test_error_line_maps_exceptions():
    from sparkbridge.errors import CorruptShardError, UsageError
    from sparkbridge.jobs.cli import error_line

    assert error_line(UsageError("--x must be >= 1")) == ("--x must be >= 1", 2)
    assert error_line(CorruptShardError("shard 'a.mds': xxh64 hash differs\nre-download it")) == (
        "shard 'a.mds': xxh64 hash differs; re-download it", 1)
    assert error_line(FileNotFoundError(2, "No such file or directory", "/x/y.csv")) == (
        "/x/y.csv: No such file or directory", 1)
    assert error_line(PermissionError(13, "Permission denied", "/etc/shadow")) == ("/etc/shadow: Permission denied", 1)
    message, code = error_line(ZeroDivisionError("division by zero"))
    assert code == 1 and message == ("unexpected ZeroDivisionError: division by zero (rerun with -v for the "
                                     "traceback, and please report it)")


def test_interrupt_exits_130(capsys):
    from sparkbridge.jobs.cli import run_command

    def interrupted(_args):
        raise KeyboardInterrupt

    assert run_command("sparkbridge demo", interrupted, None) == 130
    assert capsys.readouterr().err == "sparkbridge demo: interrupted\n"


@pytest.mark.slow
def test_an_error_spark_reports_is_one_line_too(tmp_path):
    """A schema Spark cannot parse: Spark's own first line, not a py4j traceback (a real JVM)."""
    csv = tmp_path / "in.csv"
    csv.write_text("a,b\n1,2\n")
    proc = sparkbridge("convert", str(csv), str(tmp_path / "out"), "--master", "local[1]", "--schema", "a INTT",
                       "--no-progress", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line or "Exception" in line]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("sparkbridge convert: error: "), proc.stderr[-3000:]
    assert "INTT" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
