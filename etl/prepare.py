"""JVM-side preparation of the DataFrame, so executors' Python only reinterprets flat Arrow buffers.

Why on the JVM: ``to_json`` for structs/maps, ``vector_to_array`` for ML vectors, decimal casts and
null fills are vectorized there and cost nothing extra in Python. Fixed array shapes are measured
with one small aggregation (min/max of ``size``), only when the DataFrame has array columns.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from sparkbridge.etl.sources import quote_column as _quote
from sparkbridge.etl.types import ColumnPlan, fill_value, storage_order, with_fixed_shape

__all__ = ["measure_array_shapes", "prepare_frame"]

log = logging.getLogger(__name__)


def _array_expr(df: Any, plan: ColumnPlan):
    from pyspark.sql import functions as F

    col = F.col(_quote(plan.source))
    if plan.spec.logical == "vector":
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float64")
    return col


def measure_array_shapes(df: Any, plans: Sequence[ColumnPlan], *,
                         keep: Optional[Mapping[str, Optional[list[int]]]] = None) -> list[ColumnPlan]:
    """Give array columns a fixed shape when every non-null row has the same, non-zero length.

    ``keep`` (append): the existing dataset's shape per array column (None = variable). One dataset
    keeps one encoding per column, so a variable column stays variable, a fixed ``[L]`` column stays
    fixed when the new rows all have ``L`` elements (or there are none), and anything else is a
    :class:`etl.commit.SchemaMismatchError` naming the column and both shapes."""
    arrays = [p for p in plans if p.kind == "ndarray_var"]
    keep = dict(keep or {})
    if not arrays:
        return list(plans)
    measure = [p for p in arrays if not (p.name in keep and keep[p.name] is None)]
    if not measure:
        log.info("array columns %s keep the existing dataset's variable shape", [p.name for p in arrays])
        return list(plans)
    arrays = measure
    from pyspark.sql import functions as F

    aggs = []
    for i, p in enumerate(arrays):
        size = F.size(_array_expr(df, p))
        valid = F.when(F.col(_quote(p.source)).isNotNull(), size)
        aggs += [F.min(valid).alias(f"mn{i}"), F.max(valid).alias(f"mx{i}")]
    log.info("measuring array lengths of %s (one aggregation) to choose fixed or variable shapes",
             [p.name for p in arrays])
    row = df.agg(*aggs).collect()[0]
    fixed = {}
    for i, p in enumerate(arrays):
        lo, hi = row[f"mn{i}"], row[f"mx{i}"]
        if p.name in keep:
            (length,) = keep[p.name]
            if lo is not None and not (lo == hi == length):
                from sparkbridge.etl.commit import SchemaMismatchError

                now = f"[{lo}]" if lo == hi else f"variable ({lo} to {hi} elements)"
                raise SchemaMismatchError(
                    f"cannot append: column {p.name!r} has arrays of shape [{length}] in the dataset but "
                    f"{now} in the new data; one dataset keeps one shape per column (rewrite it with "
                    "mode='overwrite' to change it)"
                )
            fixed[p.name] = int(length)
        elif lo is not None and lo == hi and lo > 0:
            fixed[p.name] = int(lo)
    return storage_order([with_fixed_shape(p, fixed[p.name]) if p.name in fixed else p for p in plans])


def _fill_literal(plan: ColumnPlan, dtype: Any):
    """The Spark literal of :func:`etl.types.fill_value` (the one table of fill values, which the
    manifest records), typed as the column so ``coalesce`` keeps the column's type."""
    import datetime as dt

    from pyspark.sql import functions as F

    value = fill_value(plan.spec)
    logical = plan.spec.logical
    if logical == "bool":
        return F.lit(bool(value))
    if logical == "date":  # days since 1970-01-01
        return F.date_from_unix_date(F.lit(int(value)))
    if logical == "timestamp":  # µs since the epoch, UTC
        return F.timestamp_micros(F.lit(int(value)))
    if logical == "timestamp_ntz":  # a literal: casting a timestamp would apply the session zone
        wall = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(value))
        return F.expr(f"TIMESTAMP_NTZ'{wall.isoformat(sep=' ')}'")
    if logical == "binary":
        return F.expr(f"X'{str(value).encode('utf-8').hex()}'")
    if logical in ("array", "vector"):
        element = _spark_element(plan.element)
        return F.array(*[F.lit(v) for v in value]).cast(f"array<{element}>")
    if logical == "decimal":
        return F.lit(value).cast(dtype if plan.encoding == "str_decimal" else "double")
    if logical in ("string", "json"):
        return F.lit(value)
    return F.lit(value).cast(dtype)


def _spark_element(element: str) -> str:
    return {"int8": "tinyint", "int16": "smallint", "int32": "int", "int64": "bigint",
            "float32": "float", "float64": "double"}[element]


def _decimals_as_strings(dtype: Any) -> Optional[Any]:
    """``dtype`` with every decimal inside it a string, or None when it holds none.

    Why: a nested value is stored as JSON, where a decimal is a number that every JSON reader
    parses as a float (38 digits came back as 17). As a string it stays exact."""
    from pyspark.sql import types as T

    if isinstance(dtype, T.DecimalType):
        return T.StringType()
    if isinstance(dtype, T.ArrayType):
        inner = _decimals_as_strings(dtype.elementType)
        return None if inner is None else T.ArrayType(inner, dtype.containsNull)
    if isinstance(dtype, T.MapType):
        key, value = _decimals_as_strings(dtype.keyType), _decimals_as_strings(dtype.valueType)
        if key is None and value is None:
            return None
        return T.MapType(key or dtype.keyType, value or dtype.valueType, dtype.valueContainsNull)
    if isinstance(dtype, T.StructType):
        inner = [_decimals_as_strings(f.dataType) for f in dtype.fields]
        if all(i is None for i in inner):
            return None
        return T.StructType([T.StructField(f.name, i or f.dataType, f.nullable, f.metadata)
                             for f, i in zip(dtype.fields, inner)])
    return None


def prepare_frame(df: Any, plans: Sequence[ColumnPlan], *, nulls: str, decimals: str = "string") -> Any:
    """A DataFrame with exactly one Arrow-friendly column per plan, in plan order.

    ``decimals="string"``: decimals nested in a JSON column are written as strings (exact).
    Its columns are named by position (``_0``, ``_1``, ...): the tasks read them by position, and
    pyspark's ``mapInArrow`` resolves each column by its bare name, which fails for a user's name
    with a dot in it (``x.y``)."""
    from pyspark.sql import functions as F

    fields = {f.name: f for f in df.schema.fields}
    exprs = []
    for position, plan in enumerate(plans):
        src = F.col(_quote(plan.source))
        if plan.kind == "mask":
            exprs.append(src.isNull().cast("tinyint").alias(f"_{position}"))
            continue
        dtype = fields[plan.source].dataType
        logical = plan.spec.logical
        if logical in ("array", "vector"):
            expr = _array_expr(df, plan)
            if nulls == "fill":
                zero = F.lit(0).cast(_spark_element(plan.element))
                expr = F.transform(expr, lambda x: F.coalesce(x, zero))
        elif logical == "json":
            exact = _decimals_as_strings(dtype) if decimals == "string" else None
            expr = F.to_json(src if exact is None else src.cast(exact))
        elif logical == "decimal" and plan.encoding == "float64":
            expr = src.cast("double")
        else:
            expr = src
        if nulls in ("fill", "mask") and plan.nullable:
            expr = F.coalesce(expr, _fill_literal(plan, dtype))
        exprs.append(expr.alias(f"_{position}"))
    return df.select(*exprs)
