"""Where a dataset lives: a local folder or an S3 prefix, behind one small interface.

Why not fsspec: the commit protocol needs exactly three guarantees and they differ per backend —
an atomic replace (local: temp file + ``os.replace``; S3: a single PUT is atomic), recursive listing
for orphan detection, and deletes. Spelling them out keeps the commit code honest on both.
S3 honours ``S3_ENDPOINT_URL`` (as Mosaic Streaming does), so MinIO/SeaweedFS/R2 work unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Iterable, Optional
from urllib.parse import urlparse

__all__ = ["Storage", "LocalStorage", "S3Storage", "open_storage", "is_remote"]

log = logging.getLogger(__name__)


def is_remote(root: str) -> bool:
    """True for object-store URLs (``s3://``), False for local paths and ``file://``."""
    scheme = urlparse(root).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # a Windows drive letter is not a scheme


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").lstrip("/")
    if any(part == ".." for part in rel.split("/")):
        raise ValueError(f"refusing a path that leaves the dataset root: {rel!r}")
    return rel


class Storage:
    """A dataset root. Paths given to methods are relative to it, with ``/`` separators."""

    root: str
    is_local: bool

    def url(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str) -> str:  # pragma: no cover - overridden
        raise NotImplementedError(f"{self.root} is not a local folder")

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def list_files(self, prefix: str = "") -> list[tuple[str, int]]:
        raise NotImplementedError

    def delete(self, rels: Iterable[str]) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"


class LocalStorage(Storage):
    """A folder on a local or shared (NFS, DBFS fuse) filesystem."""

    is_local = True

    def __init__(self, root: str) -> None:
        if root.startswith("file://"):
            root = urlparse(root).path
        self.root = os.path.abspath(os.path.expanduser(root)).rstrip("/") or "/"

    def local_path(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.local_path(rel))

    def read_bytes(self, rel: str) -> bytes:
        path = self.local_path(rel)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {path}") from None

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        path = self.local_path(rel)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    def list_files(self, prefix: str = "") -> list[tuple[str, int]]:
        base = self.local_path(prefix)
        if os.path.isfile(base):
            return [(_clean_rel(prefix), os.path.getsize(base))]
        out = []
        for folder, _, files in os.walk(base):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    size = os.path.getsize(path)
                except FileNotFoundError:  # removed while listing
                    continue
                out.append((os.path.relpath(path, self.root).replace(os.sep, "/"), size))
        return sorted(out)

    def delete(self, rels: Iterable[str]) -> None:
        for rel in rels:
            try:
                os.unlink(self.local_path(rel))
            except FileNotFoundError:
                pass

    def delete_prefix(self, prefix: str) -> int:
        path = self.local_path(prefix)
        if os.path.isfile(path):
            os.unlink(path)
            return 1
        if not os.path.isdir(path):
            return 0
        count = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path, ignore_errors=True)
        return count


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Storage(Storage):
    """An ``s3://bucket/prefix``. Credentials come from boto3's usual chain (env, profile, role)."""

    is_local = False

    def __init__(self, root: str, *, endpoint_url: Optional[str] = None) -> None:
        parsed = urlparse(root)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"expected s3://bucket/prefix, got {root!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
        self._client = None

    def __getstate__(self) -> dict:  # boto3 clients do not pickle; executors build their own
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(retries={"max_attempts": 5, "mode": "standard"}),
            )
        return self._client

    def key(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no such object: {self.url(rel)}") from None
            raise

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def list_files(self, prefix: str = "") -> list[tuple[str, int]]:
        key_prefix = self.key(prefix)
        if key_prefix and prefix and not prefix.endswith("/"):
            # a "folder" prefix must not match siblings sharing its first letters
            exact = [(k, s) for k, s in self._list(key_prefix) if k == key_prefix]
            return exact or self._strip(self._list(key_prefix + "/"))
        if key_prefix and not key_prefix.endswith("/"):
            key_prefix += "/"
        return self._strip(self._list(key_prefix))

    def _list(self, key_prefix: str) -> list[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                out.append((obj["Key"], int(obj["Size"])))
        return out

    def _strip(self, items: list[tuple[str, int]]) -> list[tuple[str, int]]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted((k[cut:], s) for k, s in items)

    def delete(self, rels: Iterable[str]) -> None:
        keys = [self.key(r) for r in rels]
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            if chunk:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )

    def delete_prefix(self, prefix: str) -> int:
        files = [rel for rel, _ in self.list_files(prefix)]
        self.delete(files)
        return len(files)


def open_storage(root: str) -> Storage:
    """The storage for a dataset root: ``s3://bucket/prefix`` or a local path (``file://`` ok)."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"a dataset root must be a path or URL string, got {type(root).__name__}")
    root = os.fspath(root)
    if not root:
        raise ValueError("a dataset root must not be empty")
    scheme = urlparse(root).scheme
    if scheme == "s3":
        return S3Storage(root)
    if is_remote(root):
        raise ValueError(f"unsupported storage scheme {scheme!r} in {root!r}: use a local path or s3://")
    return LocalStorage(root)
