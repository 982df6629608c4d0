"""Object-store settings for the tasks of one write: no place Spark shows or logs holds a secret.

Why: the first version pickled the driver's ``AWS_*`` values into the task configuration (its repr
showed the secret) and set them into ``os.environ`` of Python workers, which Spark reuses, so they
outlived the task. The second sent them as Spark *local properties*, trusting Spark's redaction --
but Spark redacts a job's properties in its event log only for keys that are also in the
application's ``SparkConf`` (``EventLoggingListener.redactProperties``), so the secret was written,
in clear, into every ``SparkListenerJobStart`` and ``SparkListenerStageSubmitted`` of the event log
(found by tests/etl/test_connect.py, on a classic and a Connect session alike).

Now each secret value is split in two random-looking halves, neither of which says anything alone
(a one-time pad: ``value XOR pad``, the pad as long as the value, fresh for every write):

- the *sealed* value rides as a task property (:func:`sparkbridge.etl.session.task_properties`:
  local properties on a classic session, the session's configuration on Spark Connect, where there
  is no ``sparkContext``) -- what the event log, the UI's SQL and job pages may show;
- the *pad* rides inside the pickled task function (:class:`CredentialKey`, whose repr shows no
  value) -- never printed: plans show the function's name, and Spark Connect's statement text in the
  UI and event log truncates a UDF's pickled bytes to their first few.

The property names are unique to the write, so concurrent writes of one session never mix their
halves. The task joins the halves into its own boto3 client; nothing is written to the worker's
environment and nothing is kept after the task. The endpoint and region are not secret and travel
in clear. Executors started with their own credentials (instance roles, their environment) need
none: the driver sends only what it has.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from typing import Any, Iterator, Optional

__all__ = ["S3_SETTINGS", "SEALED", "CredentialKey", "task_credentials", "from_task_context"]

#: setting → (environment variable on the driver, boto3 client argument)
S3_SETTINGS = {
    "endpoint": ("S3_ENDPOINT_URL", "endpoint_url"),
    "region": ("AWS_REGION", "region_name"),
    "access.key": ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    "secret.access.key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    "session.token": ("AWS_SESSION_TOKEN", "aws_session_token"),
}
#: settings that never travel in clear
SEALED = ("access.key", "secret.access.key", "session.token")
#: task property names: ``spark.``-prefixed (how a Connect session's values reach its tasks) and
#: matching Spark's redaction regex (``secret``, ``access.key``, ``token``) where secret
PROPERTY_PREFIX = "spark.sparkbridge.s3."


class CredentialKey:
    """The task's half of one write's S3 settings: the property names and the one-time pads.

    Pickled into the task function; alone it holds no credential, and its repr shows none."""

    def __init__(self, tag: str, pads: dict[str, bytes]) -> None:
        self.tag = tag
        self._pads = dict(pads)

    def property(self, setting: str) -> str:
        return f"{PROPERTY_PREFIX}{self.tag}.{setting}"

    def open(self, setting: str, value: str) -> str:
        pad = self._pads.get(setting)
        if pad is None:
            return value
        sealed = base64.b64decode(value.encode("ascii"))
        return bytes(a ^ b for a, b in zip(sealed, pad)).decode("utf-8")

    def __repr__(self) -> str:
        return f"CredentialKey(tag={self.tag!r}, {len(self._pads)} sealed setting(s))"


def _seal(value: str) -> tuple[str, bytes]:
    raw = value.encode("utf-8")
    pad = secrets.token_bytes(len(raw))
    return base64.b64encode(bytes(a ^ b for a, b in zip(raw, pad))).decode("ascii"), pad


@contextlib.contextmanager
def task_credentials(spark: Any, storage: Any) -> Iterator[Optional[CredentialKey]]:
    """While the block runs, tasks of the jobs it starts carry the driver's S3 settings (sealed);
    yields the :class:`CredentialKey` the task function needs to open them (None: nothing sent)."""
    if storage.is_local:
        yield None
        return
    from sparkbridge.etl.session import task_properties

    values = {}
    for setting, (env, _) in S3_SETTINGS.items():
        value = os.environ.get(env) or (os.environ.get("AWS_DEFAULT_REGION") if env == "AWS_REGION" else None)
        if env == "S3_ENDPOINT_URL" and getattr(storage, "endpoint_url", None):
            value = storage.endpoint_url
        if value:
            values[setting] = value
    if not values:
        yield None
        return
    pads, properties = {}, {}
    key = CredentialKey(secrets.token_hex(8), {})
    for setting, value in values.items():
        if setting in SEALED:
            value, pads[setting] = _seal(value)
        properties[key.property(setting)] = value
    key = CredentialKey(key.tag, pads)
    with task_properties(spark, properties):
        yield key


def from_task_context(ctx: Any, key: Optional[CredentialKey]) -> Optional[dict[str, str]]:
    """boto3 client arguments the driver sent with this task (None when it sent none)."""
    if key is None:
        return None
    out = {}
    for setting, (_, arg) in S3_SETTINGS.items():
        value = ctx.getLocalProperty(key.property(setting))
        if value:
            out[arg] = key.open(setting, value)
    return out or None
