"""The house rules, checked: one import root, import boundaries between the two sides, and
``__all__`` lists that name what each module really has.

Why tests and not a lint config: these rules are what lets the Spark side run on executors without
torch, the training side run without a JVM, and a user install nothing but ``sparkbridge``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: folder → installed package name
PACKAGE_DIRS = {"sparkbridge": "sparkbridge", "etl": "sparkbridge.etl", "bridge": "sparkbridge.bridge",
                "jobs": "sparkbridge.jobs"}
#: what each side must never import (module prefixes)
FORBIDDEN = {
    "etl": ("torch", "streaming", "sparkbridge.bridge", "sparkbridge.jobs"),
    "bridge": ("pyspark", "sparkbridge.etl", "sparkbridge.jobs"),
    "sparkbridge": ("pyspark", "torch", "streaming", "sparkbridge.etl", "sparkbridge.bridge",
                    "sparkbridge.jobs"),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if (path.parent / "__init__.py").exists():
                out.append((".".join([package, *parts]), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_every_package_folder_is_installed_under_one_root():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in PACKAGE_DIRS.items()}
    found = set()
    for folder, package in PACKAGE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([package, *rel]))
    assert found == listed, "pyproject.toml [tool.setuptools] packages must list exactly the package folders"
    assert all(p == "sparkbridge" or p.startswith("sparkbridge.") for p in listed)


def test_no_module_imports_a_generic_top_level_name():
    """``etl``, ``bridge`` and ``jobs`` collide with other packages on real clusters."""
    bad = []
    for folder in ("sparkbridge", "etl", "bridge", "jobs", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for line, name in _imports(path):
                if name.split(".")[0] in ("etl", "bridge", "jobs"):
                    bad.append(f"{path.relative_to(REPO)}:{line}: import {name}")
    assert not bad, "import through sparkbridge.<side> instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_boundaries(folder):
    bad = []
    for path in (REPO / folder).rglob("*.py"):
        if path == REPO / "sparkbridge" / "__init__.py":
            continue  # the public face re-exports both sides, lazily
        for line, name in _imports(path):
            for prefix in FORBIDDEN[folder]:
                if name == prefix or name.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(REPO)}:{line}: import {name}")
    assert not bad, f"{folder}/ must not import {FORBIDDEN[folder]}:\n" + "\n".join(bad)


def test_libraries_never_import_sys_path_tricks():
    bad = [f"{p.relative_to(REPO)}" for folder in ("sparkbridge", "etl", "bridge", "jobs")
           for p in (REPO / folder).rglob("*.py") if "sys.path" in p.read_text(encoding="utf-8")]
    assert not bad, f"no sys.path edits in the package: {bad}"


def test_the_spark_side_loads_without_torch_and_the_training_side_without_pyspark():
    code = (
        "import sys\n"
        "import sparkbridge, sparkbridge.etl.writer, sparkbridge.etl.task, sparkbridge.etl.commit\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'streaming')], 'etl pulled torch'\n"
        "import sparkbridge.bridge.loader, sparkbridge.bridge.dataset\n"
        "assert 'pyspark' not in sys.modules, 'bridge pulled pyspark'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("module", [m for m, _ in _modules()])
def test_all_names_exist(module):
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert names is not None, f"{module} has no __all__"
    assert len(set(names)) == len(names), f"{module}.__all__ lists a name twice"
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


def test_public_face():
    import sparkbridge

    for name in ("write_mds", "read_source", "StreamingLoader", "SparkbridgeError", "WriteResult"):
        assert name in sparkbridge.__all__
    errors = importlib.import_module("sparkbridge.errors")
    for name in errors.__all__:
        cls = getattr(sparkbridge, name)
        assert issubclass(cls, sparkbridge.SparkbridgeError), name


@pytest.mark.slow
def test_wheel_installs_nothing_but_sparkbridge(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("sparkbridge-*.whl")
    import sparkbridge

    assert wheel.name.startswith(f"sparkbridge-{sparkbridge.__version__}-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sparkbridge"}
    for must in ("sparkbridge/etl/writer.py", "sparkbridge/bridge/loader.py", "sparkbridge/jobs/cli.py",
                 "sparkbridge/format/mds.py", "sparkbridge/errors.py"):
        assert must in names
    assert not [n for n in names if "notebook" in n], "notebooks are not part of the installed package"
