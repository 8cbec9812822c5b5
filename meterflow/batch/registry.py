"""The fleet registry as the batch layer reads it: which meters should have reported on a day.

The simulator (or an operator) writes ``LAKE_PATH/registry/meters.parquet``. The daily job
adds its silent meters to the views; the checks refuse a day with registered meters and no
readings. Plain pyarrow: the checks use it without Spark.
"""

from __future__ import annotations

from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meterflow.batch.views import UNKNOWN_DISTRICT, exists
from meterflow.core import lake
from meterflow.core.logs import get_logger

log = get_logger("meterflow.batch.registry")

_REGISTRY_COLUMNS = {
    "device_id": pa.string(),
    "meter_type": pa.string(),
    "district": pa.string(),
    "installed_on": pa.date32(),
    "interval_seconds": pa.int64(),
}


def read_registry(lake_path: str) -> pa.Table:
    """The registry columns the views use; empty (every meter "unknown") if absent.

    Registries written before a column existed get it as nulls.
    """
    path = lake.registry_file(lake_path)
    if not exists(path):
        log.warning("registry=missing path=%s districts=%s", path, UNKNOWN_DISTRICT)
        return pa.table({n: pa.array([], t) for n, t in _REGISTRY_COLUMNS.items()})
    fs, local = lake.filesystem_for(path)
    table = pq.read_table(local, filesystem=fs)
    return pa.table(
        {
            name: table[name].cast(kind)
            if name in table.column_names
            else pa.nulls(len(table), kind)
            for name, kind in _REGISTRY_COLUMNS.items()
        }
    )


def installed_by(registry: pa.Table, day: date) -> pa.Table:
    """The meters of ``registry`` installed on or before ``day`` (no date: always there)."""
    return registry.filter(
        pc.or_kleene(
            registry["installed_on"].is_null(),
            pc.less_equal(registry["installed_on"], pa.scalar(day, pa.date32())),
        )
    )
