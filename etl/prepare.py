"""JVM-side preparation of the DataFrame, so executors' Python only reinterprets flat Arrow buffers.

Why on the JVM: ``to_json`` for structs/maps, ``vector_to_array`` for ML vectors, decimal casts and
null fills are vectorized there and cost nothing extra in Python. Fixed array shapes are measured
with one small aggregation (min/max of ``size``), only when the DataFrame has array columns.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from etl.types import ColumnPlan, storage_order, with_fixed_shape

__all__ = ["measure_array_shapes", "prepare_frame"]

log = logging.getLogger(__name__)


def _array_expr(df: Any, plan: ColumnPlan):
    from pyspark.sql import functions as F

    col = F.col(_quote(plan.source))
    if plan.spec.logical == "vector":
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float64")
    return col


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def measure_array_shapes(df: Any, plans: Sequence[ColumnPlan]) -> list[ColumnPlan]:
    """Give array columns a fixed shape when every non-null row has the same, non-zero length."""
    arrays = [p for p in plans if p.kind == "ndarray_var"]
    if not arrays:
        return list(plans)
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
        if lo is not None and lo == hi and lo > 0:
            fixed[p.name] = int(lo)
    return storage_order([with_fixed_shape(p, fixed[p.name]) if p.name in fixed else p for p in plans])


def _fill_literal(plan: ColumnPlan, dtype: Any):
    from pyspark.sql import functions as F

    logical = plan.spec.logical
    if logical in ("bool",):
        return F.lit(False)
    if logical == "date":
        return F.expr("DATE'1970-01-01'")
    if logical == "timestamp":
        return F.timestamp_seconds(F.lit(0))
    if logical == "timestamp_ntz":
        return F.expr("TIMESTAMP_NTZ'1970-01-01 00:00:00'")
    if logical == "string":
        return F.lit("")
    if logical == "binary":
        return F.expr("X''")
    if logical in ("array", "vector"):
        if plan.kind == "ndarray_fixed":
            return F.array_repeat(F.lit(0).cast(_spark_element(plan.element)), plan.spec.shape[0])
        return F.array().cast(f"array<{_spark_element(plan.element)}>")
    if logical == "json":
        return F.lit("[]" if plan.spec.spark_type.startswith("array") else "{}")
    return F.lit(0).cast(dtype)


def _spark_element(element: str) -> str:
    return {"int8": "tinyint", "int16": "smallint", "int32": "int", "int64": "bigint",
            "float32": "float", "float64": "double"}[element]


def prepare_frame(df: Any, plans: Sequence[ColumnPlan], *, nulls: str) -> Any:
    """A DataFrame with exactly one Arrow-friendly column per plan, in plan order."""
    from pyspark.sql import functions as F

    fields = {f.name: f for f in df.schema.fields}
    exprs = []
    for plan in plans:
        src = F.col(_quote(plan.source))
        if plan.kind == "mask":
            exprs.append(src.isNull().cast("tinyint").alias(plan.name))
            continue
        dtype = fields[plan.source].dataType
        logical = plan.spec.logical
        if logical in ("array", "vector"):
            expr = _array_expr(df, plan)
            if nulls == "fill":
                zero = F.lit(0).cast(_spark_element(plan.element))
                expr = F.transform(expr, lambda x: F.coalesce(x, zero))
        elif logical == "json":
            expr = F.to_json(src)
        elif logical == "decimal" and plan.encoding == "float64":
            expr = src.cast("double")
        else:
            expr = src
        if nulls in ("fill", "mask") and plan.nullable:
            fill = _fill_literal(plan, dtype)
            if logical == "decimal":
                fill = F.lit(0).cast(dtype if plan.encoding == "str_decimal" else "double")
            expr = F.coalesce(expr, fill)
        exprs.append(expr.alias(plan.name))
    return df.select(*exprs)
