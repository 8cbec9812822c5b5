"""Daily batch job: one day of the lake rolled up per meter, per meter type and per district.

``spark-submit jobs/daily_batch_job.py --date YYYY-MM-DD`` (or ``meterflow batch``) reads
``readings/`` filtered on the ``date`` partition (so Spark honours the streaming sink's
``_spark_metadata`` log and prunes the other days), aggregates the day once per meter and
derives the type and district views from that small result instead of rescanning. Views
go to ``<views>/<view>/date=D/`` as Parquet, replacing D's previous views and nothing
else; a JSON report per day (``<views>/_reports/date=D.json``) tells the loader and the
checks what was found. Spark never writes MongoDB (see DESIGN.md): meterflow.loader does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from meterflow import lake
from meterflow.config import ConfigError, Settings
from meterflow.contract import METER_SPECS
from meterflow.logs import get_logger, setup_logging
from meterflow.views import (
    DISTRICT_VIEW,
    METER_VIEW,
    SECONDS_PER_DAY,
    STATUS_NO_DATA,
    STATUS_OK,
    TYPE_VIEW,
    UNKNOWN_DISTRICT,
    VIEWS,
    DayReport,
    exists,
    remove_report,
    remove_views,
    view_path,
    write_report,
)

log = get_logger("jobs.daily_batch")

#: Only these lake columns are read (column pruning).
_READ_COLUMNS = ("device_id", "meter_type", "consumption", "fault_code")
#: Runtime SQL settings the job applies to its session. Spark's first-level aggregation
#: map holds 2^16 keys by default; a city's meters overflow it into the slower map
#: (measured: ~15% more CPU for 100,000 meters). 2^18 keys cost ~2 MB of buckets a task.
JOB_SQL_CONF = {"spark.sql.codegen.aggregate.fastHashMap.capacityBit": "18"}


# --- inputs ---------------------------------------------------------------------------------

_LAKE_DDL = lake.spark_ddl(lake.LAKE_SCHEMA)
_REGISTRY_SCHEMA = StructType(
    [
        StructField("device_id", StringType()),
        StructField("district", StringType()),
        StructField("interval_seconds", IntegerType()),
    ]
)


def read_day(spark: SparkSession, lake_path: str, day: date) -> DataFrame:
    """The day's readings, only the columns the views need.

    The root is read with the lake's schema (no footer inference) and filtered on the
    partition column: Spark then lists the streaming sink's committed files from its
    ``_spark_metadata`` log (if any) and opens only ``date=D``.
    """
    return (
        spark.read.schema(_LAKE_DDL)
        .parquet(lake.readings_path(lake_path))
        .where(F.col(lake.PARTITION_COLUMN) == F.lit(day))
        .select(*_READ_COLUMNS)
    )


def read_registry(spark: SparkSession, lake_path: str) -> DataFrame:
    """device_id, district, interval_seconds of the fleet; empty (all "unknown") if absent."""
    path = lake.registry_file(lake_path)
    if not exists(path):
        log.warning("registry=missing path=%s districts=%s", path, UNKNOWN_DISTRICT)
        return spark.createDataFrame([], _REGISTRY_SCHEMA)
    registry = spark.read.parquet(path)
    if "interval_seconds" not in registry.columns:  # registries written before it existed
        registry = registry.withColumn("interval_seconds", F.lit(None).cast("int"))
    return registry.select(
        "device_id", "district", F.col("interval_seconds").cast("int").alias("interval_seconds")
    )


# --- views: DataFrame -> DataFrame ----------------------------------------------------------


def _unit_of(meter_type: Column) -> Column:
    """The contract's unit of a meter type (one home for units: METER_SPECS)."""
    pairs = [F.lit(x) for spec in METER_SPECS.values() for x in (str(spec.meter_type), spec.unit)]
    return F.create_map(*pairs)[meter_type]


def _average() -> Column:
    """Mean of the good readings from their sum and count (null when there is none)."""
    return F.when(F.col("good_count") > 0, F.col("total") / F.col("good_count"))


