"""``manifest.json``: what the stock MDS index cannot say (logical types, null policy, identity).

The stock reader only needs ``index.json``; everything sparkbridge adds lives here so stock
``streaming.StreamingDataset`` never sees a field it does not know. Pure Python: both sides use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from sparkbridge.errors import ManifestError

__all__ = ["MANIFEST_BASENAME", "MANIFEST_VERSION", "ColumnSpec", "Manifest", "ManifestError"]

MANIFEST_BASENAME = "manifest.json"
MANIFEST_VERSION = 1




@dataclass(frozen=True)
class ColumnSpec:
    """One source column: how it is stored in MDS and how to restore its logical type.

    ``logical`` is one of: ``bool``, ``int8``, ``int16``, ``int32``, ``int64``, ``float32``,
    ``float64``, ``date`` (int32 days since 1970-01-01), ``timestamp`` (int64 µs since the epoch,
    UTC), ``timestamp_ntz`` (int64 µs, no zone), ``decimal`` (exact string or float64), ``string``,
    ``binary``, ``array`` (ndarray of ``element``), ``vector`` (float64 ndarray), ``json``.
    """

    name: str
    logical: str
    encoding: str
    spark_type: str
    nullable: bool = True
    element: Optional[str] = None  # numpy dtype name of array elements
    shape: Optional[list[int]] = None  # fixed shape of array values, when every row agrees
    null_mask: Optional[str] = None  # name of the ``<col>__null`` uint8 column (nulls="mask")
    fill: Any = None  # the value nulls were replaced with (nulls="fill")


@dataclass(frozen=True)
class Manifest:
    """Dataset-level facts written next to ``index.json`` (before it: the index is the commit)."""

    rows: int
    shards: int
    columns: list[ColumnSpec]
    index_sha256: str
    schema_fingerprint: str
    nulls: str
    compression: Optional[str]
    hashes: list[str]
    created_at: str
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"column {name!r} is not in the manifest; columns: {[c.name for c in self.columns]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_BASENAME) -> "Manifest":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        version = obj.get("version")
        if version != MANIFEST_VERSION:
            raise ManifestError(f"{source}: manifest version {version!r} is not supported (expected {MANIFEST_VERSION})")
        try:
            columns = [ColumnSpec(**c) for c in obj.pop("columns")]
            return cls(columns=columns, **obj)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{source}: malformed manifest ({exc})") from None
