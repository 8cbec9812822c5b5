"""The fleet registry as the batch layer reads it: which meters should have reported on a day.

The simulator (or an operator) writes ``LAKE_PATH/registry/meters.parquet``. The daily job
adds its silent meters to the views; the checks refuse a day with registered meters and no
readings. Plain pyarrow: the checks use it without Spark.
"""

from __future__ import annotations

from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

from meterflow.batch.views import UNKNOWN_DISTRICT, exists
from meterflow.core import lake, registry
from meterflow.core.logs import get_logger

log = get_logger("meterflow.batch.registry")

#: The registry columns the views and the validation use (types from
#: :mod:`meterflow.core.registry`).
_REGISTRY_COLUMNS = (
    "device_id",
    "meter_type",
    "district",
    "installed_on",
    "interval_seconds",
    "register_digits",
    "register_reset_at",
)


def read_registry(lake_path: str) -> pa.Table:
    """The registry columns the views and the validation use; empty (every meter
    "unknown") if absent.

    Registries written before a column existed get it as nulls.
    """
    path = lake.registry_file(lake_path)
    if exists(path):
        table = registry.read(path, _REGISTRY_COLUMNS)
    else:
        log.warning("registry=missing path=%s districts=%s", path, UNKNOWN_DISTRICT)
        table = registry.schema_of(_REGISTRY_COLUMNS).empty_table()
    # The views' expected readings (86400 / interval) are computed in int64.
    for name in ("interval_seconds", "register_digits"):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, table[index].cast(pa.int64()))
    return table


def installed_by(registry: pa.Table, day: date) -> pa.Table:
    """The meters of ``registry`` installed on or before ``day`` (no date: always there)."""
    return registry.filter(
        pc.or_kleene(
            registry["installed_on"].is_null(),
            pc.less_equal(registry["installed_on"], pa.scalar(day, pa.date32())),
        )
    )
