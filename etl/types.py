"""Spark schema → MDS column plan: which encoding each column gets, decided before any task runs.

Why a plan: the mapping has to be complete (every numeric type keeps its sign, booleans, dates,
timestamps, decimals, vectors, nested types) and unsupported types have to fail on the driver with
the column's name, not as a deep traceback from an executor. The plan also says how the column is
prepared on the JVM side (``to_json`` for nested types, ``vector_to_array`` for ML vectors, a cast
for float decimals, ``coalesce`` for ``nulls="fill"``) so the Python encoder only ever sees flat
Arrow arrays it can reinterpret without a per-row loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from sparkbridge.errors import SchemaError, UnsupportedTypeError
from sparkbridge.format.manifest import ColumnSpec
from sparkbridge.format.mds import ndarray_encoding

__all__ = [
    "NULL_POLICIES",
    "DECIMAL_MODES",
    "NULL_SUFFIX",
    "UnsupportedTypeError",
    "SchemaError",
    "ColumnPlan",
    "plan_columns",
    "storage_order",
    "fill_value",
    "with_fixed_shape",
    "logical_schema",
    "FILL_VALUES",
]

log = logging.getLogger(__name__)

NULL_POLICIES = ("error", "fill", "mask")
DECIMAL_MODES = ("string", "float")
NULL_SUFFIX = "__null"

# Spark scalar type name → (logical type, MDS encoding); the encoding is also the numpy dtype name
# of the Arrow value buffer.
_SCALARS: dict[str, tuple[str, str]] = {
    "BooleanType": ("bool", "uint8"),
    "ByteType": ("int8", "int8"),
    "ShortType": ("int16", "int16"),
    "IntegerType": ("int32", "int32"),
    "LongType": ("int64", "int64"),
    "FloatType": ("float32", "float32"),
    "DoubleType": ("float64", "float64"),
    "DateType": ("date", "int32"),
    "TimestampType": ("timestamp", "int64"),
    "TimestampNTZType": ("timestamp_ntz", "int64"),
}
# Array element types stored as a numeric ndarray (anything else in an array goes to json).
_ARRAY_ELEMENTS = {
    "ByteType": "int8",
    "ShortType": "int16",
    "IntegerType": "int32",
    "LongType": "int64",
    "FloatType": "float32",
    "DoubleType": "float64",
}
_VECTOR_UDTS = ("VectorUDT",)

#: Values written in place of nulls under ``nulls="fill"`` (documented in the README and manifest).
FILL_VALUES: dict[str, Any] = {
    "bool": 0, "int8": 0, "int16": 0, "int32": 0, "int64": 0, "float32": 0.0, "float64": 0.0,
    "date": 0, "timestamp": 0, "timestamp_ntz": 0, "decimal": "0", "string": "", "binary": "",
    "array": [], "vector": [], "json": "{}",
}






@dataclass(frozen=True)
class ColumnPlan:
    """One stored MDS column and how to produce it.

    ``kind`` tells the encoder how to turn the Arrow array into bytes: ``fixed`` (reinterpret the
    value buffer), ``bool`` (bit-packed → uint8), ``var`` (Arrow offsets + data, for str/bytes/
    json/str_decimal), ``ndarray_fixed`` / ``ndarray_var`` (list arrays of numbers) or ``mask``.
    ``source`` is the user's column this one is derived from (a mask's source is its column).
    """

    name: str
    kind: str
    encoding: str
    spec: Optional[ColumnSpec]  # None for the generated mask columns
    source: str
    element: Optional[str] = None  # numpy dtype name for ndarray kinds
    nullable: bool = True

    @property
    def fixed_width(self) -> bool:
        return self.kind in ("fixed", "bool", "ndarray_fixed", "mask")


def _type_name(dt: Any) -> str:
    return type(dt).__name__


def fill_value(spec: ColumnSpec) -> Any:
    """The value ``nulls="fill"`` (and ``"mask"``, under the mask) writes for a null: zero of the
    type (0, false, 1970-01-01, the epoch), "" / b"", an empty array (zeros when the array has a
    fixed shape), ``{}`` for structs and maps, ``[]`` for other arrays stored as json."""
    if spec.logical == "json":
        return "[]" if spec.spark_type.startswith("array") else "{}"
    if spec.logical == "decimal":
        return "0" if spec.encoding == "str_decimal" else 0.0
    if spec.logical in ("array", "vector") and spec.shape:
        return [0] * spec.shape[0]
    return FILL_VALUES[spec.logical]


def _scalar_plan(name: str, dt: Any, nullable: bool, decimals: str) -> ColumnPlan:
    tname = _type_name(dt)
    if tname in _SCALARS:
        logical, encoding = _SCALARS[tname]
        kind = "bool" if tname == "BooleanType" else "fixed"
        spec = ColumnSpec(name=name, logical=logical, encoding=encoding, spark_type=dt.simpleString(),
                          nullable=nullable)
        return ColumnPlan(name, kind, encoding, spec, name, nullable=nullable)
    if tname == "DecimalType":
        encoding, kind = ("str_decimal", "var") if decimals == "string" else ("float64", "fixed")
        spec = ColumnSpec(name=name, logical="decimal", encoding=encoding, spark_type=dt.simpleString(),
                          nullable=nullable)
        return ColumnPlan(name, kind, encoding, spec, name, nullable=nullable)
    if tname in ("StringType", "CharType", "VarcharType"):
        spec = ColumnSpec(name=name, logical="string", encoding="str", spark_type=dt.simpleString(),
                          nullable=nullable)
        return ColumnPlan(name, "var", "str", spec, name, nullable=nullable)
    if tname == "BinaryType":
        spec = ColumnSpec(name=name, logical="binary", encoding="bytes", spark_type=dt.simpleString(),
                          nullable=nullable)
        return ColumnPlan(name, "var", "bytes", spec, name, nullable=nullable)
    if tname == "ArrayType" and _type_name(dt.elementType) in _ARRAY_ELEMENTS:
        element = _ARRAY_ELEMENTS[_type_name(dt.elementType)]
        spec = ColumnSpec(name=name, logical="array", encoding=ndarray_encoding(element),
                          spark_type=dt.simpleString(), nullable=nullable, element=element)
        return ColumnPlan(name, "ndarray_var", spec.encoding, spec, name, element=element, nullable=nullable)
    if tname in _VECTOR_UDTS:
        spec = ColumnSpec(name=name, logical="vector", encoding=ndarray_encoding("float64"),
                          spark_type=dt.simpleString(), nullable=nullable, element="float64")
        return ColumnPlan(name, "ndarray_var", spec.encoding, spec, name, element="float64", nullable=nullable)
    if tname in ("StructType", "MapType", "ArrayType"):
        if not _json_convertible(dt):
            raise UnsupportedTypeError(
                f"column {name!r} has type {dt.simpleString()}, which contains a type with no JSON form "
                "(intervals, variants or user-defined types); cast or drop it before write_mds"
            )
        spec = ColumnSpec(name=name, logical="json", encoding="json", spark_type=dt.simpleString(),
                          nullable=nullable)
        return ColumnPlan(name, "var", "json", spec, name, nullable=nullable)
    raise UnsupportedTypeError(
        f"column {name!r} has type {dt.simpleString()}, which write_mds cannot store; supported: "
        "numbers, boolean, date, timestamp, decimal, string, binary, arrays, ml vectors, structs, maps"
    )


def _json_convertible(dt: Any) -> bool:
    tname = _type_name(dt)
    if tname == "StructType":
        return all(_json_convertible(f.dataType) for f in dt.fields)
    if tname == "MapType":
        return _json_convertible(dt.keyType) and _json_convertible(dt.valueType)
    if tname == "ArrayType":
        return _json_convertible(dt.elementType)
    return tname in _SCALARS or tname in ("DecimalType", "StringType", "CharType", "VarcharType", "BinaryType")


def plan_columns(
    schema: Any,
    *,
    columns: Optional[Sequence[str]] = None,
    nulls: str = "error",
    decimals: str = "string",
) -> list[ColumnPlan]:
    """Map a Spark ``StructType`` to the stored columns, in storage order (see :func:`storage_order`).

    Raises :class:`UnsupportedTypeError` naming every unsupported column, :class:`SchemaError` for
    unknown or duplicate requested columns. Fixed array shapes are decided later from the data.
    """
    if nulls not in NULL_POLICIES:
        raise ValueError(f"nulls must be one of {NULL_POLICIES}, got {nulls!r}")
    if decimals not in DECIMAL_MODES:
        raise ValueError(f"decimals must be one of {DECIMAL_MODES}, got {decimals!r}")
    fields = {f.name: f for f in schema.fields}
    if len(fields) != len(schema.fields):
        dupes = sorted({f.name for f in schema.fields if [g.name for g in schema.fields].count(f.name) > 1})
        raise SchemaError(f"the DataFrame has duplicate column names {dupes}; rename them before write_mds")
    if columns is None:
        names = [f.name for f in schema.fields]
    else:
        if isinstance(columns, str):
            raise SchemaError(f"columns must be a list of names, got the string {columns!r}")
        names = list(columns)
        missing = [c for c in names if c not in fields]
        if missing:
            raise SchemaError(f"columns {missing} are not in the DataFrame; it has {list(fields)}")
        if len(set(names)) != len(names):
            raise SchemaError(f"columns lists a name twice: {names}")
    if not names:
        raise SchemaError("write_mds needs at least one column")
    plans: list[ColumnPlan] = []
    problems: list[str] = []
    for name in names:
        f = fields[name]
        try:
            plans.append(_scalar_plan(name, f.dataType, bool(f.nullable), decimals))
        except UnsupportedTypeError as exc:
            problems.append(str(exc))
    if problems:
        raise UnsupportedTypeError("; ".join(problems))
    if nulls == "fill":
        plans = [replace(p, spec=replace(p.spec, fill=fill_value(p.spec))) if p.nullable else p
                 for p in plans]
    if nulls == "mask":
        masks = []
        for p in plans:
            if not p.nullable:
                continue
            mask_name = p.name + NULL_SUFFIX
            if mask_name in fields:
                raise SchemaError(
                    f"nulls='mask' would add column {mask_name!r} for {p.name!r}, but the DataFrame "
                    "already has a column of that name"
                )
            masks.append(ColumnPlan(mask_name, "mask", "uint8", None, p.name, nullable=False))
        plans = [replace(p, spec=replace(p.spec, null_mask=p.name + NULL_SUFFIX)) if p.nullable else p
                 for p in plans] + masks
    return storage_order(plans)


def storage_order(plans: Sequence[ColumnPlan]) -> list[ColumnPlan]:
    """Fixed-width columns first (user order, then masks), then variable-width: readers gather
    every fixed column with one strided copy."""
    fixed = [p for p in plans if p.fixed_width and p.kind != "mask"]
    masks = [p for p in plans if p.kind == "mask"]
    var = [p for p in plans if not p.fixed_width]
    return fixed + masks + var


def with_fixed_shape(plan: ColumnPlan, length: int) -> ColumnPlan:
    """The plan for an array column whose every row has ``length`` (>= 1) elements."""
    encoding = ndarray_encoding(plan.element, (length,))
    spec = replace(plan.spec, encoding=encoding, shape=[length])
    if spec.fill is not None:
        spec = replace(spec, fill=fill_value(spec))
    return replace(plan, kind="ndarray_fixed", encoding=encoding, spec=spec)


def logical_schema(plans: Sequence[ColumnPlan]) -> list[dict[str, Any]]:
    """What ``append`` compares: names, logical types, elements, masks — not encodings of shape."""
    out = []
    for p in plans:
        if p.spec is None:
            out.append({"name": p.name, "logical": "null_mask", "of": p.source})
        else:
            s = p.spec
            out.append({"name": s.name, "logical": s.logical, "element": s.element,
                        "decimal_as": ("float" if s.encoding == "float64" else "string") if s.logical == "decimal" else None,
                        "null_mask": s.null_mask, "spark_type": s.spark_type})
    return out

