"""``sparkbridge cluster-demo`` (being built): a standalone Spark cluster and S3 on 127.0.0.1."""

from __future__ import annotations

import argparse

from sparkbridge.errors import SparkbridgeError

__all__ = ["add_cluster_demo_arguments", "run_cluster_demo"]


def add_cluster_demo_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_cluster_demo(args: argparse.Namespace) -> int:
    raise SparkbridgeError("cluster-demo is not implemented yet")
