"""Monthly totals per meter and per district, month to date, from the daily per-meter views.

Each run of a day recomputes its month from every ``meter_daily`` partition of that month
(a re-run or a late day changes the month it is in), in Arrow: a month holds one row per
meter and day, not readings.
"""

from __future__ import annotations

import calendar
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

from meterflow.batch.views import COUNTED_COLUMNS, METER_VIEW, read_partition, view_path

#: The per-meter columns a month sums.
SUMMED = (*COUNTED_COLUMNS, "estimated_consumption")
_KEYS = ("device_id", "meter_type", "district")
_COLUMNS = (*_KEYS, "estimated_share", *COUNTED_COLUMNS)


def month_of(day: date) -> str:
    return f"{day:%Y-%m}"


def _days(views_root: str, day: date) -> pa.Table:
    """Every published day of ``day``'s month, one row per meter and day."""
    last = calendar.monthrange(day.year, day.month)[1]
    tables = []
    for number in range(1, last + 1):
        table = read_partition(view_path(views_root, METER_VIEW, date(day.year, day.month, number)))
        if table is None:
            continue
        missing = [name for name in _COLUMNS if name not in table.column_names]
        for name in missing:  # a day published before validation existed
            kind = pa.float64() if name in ("consumption", "estimated_share") else pa.int64()
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
        tables.append(table.select(list(_COLUMNS)))
    if not tables:  # no day of the month is published: an empty month
        tables.append(
            pa.table(
                {
                    name: pa.array([], pa.string() if name in _KEYS else pa.float64())
                    for name in _COLUMNS
                }
            )
        )
    rows = pa.concat_tables(tables, promote_options="permissive")
    estimated = pc.multiply(
        pc.fill_null(rows["estimated_share"], 0.0), pc.fill_null(rows["consumption"], 0.0)
    )
    return rows.append_column("estimated_consumption", estimated)


def _share(estimated: pa.Array, consumption: pa.Array) -> pa.Array:
    return pc.if_else(
        pc.greater(pc.fill_null(consumption, 0.0), 0.0), pc.divide(estimated, consumption), 0.0
    )


def _sum(rows: pa.Table, keys: list[str], month: str) -> pa.Table:
    """``rows`` summed per ``keys``, with ``device_id_count``: the rows per group."""
    grouped = rows.group_by(keys, use_threads=False).aggregate(
        [(name, "sum") for name in SUMMED] + [("device_id", "count")]
    )
    sums = {name: grouped[f"{name}_sum"] for name in SUMMED}
    return pa.table(
        {
            "month": pa.array([month] * grouped.num_rows, pa.string()),
            **{key: grouped[key] for key in keys},
            "consumption": sums["consumption"],
            "estimated_share": _share(sums["estimated_consumption"], sums["consumption"]),
            **{name: sums[name] for name in COUNTED_COLUMNS[1:]},
            "device_id_count": grouped["device_id_count"],
        }
    ).sort_by([(key, "ascending") for key in keys])


def meter_monthly(views_root: str, day: date) -> pa.Table:
    """Per meter, its month to date: validated consumption, estimated share, intervals by
    quality, duplicates, and the days it was published."""
    rows = _days(views_root, day)
    table = _sum(rows, ["device_id", "meter_type", "district"], month_of(day))
    return table.rename_columns(
        [name if name != "device_id_count" else "days" for name in table.column_names]
    )


def district_monthly(views_root: str, day: date) -> pa.Table:
    """Per district and meter type, the month to date of its meters."""
    rows = _days(views_root, day)
    keys = ["district", "meter_type"]
    table = _sum(rows, keys, month_of(day)).drop_columns(["device_id_count"])
    meters = rows.group_by(keys, use_threads=False).aggregate([("device_id", "count_distinct")])
    joined = table.join(meters, keys)
    names = {"device_id_count_distinct": "meter_count"}
    return joined.rename_columns([names.get(n, n) for n in joined.column_names]).sort_by(
        [(key, "ascending") for key in keys]
    )
