"""jobs/notebooks: the Databricks source notebook and the Jupyter notebook, executed end to end on a
slice of the flights, every count checked against pandas. Neither is part of the installed package
(no __init__.py; test_packaging checks the wheel)."""

from __future__ import annotations

import json

import pytest

from tests.test_quickstart import _expected

NOTEBOOKS = "jobs/notebooks"


def test_notebooks_are_not_a_package(repo_root):
    folder = repo_root / NOTEBOOKS
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "quickstart.ipynb", "quickstart_databricks.py"]
    assert not (folder / "__init__.py").exists()


@pytest.mark.slow
def test_databricks_notebook_runs_on_the_active_session(spark, tmp_path, monkeypatch, repo_root):
    import runpy

    rows = 2_000
    exp = _expected(rows)
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_ROWS", str(rows))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_EPOCHS", "1")
    path = str(repo_root / NOTEBOOKS / "quickstart_databricks.py")
    assert open(path).readline() == "# Databricks notebook source\n"
    cells = runpy.run_path(path, run_name="__main__")  # no `spark` given: it must find the active one
    assert cells["spark"] is spark and spark.range(3).count() == 3  # used, and left running
    assert cells["results"]["train"].rows == exp["rows_train"]
    assert cells["results"]["test"].rows == exp["rows_test"]
    assert cells["trained"].rows == exp["rows_train"]
    assert cells["metrics"]["rows"] == exp["rows_test"] and cells["metrics"]["positives"] == exp["positives_test"]
    assert cells["metrics"]["baseline_accuracy"] == pytest.approx(exp["baseline_accuracy"], abs=1e-12)
    assert (tmp_path / "training.png").stat().st_size > 10_000
    _check_distributed(cells, tmp_path, exp)


def _check_distributed(cells, tmp_path, exp) -> None:
    """The TorchDistributor cell: two ranks, disjoint equal shares covering the train split."""
    assert cells["distributed"] == 0
    ranks = json.loads((tmp_path / "distributed" / "summary.json").read_text())["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and len({r["pid"] for r in ranks}) == 2
    assert sum(r["rows"] for r in ranks) == exp["rows_train"] - exp["rows_train"] % 2
    assert ranks[0]["rows"] == ranks[1]["rows"]


@pytest.mark.slow
def test_databricks_notebook_runs_on_a_connect_session(connect_mode, tmp_path, monkeypatch, repo_root):
    """Databricks serverless and shared clusters give the notebook a Spark Connect session: the same
    cells, the same counts (the Spark side runs on the shared Connect server)."""
    import runpy

    rows = 2_000
    exp = _expected(rows)
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_ROWS", str(rows))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_EPOCHS", "1")
    cells = runpy.run_path(str(repo_root / NOTEBOOKS / "quickstart_databricks.py"), run_name="__main__")
    assert cells["spark"] is connect_mode and connect_mode.range(3).count() == 3  # used, and left running
    assert cells["results"]["train"].rows == exp["rows_train"]
    assert cells["results"]["test"].rows == exp["rows_test"]
    assert cells["trained"].rows == exp["rows_train"]
    assert cells["metrics"]["rows"] == exp["rows_test"] and cells["metrics"]["positives"] == exp["positives_test"]
    assert cells["metrics"]["baseline_accuracy"] == pytest.approx(exp["baseline_accuracy"], abs=1e-12)
    _check_distributed(cells, tmp_path, exp)


@pytest.mark.slow
def test_jupyter_notebook_runs_in_a_fresh_kernel(tmp_path, monkeypatch, repo_root):
    """A real ipykernel (a new process): no active session there, so the notebook starts local[*]."""
    import nbformat
    from nbclient import NotebookClient

    rows = 2_000
    exp = _expected(rows)
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_ROWS", str(rows))
    monkeypatch.setenv("SPARKBRIDGE_NOTEBOOK_EPOCHS", "1")
    nb = nbformat.read(repo_root / NOTEBOOKS / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell) -> str:  # what the cell printed to stdout
        return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")

    def value(cell):  # the value the cell displayed
        (shown,) = [o for o in cell.outputs if o.output_type == "execute_result"]
        return eval(shown["data"]["text/plain"])  # noqa: S307 - a dict repr from our own kernel

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "master local[*]" in text(code[1])
    counts = value(code[2])
    for key in ("rows_source", "rows_train", "rows_test", "positives_train", "positives_test"):
        assert counts[key] == exp[key], key
    assert value(code[3])["train"][0] == exp["rows_train"]
    assert f"{exp['rows_train']:,} rows at" in text(code[4])
    assert any("image/png" in o.get("data", {}) for o in code[5].outputs)
    assert (tmp_path / "training.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "dataset" / "test" / "manifest.json").read_text())["rows"] == exp["rows_test"]
