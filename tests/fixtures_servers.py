"""Pytest fixtures for the real servers in :mod:`sparkbridge.jobs.local_cluster` (registered via ``pytest_plugins``).

- ``s3_server`` (session): one SeaweedFS S3 server for the run; while it is up the process
  environment carries ``S3_ENDPOINT_URL`` and ``AWS_*`` so boto3, Mosaic streaming and
  ``sparkbridge.storage`` reach it (the previous values come back at the end of the session).
- ``s3_bucket`` (function): a fresh, empty bucket per test (``str(s3_bucket)`` is ``s3://name``).
- ``spark_cluster`` (session): the master URL of a standalone master + 2 workers (1 core, 1 GiB
  each) whose executors inherit the S3 server's endpoint and credentials; ``spark_cluster_webui``
  its web UI.

Beware: a local Spark session started *before* ``s3_server`` keeps the environment it was started
with for its Python workers; code that runs on executors should receive endpoint/credentials from
the driver rather than rely on inherited variables.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Iterator

import pytest

from sparkbridge.jobs.local_cluster import (S3Server, create_bucket, environment, seaweedfs_server,
                                           spark_standalone_cluster)

__all__ = ["S3Bucket", "s3_server", "s3_bucket", "spark_cluster", "spark_cluster_webui"]

_counter = itertools.count()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket created for one test; ``str()`` gives ``s3://<name>``."""

    name: str
    server: S3Server

    @property
    def root(self) -> str:
        return f"s3://{self.name}"

    def url(self, *parts: str) -> str:
        """``s3://<name>/<parts joined by '/'>``."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (sorted), straight from the server."""
        client = self.server.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def __str__(self) -> str:
        return self.root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        with environment(server.env()):
            yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server, request) -> S3Bucket:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    name = f"t{next(_counter):03d}-{slug}"
    create_bucket(s3_server, name)
    return S3Bucket(name, s3_server)


@pytest.fixture(scope="session")
def spark_cluster(s3_server: S3Server, tmp_path_factory) -> Iterator[str]:
    # Depends on s3_server so the daemons (and the executors they launch) carry its endpoint and
    # credentials: jobs on this cluster can write s3:// outputs. The S3 server costs ~1 s to start.
    log_dir = tmp_path_factory.mktemp("spark-cluster")
    with spark_standalone_cluster(workers=2, log_dir=log_dir, env=s3_server.env(), info=_CLUSTER_INFO) as url:
        yield url


@pytest.fixture(scope="session")
def spark_cluster_webui(spark_cluster: str) -> str:
    """The web UI URL of the ``spark_cluster`` master (its JSON status lists workers and applications)."""
    return _CLUSTER_INFO["webui"]


_CLUSTER_INFO: dict = {}
