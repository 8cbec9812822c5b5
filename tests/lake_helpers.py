"""Small lakes for the batch job and the loader: a few meters over a day or two, written
in the lake schema (``readings/date=D/``) with pyarrow, and the simulated fleet's registry.

Shared by tests/integration/test_daily_batch.py, tests/integration/test_loader_spark.py and
tests/unit/test_loader.py.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.contract import METER_SPECS, FaultCode, MeterType
from simulator.fleet import build_fleet, write_registry

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from meterflow.batch.views import DayReport

D1 = date(2024, 6, 3)
D2 = date(2024, 6, 4)
REGISTRY_INTERVAL = 900  # the simulated fleet's interval: 96 readings a day
FILE_SCHEMA = pa.schema([lake.CLASSIFIED_SCHEMA.field(n) for n in lake.LAKE_COLUMNS if n != "date"])
FAULT_CHOICES = [None] * 6 + [FaultCode.SENTINEL, FaultCode.NEGATIVE, FaultCode.MISSING_METRIC]


def fleet_meters(settings: Settings, count: int = 6) -> list[tuple[str, str]]:
    """A simulated fleet's registry (interval 900 s); returns (device_id, type) pairs."""
    fleet = build_fleet(count, seed=11)
    write_registry(fleet, settings.registry_path, REGISTRY_INTERVAL)
    return [(m.device_id, str(m.meter_type)) for m in fleet.meters]


def make_rows(meters: list[tuple[str, str]], day: date, seed: int) -> list[dict]:
    """Readings of ``day`` in the lake's columns: a few per meter, some faulty.

    The first meter's readings are all faulty (its average is undefined), the rest mix
    good readings with SENTINEL (-1), NEGATIVE and MISSING_METRIC (no value) ones.
    """
    rng = np.random.default_rng(seed)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows = []
    for index, (device_id, meter_type) in enumerate(meters):
        for k in range(int(rng.integers(4, 12))):
            fault = FaultCode.SENTINEL if index == 0 else rng.choice(FAULT_CHOICES)
            value = {
                None: round(float(rng.uniform(0.1, 5.0)), 3),
                FaultCode.SENTINEL: -1.0,
                FaultCode.NEGATIVE: -2.5,
                FaultCode.MISSING_METRIC: None,
            }[fault]
            at = start + timedelta(minutes=15 * k)
            rows.append(
                {
                    "device_id": device_id,
                    "meter_type": meter_type,
                    "event_time": at,
                    "consumption": value,
                    "unit": METER_SPECS[MeterType(meter_type)].unit,
                    "flow_rate": None,
                    "fault_code": None if fault is None else str(fault),
                    "reason": None if fault is None else f"{fault} in the test",
                    "source_topic": "iot-meter",
                    "source_partition": 0,
                    "source_offset": len(rows),
                    "ingest_time": at + timedelta(seconds=3),
                }
            )
    return rows


def write_lake_day(settings: Settings, day: date, rows: list[dict]) -> None:
    """Replace ``readings/date=D/`` with ``rows`` (one Parquet file, as the sink would)."""
    directory = Path(lake.readings_path(settings.lake_path)) / f"date={day}"
    for old in directory.glob("*.parquet"):
        old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), directory / "part-0.parquet")


def run_batch(spark: SparkSession, settings: Settings, day: date) -> DayReport:
    """The daily job on ``settings``' lake for ``day``, as ``meterflow batch`` runs it."""
    from meterflow.batch import daily

    return daily.run(
        spark,
        settings.lake_path,
        day,
        settings.reading_interval_seconds,
        settings.timezone,
        settings.linear_gap_intervals,
    )