def meter_daily(readings: DataFrame, registry: DataFrame, default_interval: int) -> DataFrame:
    """One row per meter: consumption stats over good readings, counts, completeness.

    One scan and one hash aggregation with six fixed-width buffers (the average is
    total / good_count afterwards); the registry (one row per meter) is broadcast.
    ``completeness`` = readings received / (86400 / interval).
    """
    good_value = F.when(F.col("fault_code").isNull(), F.col("consumption"))
    per_meter = readings.groupBy("device_id", "meter_type").agg(
        F.sum(good_value).alias("total"),
        F.min(good_value).alias("min"),
        F.max(good_value).alias("max"),
        F.count(F.lit(1)).alias("reading_count"),
        F.count(good_value).alias("good_count"),
        F.count("fault_code").alias("faulty_count"),
    )
    interval = F.coalesce(F.col("interval_seconds"), F.lit(default_interval))
    expected = F.greatest(F.lit(1), F.floor(F.lit(SECONDS_PER_DAY) / interval)).cast("long")
    return per_meter.join(F.broadcast(registry), "device_id", "left").select(
        "device_id",
        "meter_type",
        F.coalesce(F.col("district"), F.lit(UNKNOWN_DISTRICT)).alias("district"),
        _unit_of(F.col("meter_type")).alias("unit"),
        _average().alias("avg"),
        "min",
        "max",
        "total",
        "reading_count",
        "good_count",
        "faulty_count",
        expected.alias("expected_count"),
        (F.col("reading_count") / expected).alias("completeness"),
    )


def _rollup(meters: DataFrame, *keys: str) -> DataFrame:
    """Sum a per-meter frame up to ``keys``; avg weighs each good reading once."""
    totals = meters.groupBy(*keys).agg(
        F.sum("total").alias("total"),
        F.sum("good_count").alias("good_count"),
        F.count(F.lit(1)).alias("meter_count"),
        F.sum("reading_count").alias("reading_count"),
        F.sum("faulty_count").alias("faulty_count"),
        F.sum("expected_count").alias("expected_count"),
        F.avg("completeness").alias("completeness"),
    )
    return totals.select(
        *keys,
        _average().alias("avg"),
        "total",
        "meter_count",
        "reading_count",
        "good_count",
        "faulty_count",
        "expected_count",
        "completeness",
    )


def type_daily(meters: DataFrame) -> DataFrame:
    """One row per meter type, from :func:`meter_daily` (small: never rescans the lake)."""
    return _rollup(meters, "meter_type")


def district_daily(meters: DataFrame) -> DataFrame:
    """One row per district and meter type, from :func:`meter_daily`."""
    return _rollup(meters, "district", "meter_type")


# --- the job ---------------------------------------------------------------------------------


def _write(frame: DataFrame, path: str) -> None:
    """Replace ``path`` (one day of one view) with ``frame``: one file, nothing appended."""
    frame.coalesce(1).write.mode("overwrite").parquet(path)


SILENT_FILE = "part-silent-meters.parquet"


def add_silent_meters(view_dir: str, registry_file: str, day: date, default_expected: int) -> int:
    """Add a row for each registered meter that sent nothing on ``day`` (completeness 0).

    A silent meter is the failure users most need to see, and it is absent from the
    readings by definition, so it comes from the registry (meters installed by ``day``).
    Done with pyarrow on the small written view and the registry: no second Spark scan.
    """
    if not exists(registry_file):
        return 0
    fs, registry_local = lake.filesystem_for(registry_file)
    fs, view_local = lake.filesystem_for(view_dir)
    view = pads.dataset(view_local, filesystem=fs, format="parquet")
    registry = pq.read_table(registry_local, filesystem=fs)
    silent = registry.filter(
        pc.invert(pc.is_in(registry["device_id"], value_set=view.to_table(["device_id"])[0]))
    )
    if "installed_on" in silent.column_names:
        installed = silent["installed_on"]
        silent = silent.filter(pc.or_kleene(installed.is_null(), pc.less_equal(installed, day)))
    if silent.num_rows == 0:
        return 0
    if "interval_seconds" in silent.column_names:
        per_day = pc.divide(SECONDS_PER_DAY, silent["interval_seconds"].cast(pa.int64()))
        expected = pc.max_element_wise(per_day, 1).fill_null(default_expected)
    else:
        expected = pa.array([default_expected] * silent.num_rows, pa.int64())
    units = {str(spec.meter_type): spec.unit for spec in METER_SPECS.values()}
    count = silent.num_rows
    columns = {
        "device_id": silent["device_id"],
        "meter_type": silent["meter_type"],
        "district": silent["district"].fill_null(UNKNOWN_DISTRICT),
        "unit": pa.array([units.get(t) for t in silent["meter_type"].to_pylist()]),
        "reading_count": pa.array([0] * count),
        "good_count": pa.array([0] * count),
        "faulty_count": pa.array([0] * count),
        "expected_count": expected,
        "completeness": pa.array([0.0] * count),
    }
    schema = view.schema
    table = pa.table(
        {
            f.name: columns[f.name].cast(f.type)
            if f.name in columns
            else pa.nulls(count, f.type)  # avg, min, max, total: nothing was measured
            for f in schema
        },
        schema=schema,
    )
    pq.write_table(table, f"{view_local}/{SILENT_FILE}", filesystem=fs)
    log.info("batch=silent_meters day=%s count=%d", day, count)
    return count


