"""Object-store settings for the tasks of one write: sent with the tasks, never in their closure.

Why: the first version pickled the driver's ``AWS_*`` values into the task configuration (its repr
showed the secret) and set them into ``os.environ`` of Python workers, which Spark reuses, so they
outlived the task. Here the driver puts them into Spark *local properties* for the duration of the
write — Spark ships those with each task of the jobs started from this thread, and redacts keys
matching its ``spark.redaction.regex`` (``secret``, ``access.key``, ``token``: ours all match) in
logs and event logs. The task reads them from its ``TaskContext`` and hands them to its own boto3
client; nothing is written to the worker's environment and nothing is kept after the task.
Executors started with their own credentials (instance roles, their environment) need none: the
driver sends only what it has.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

__all__ = ["S3_SETTINGS", "task_credentials", "from_task_context"]

#: local property → (environment variable on the driver, boto3 client argument)
S3_SETTINGS = {
    "sparkbridge.s3.endpoint": ("S3_ENDPOINT_URL", "endpoint_url"),
    "sparkbridge.s3.region": ("AWS_REGION", "region_name"),
    "sparkbridge.s3.access.key": ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    "sparkbridge.s3.secret.access.key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    "sparkbridge.s3.session.token": ("AWS_SESSION_TOKEN", "aws_session_token"),
}


@contextlib.contextmanager
def task_credentials(spark: Any, storage: Any) -> Iterator[None]:
    """While the block runs, tasks started from this thread carry the driver's S3 settings."""
    if storage.is_local:
        yield
        return
    sc = spark.sparkContext
    values = {}
    for prop, (env, _) in S3_SETTINGS.items():
        value = os.environ.get(env) or (os.environ.get("AWS_DEFAULT_REGION") if env == "AWS_REGION" else None)
        if env == "S3_ENDPOINT_URL" and getattr(storage, "endpoint_url", None):
            value = storage.endpoint_url
        if value:
            values[prop] = value
    saved = {prop: sc.getLocalProperty(prop) for prop in values}
    try:
        for prop, value in values.items():
            sc.setLocalProperty(prop, value)
        yield
    finally:
        for prop, value in saved.items():
            sc.setLocalProperty(prop, value)  # None removes it


def from_task_context(ctx: Any) -> Optional[dict[str, str]]:
    """boto3 client arguments the driver sent with this task (None when it sent none)."""
    out = {}
    for prop, (_, arg) in S3_SETTINGS.items():
        value = ctx.getLocalProperty(prop)
        if value:
            out[arg] = value
    return out or None
