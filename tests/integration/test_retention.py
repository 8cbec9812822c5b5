"""Lake retention: old date partitions go, recent ones and bookkeeping stay, Spark still
reads the lake, and the ledger still reconciles with what retention took."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from helpers import reconciled, send
from pyspark.sql import SparkSession

from meterflow.batch.retention import drop_expired_partitions
from meterflow.core.config import Settings
from meterflow.core.lake import LAKE_SCHEMA, dated_partitions, readings_path, spark_ddl
from meterflow.stream.supervisor import run


def reading(day: str, hour: int) -> bytes:
    stamp = f"{day}T{hour:02d}:00:00Z"
    return json.dumps({"device_id": "gm1", "timestamp": stamp, "usage_m3": 0.4}).encode()


def test_retention_drops_old_partitions_and_spark_still_reads_the_lake(
    spark: SparkSession, make_settings
) -> None:
    settings: Settings = make_settings(partitions=1, METERFLOW_LAKE_RETENTION_DAYS="30")
    days = ("2024-04-01", "2024-05-20", "2024-05-31")
    send(settings, [reading(day, hour) for day in days for hour in (1, 2, 3)], key=b"gm1")
    run(settings, available_now=True, spark=spark)
    view = Path(settings.views_path) / "meter_daily"
    for day in ("2024-04-01", "2024-05-31"):
        (view / f"date={day}").mkdir(parents=True)
        (view / f"date={day}" / "part-0.parquet").write_bytes(b"")
    (Path(settings.views_path) / "_reports").mkdir()

    keep_days = settings.lake_retention_days
    dropped = drop_expired_partitions(settings.lake_path, keep_days, "2024-06-01")

    readings = readings_path(settings.lake_path)
    assert dropped == {readings: ["2024-04-01"], str(view): ["2024-04-01"]}
    assert sorted(dated_partitions(readings)) == [date(2024, 5, 20), date(2024, 5, 31)]
    assert sorted(dated_partitions(str(view))) == [date(2024, 5, 31)]
    assert (Path(settings.views_path) / "_reports").is_dir()
    lake = spark.read.schema(spark_ddl(LAKE_SCHEMA)).parquet(readings)
    assert sorted(str(r.date) for r in lake.select("date").distinct().collect()) == [
        "2024-05-20",
        "2024-05-31",
    ]
    assert lake.count() == 6
    # The ledger committed 9 offsets; the lake's files hold 6 and retention took 3.
    report = reconciled(settings)
    assert report.lake_rows == 6


def test_zero_retention_keeps_everything(tmp_path: Path, make_settings) -> None:
    settings: Settings = make_settings(METERFLOW_LAKE_RETENTION_DAYS="0")
    old = Path(readings_path(settings.lake_path)) / "date=2001-01-01"
    old.mkdir(parents=True)
    keep_days = settings.lake_retention_days
    assert drop_expired_partitions(settings.lake_path, keep_days, "2024-06-01") == {}
    assert old.is_dir()
