"""Parsing the metadata's JSON (log entries, checkpoints, ``index.json``): the values
``json.loads`` gives, parsed by a compiled parser where it gives the same.

Why: a log entry or checkpoint of 100,000 shards is ~47 MB of JSON, and the standard library's
parser was the largest part of opening such a dataset (``bench/metadata.py``). ``msgspec``
parses it faster and accepts a subset of what ``json.loads`` accepts (not NaN or Infinity, a
number beyond a float's range, a lone surrogate, UTF-16 or a byte-order mark), giving the same
values for it (integers of any size exactly: ``orjson`` turned those beyond 64 bits into floats,
``tests/format/test_jsonload.py``). A document it refuses is parsed again by ``json.loads``: what
is accepted, what it becomes and every error message stay the standard library's. The files are
written as before (``json.dumps``): their format does not change, and stock Mosaic reads
``index.json`` as it did.
"""

from __future__ import annotations

import json
from typing import Any, Union

__all__ = ["loads"]

try:
    from msgspec import DecodeError as _DecodeError
    from msgspec.json import decode as _decode
except ImportError:  # pragma: no cover - a dependency (pyproject.toml); the standard library still parses
    _decode = None


def loads(data: Union[bytes, bytearray, memoryview, str]) -> Any:
    """``json.loads(data)``, faster: the same value, or the same exception."""
    if _decode is not None:
        try:
            return _decode(data)
        except (_DecodeError, RecursionError):
            pass  # not within msgspec's subset (or not JSON at all): the standard library decides
    if isinstance(data, memoryview):
        data = bytes(data)
    return json.loads(data)