def _row_count(path: str) -> int:
    """Rows of a written view, from its Parquet footers (no Spark job)."""
    fs, local = lake.filesystem_for(path)
    return pads.dataset(local, filesystem=fs, format="parquet").count_rows()


def _summary(types_path: str) -> dict[str, int]:
    """Day totals from the (few-row) type view: what the report states."""
    fs, local = lake.filesystem_for(types_path)
    table = pads.dataset(local, filesystem=fs, format="parquet").to_table()
    return {
        name: int(pc.sum(table.column(name)).as_py() or 0)
        for name in ("reading_count", "faulty_count", "meter_count", "expected_count")
    }


def run(settings: Settings, day: date | str, spark: SparkSession | None = None) -> DayReport:
    """Compute and write D's views and report; a day without readings is reported as such.

    The lake is scanned once: the per-meter view is aggregated and written in one Spark
    job, then the type and district views are rolled up from that written (small) view.
    """
    from meterflow.spark.session import get_spark

    day = date.fromisoformat(day) if isinstance(day, str) else day
    spark = spark or get_spark("meterflow-daily-batch", settings.spark_master)
    started = time.perf_counter()  # the job, not the JVM's start
    for key, value in JOB_SQL_CONF.items():
        spark.conf.set(key, value)
    default_expected = max(1, SECONDS_PER_DAY // settings.reading_interval_seconds)
    paths = {view: view_path(settings.views_path, view, day) for view in VIEWS}
    # Until the new report is written, nobody may publish D from half-replaced views.
    remove_report(settings, day)

    meter_rows = 0
    partition = f"{lake.readings_path(settings.lake_path)}/{lake.PARTITION_COLUMN}={day}"
    if exists(partition):  # no directory, no committed file either: skip Spark
        meters = meter_daily(
            read_day(spark, settings.lake_path, day),
            read_registry(spark, settings.lake_path),
            settings.reading_interval_seconds,
        )
        _write(meters, paths[METER_VIEW])
        meter_rows = _row_count(paths[METER_VIEW])
    if meter_rows == 0:
        remove_views(settings, day)
        report = DayReport(
            day=str(day),
            status=STATUS_NO_DATA,
            expected_per_meter=default_expected,
            duration_seconds=round(time.perf_counter() - started, 3),
        )
        write_report(settings, report)
        log.warning(
            "batch=no_data day=%s lake=%s reason=no readings in the day's partition",
            day,
            lake.readings_path(settings.lake_path),
        )
        return report

    silent_meters = add_silent_meters(
        paths[METER_VIEW], lake.registry_file(settings.lake_path), day, default_expected
    )
    written = spark.read.schema(meters.schema).parquet(paths[METER_VIEW])
    # Two tiny jobs whose cost is Spark's per-job overhead: run them side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [
            pool.submit(_write, type_daily(written), paths[TYPE_VIEW]),
            pool.submit(_write, district_daily(written), paths[DISTRICT_VIEW]),
        ]
        for future in pending:
            future.result()
    totals = _summary(paths[TYPE_VIEW])
    report = DayReport(
        day=str(day),
        status=STATUS_OK,
        readings=totals["reading_count"],
        good=totals["reading_count"] - totals["faulty_count"],
        faulty=totals["faulty_count"],
        meters=totals["meter_count"],
        expected_per_meter=default_expected,
        expected_readings=totals["expected_count"],
        duration_seconds=round(time.perf_counter() - started, 3),
        views={view: _row_count(path) for view, path in paths.items()},
        silent_meters=silent_meters,
    )
    write_report(settings, report)
    log.info(
        "batch=ok day=%s readings=%d good=%d faulty=%d meters=%d seconds=%.2f",
        day,
        report.readings,
        report.good,
        report.faulty,
        report.meters,
        report.duration_seconds,
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Daily batch views of one day of the lake")
    parser.add_argument("--date", required=True, type=date.fromisoformat, help="YYYY-MM-DD")
    parser.add_argument("--lake", default=None, help="lake root (default: LAKE_PATH)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"daily_batch_job: {exc}", file=sys.stderr)
        return 2
    if args.lake:
        settings = replace(settings, lake_path=args.lake)
    report = run(settings, args.date)
    print(report.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
