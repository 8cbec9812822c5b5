"""The daily batch job: one day of the lake rolled up per meter, per meter type and per district.

``spark-submit jobs/daily_batch_job.py --date YYYY-MM-DD`` (or ``meterflow batch``) runs
:func:`run`, which reads
``readings/`` filtered on the ``date`` partition (so Spark prunes the other days; only
committed files are ever there, docs/architecture.md), aggregates the day once per meter and
derives the rest from that result (one row per meter) in Arrow instead of rescanning. Views
go to ``<views>/<view>/date=D/`` as Parquet, replacing D's previous views and nothing
else; a JSON report per day (``<views>/_reports/date=D.json``) tells the loader and the
checks what was found. Spark never writes MongoDB (docs/architecture.md):
meterflow.serving.loader does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from meterflow.batch import validation
from meterflow.batch.late import late_days
from meterflow.batch.monthly import district_monthly, meter_monthly, month_of
from meterflow.batch.registry import installed_by, read_registry
from meterflow.batch.views import (
    COUNTED_COLUMNS,
    DISTRICT_MONTHLY_VIEW,
    DISTRICT_VIEW,
    HOURLY_VIEW,
    METER_MONTHLY_VIEW,
    METER_VIEW,
    STATUS_NO_DATA,
    STATUS_OK,
    TYPE_VIEW,
    UNKNOWN_DISTRICT,
    DayReport,
    exists,
    month_view_path,
    read_partition,
    read_report,
    remove_report,
    remove_views,
    view_path,
    write_report,
)
from meterflow.core import lake
from meterflow.core.contract import METER_SPECS, TYPE_ORDER
from meterflow.core.ledger import Ledger
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import UTC_NAME, as_date, day_seconds

log = get_logger("jobs.daily_batch")
#: Spark application name of the job's session (spark-submit and ``meterflow batch``).
APP_NAME = "meterflow-daily-batch"

#: Only these lake columns are read (column pruning).
_READ_COLUMNS = ("device_id", "meter_type", "consumption", "fault_code")
#: Runtime SQL settings the job applies to its session. Spark's first-level aggregation
#: map holds 2^16 keys by default; a city's meters overflow it into the slower map, and
#: 2^18 keys cost only a few MB of buckets a task (bench/daily_batch.py measures the job).
JOB_SQL_CONF = {"spark.sql.codegen.aggregate.fastHashMap.capacityBit": "18"}


# --- inputs ---------------------------------------------------------------------------------

_LAKE_DDL = lake.spark_ddl(lake.LAKE_SCHEMA)


def read_day(spark: SparkSession, lake_path: str, day: date) -> DataFrame:
    """The day's readings, only the columns the views need.

    The root is read with the lake's schema (no footer inference) and filtered on the
    partition column: Spark opens only ``date=D`` (a lake of meterflow 0.1 also has the
    file sink's ``_spark_metadata`` log, which Spark honours).
    """
    return (
        spark.read.schema(_LAKE_DDL)
        .parquet(lake.readings_path(lake_path))
        .where(F.col(lake.PARTITION_COLUMN) == F.lit(day))
        .select(*_READ_COLUMNS)
    )


# --- views --------------------------------------------------------------------------------------


_TYPE_NAMES = [str(meter_type) for meter_type in TYPE_ORDER]
_COUNTS = ("reading_count", "good_count", "faulty_count")


def meter_daily(readings: DataFrame) -> DataFrame:
    """One row per meter: consumption stats over good readings and the reading counts.

    The heavy part of the job (every reading of the day): one scan and one hash
    aggregation with fixed-width buffers; the average is total / good_count later. The
    key is the device id alone (one string to hash and compare, faster than with the
    type as a second key): the type travels as its index in
    ``TYPE_ORDER``, and a device whose readings disagree on it keeps one row under the
    type that comes first there, with ``mixed_types`` set, instead of two rows under one id.
    """
    type_index = F.when(F.col("meter_type") == _TYPE_NAMES[0], 0)
    for index, name in enumerate(_TYPE_NAMES[1:], start=1):
        type_index = type_index.when(F.col("meter_type") == name, index)
    good_value = F.when(F.col("fault_code").isNull(), F.col("consumption"))
    aggregated = readings.groupBy("device_id").agg(
        F.min(type_index).alias("first_type"),
        F.max(type_index).alias("last_type"),
        F.sum(good_value).alias("total"),
        F.min(good_value).alias("min"),
        F.max(good_value).alias("max"),
        F.count(F.lit(1)).alias("reading_count"),
        F.count(good_value).alias("good_count"),
        F.count("fault_code").alias("faulty_count"),
    )
    names = F.array(*(F.lit(name) for name in _TYPE_NAMES))
    return aggregated.select(
        "device_id",
        F.element_at(names, F.col("first_type") + 1).alias("meter_type"),
        "total",
        "min",
        "max",
        *_COUNTS,
        (F.col("first_type") != F.col("last_type")).alias("mixed_types"),
    )


_ROW_COLUMNS = (
    "device_id", "meter_type", "district", "interval_seconds", "total", "min", "max", *_COUNTS
)  # fmt: skip


def _average(total: pa.Array, good: pa.Array) -> pa.Array:
    """Mean of the good readings from their sum and count (null when there is none)."""
    return pc.if_else(
        pc.greater(good, 0),
        pc.divide(total, pc.cast(good, pa.float64())),
        pa.scalar(None, pa.float64()),
    )


def meter_view(
    aggregated: pa.Table,
    registry: pa.Table,
    day: date,
    default_interval: int,
    zone_name: str = UTC_NAME,
) -> pa.Table:
    """The per-meter view: :func:`meter_daily`'s rows with district and completeness, plus
    a row for every registered meter that sent nothing on ``day``.

    A silent meter is the failure users most need to see and is absent from the readings
    by definition, so it comes from the registry (meters installed by ``day``), with
    completeness 0. Meters the registry lacks keep their readings under district
    "unknown". ``completeness`` = readings received / (the local day's seconds / interval):
    a DST day in ``zone_name`` expects an hour's readings less or more. This runs in
    Arrow: it handles one row per meter, not per reading.
    """
    installed = installed_by(registry, day)
    silent = installed.filter(
        pc.invert(pc.is_in(installed["device_id"], value_set=aggregated["device_id"]))
    )
    nothing = pa.nulls(len(silent), pa.float64())
    zeros = pa.array([0] * len(silent), pa.int64())
    measured = aggregated.select(["device_id", "meter_type", "total", "min", "max", *_COUNTS]).join(
        registry.select(["device_id", "district", "interval_seconds"]), "device_id"
    )
    rows = pa.concat_tables(
        [
            measured.select(_ROW_COLUMNS),
            pa.table(
                {
                    "device_id": silent["device_id"],
                    "meter_type": silent["meter_type"],
                    "district": silent["district"],
                    "interval_seconds": silent["interval_seconds"],
                    "total": nothing,
                    "min": nothing,
                    "max": nothing,
                    **dict.fromkeys(_COUNTS, zeros),
                }
            ),
        ],
        promote_options="permissive",
    ).sort_by("device_id")
    interval = rows["interval_seconds"].fill_null(default_interval)
    expected = pc.max_element_wise(pc.divide(day_seconds(day, zone_name), interval), 1)
    units = {str(spec.meter_type): spec.unit for spec in METER_SPECS.values()}
    unit_keys = pa.array(list(units))
    return pa.table(
        {
            "device_id": rows["device_id"],
            "meter_type": rows["meter_type"],
            "district": rows["district"].fill_null(UNKNOWN_DISTRICT),
            "unit": pc.take(
                pa.array(list(units.values())), pc.index_in(rows["meter_type"], unit_keys)
            ),
            "avg": _average(rows["total"], rows["good_count"]),
            "min": rows["min"],
            "max": rows["max"],
            "total": rows["total"],
            **{name: rows[name] for name in _COUNTS},
            "expected_count": expected,
            "completeness": pc.divide(pc.cast(rows["reading_count"], pa.float64()), expected),
        }
    )


_ROLLUP_SUMS = (
    "total",
    "good_count",
    "reading_count",
    "faulty_count",
    "expected_count",
    *COUNTED_COLUMNS,
    "estimated_consumption",
)


def rollup(meters: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Sum the per-meter view up to ``keys``; avg weighs each good reading once.

    The per-meter view has one row per meter (a city's fleet, not its readings), so this
    runs in Arrow on the driver: two more Spark jobs would cost more than the work.
    """
    estimated = pc.multiply(meters["estimated_share"], pc.fill_null(meters["consumption"], 0.0))
    meters = meters.append_column("estimated_consumption", estimated)
    grouped = meters.group_by(list(keys), use_threads=False).aggregate(
        [(name, "sum") for name in _ROLLUP_SUMS]
        + [("device_id", "count"), ("completeness", "mean")]
    )
    column = {name: grouped[f"{name}_sum"] for name in _ROLLUP_SUMS}
    good = column["good_count"]
    average = _average(column["total"], good)
    return pa.table(
        {
            **{key: grouped[key] for key in keys},
            "avg": average,
            "total": column["total"],
            "meter_count": grouped["device_id_count"],
            "reading_count": column["reading_count"],
            "good_count": good,
            "faulty_count": column["faulty_count"],
            "expected_count": column["expected_count"],
            "completeness": grouped["completeness_mean"],
            **{name: column[name] for name in COUNTED_COLUMNS},
            "estimated_share": pc.if_else(
                pc.greater(column["consumption"], 0.0),
                pc.divide(column["estimated_consumption"], column["consumption"]),
                0.0,
            ),
        }
    ).sort_by([(key, "ascending") for key in keys])


def type_daily(meters: pa.Table) -> pa.Table:
    """One row per meter type, from :func:`meter_daily` (never rescans the lake)."""
    return rollup(meters, ["meter_type"])


def district_daily(meters: pa.Table) -> pa.Table:
    """One row per district and meter type, from :func:`meter_daily`."""
    return rollup(meters, ["district", "meter_type"])


# --- the job ---------------------------------------------------------------------------------


def _write_table(table: pa.Table, path: str) -> None:
    """Replace ``path`` (one day of one view) with ``table`` as one Parquet file."""
    fs, local = lake.filesystem_for(path)
    if fs.get_file_info(local).type != pafs.FileType.NotFound:
        fs.delete_dir(local)
    fs.create_dir(local, recursive=True)
    pq.write_table(table, f"{local}/part-00000.parquet", filesystem=fs)


def with_validation(meters: pa.Table, summary: pa.Table) -> pa.Table:
    """The per-meter view with its validated columns; ``estimated_share`` is the share of
    the validated consumption that was estimated (0 when there is none)."""
    joined = meters.join(summary, "device_id", join_type="left outer").sort_by("device_id")
    consumption = joined["consumption"]
    share = pc.if_else(
        pc.greater(pc.fill_null(consumption, 0.0), 0.0),
        pc.divide(pc.fill_null(joined["estimated_consumption"], 0.0), consumption),
        0.0,
    )
    return joined.drop_columns(["estimated_consumption"]).append_column("estimated_share", share)


def _write_month(views_root: str, day: date) -> None:
    """Recompute ``day``'s month to date from its published days."""
    month = month_of(day)
    for view, table in (
        (METER_MONTHLY_VIEW, meter_monthly(views_root, day)),
        (DISTRICT_MONTHLY_VIEW, district_monthly(views_root, day)),
    ):
        _write_table(table, month_view_path(views_root, view, month))


def _published(views_root: str, day: date) -> tuple[float, int] | None:
    """What D's last run published: its validated consumption and readings (None: never)."""
    report = read_report(views_root, day)
    if report is None:
        return None
    table = read_partition(view_path(views_root, METER_VIEW, day))
    consumption = 0.0
    if table is not None and "consumption" in table.column_names:
        consumption = float(pc.sum(table["consumption"]).as_py() or 0.0)
    return consumption, report.readings


def _changes(
    before: tuple[float, int] | None, consumption: float, readings: int
) -> dict[str, float]:
    """A re-run day's report says what changed since the run it replaces (nothing when the
    run changed nothing, so re-running a day gives the same documents)."""
    if before is None or (readings == before[1] and round(consumption - before[0], 6) == 0):
        return {}
    return {
        "consumption_before": round(before[0], 6),
        "consumption_after": round(consumption, 6),
        "readings_added": readings - before[1],
    }


def run_late(
    spark: SparkSession,
    lake_path: str,
    since: date,
    until: date,
    interval_seconds: int,
    zone_name: str = UTC_NAME,
    linear_gap_intervals: int = 4,
) -> list[DayReport]:
    """Run again every day in ``[since, until]`` that received readings after it was
    published (:func:`meterflow.batch.late.late_days`); their reports, oldest first."""
    return [
        run(spark, lake_path, day, interval_seconds, zone_name, linear_gap_intervals)
        for day in late_days(lake_path, since, until)
    ]


def run(
    spark: SparkSession,
    lake_path: str,
    day: date | str,
    interval_seconds: int,
    zone_name: str = UTC_NAME,
    linear_gap_intervals: int = 4,
    reran: Sequence[str] = (),
) -> DayReport:
    """Compute and write D's views and report; a day without readings is reported as such.

    ``interval_seconds`` is the reading interval of meters the registry gives none; D is a
    local date in ``zone_name``, as the lake's partitions are. Spark
    scans the day once and aggregates it per meter (:func:`meter_daily`); the result, one
    row per meter, comes back as Arrow, where the registry join, silent meters and the
    type and district roll-ups take milliseconds instead of Spark jobs.
    """
    day = as_date(day)
    started = time.perf_counter()  # the job, not the JVM's start
    for key, value in JOB_SQL_CONF.items():
        spark.conf.set(key, value)
    views_root = lake.views_path(lake_path)
    readings = lake.readings_path(lake_path)
    ledger_seq = Ledger.load(lake_path).seq  # before reading: a later commit is late
    before = _published(views_root, day)
    # Until the new report is written, nobody may publish D from half-replaced views.
    remove_report(views_root, day)

    aggregated = None
    partition = f"{readings}/{lake.PARTITION_COLUMN}={day}"
    if exists(partition):  # no directory, no committed file either: skip Spark
        aggregated = meter_daily(read_day(spark, lake_path, day)).toArrow()
    if aggregated is None or aggregated.num_rows == 0:
        remove_views(views_root, day)
        lake.delete_dir(validation.validated_path(lake_path, day))
        _write_month(views_root, day)
        report = DayReport(
            day=str(day),
            status=STATUS_NO_DATA,
            duration_seconds=round(time.perf_counter() - started, 3),
            ledger_seq=ledger_seq,
            changes=_changes(before, 0.0, 0),
            reran=list(reran),
        )
        write_report(views_root, report)
        log.warning(
            "batch=no_data day=%s lake=%s reason=no readings in the day's partition",
            day,
            readings,
        )
        return report

    mixed = aggregated.filter(aggregated["mixed_types"])
    if mixed.num_rows:
        log.warning(
            "batch=mixed_types day=%s meters=%d examples=%s reason=readings of one device "
            "disagree on its meter type; each is counted once, under the first in contract order",
            day,
            mixed.num_rows,
            ",".join(mixed["device_id"].to_pylist()[:5]),
        )
    registry = read_registry(lake_path)
    validated = validation.validated_path(lake_path, day)
    validation.validate(
        spark,
        lake_path,
        day,
        installed_by(registry, day).select(
            ["device_id", "interval_seconds", "register_digits", "register_reset_at"]
        ),
        interval_seconds,
        zone_name,
        linear_gap_intervals,
    ).write.mode("overwrite").parquet(validated)
    summary, hourly = validation.per_meter(spark, validated, zone_name)
    meters = with_validation(
        meter_view(aggregated, registry, day, interval_seconds, zone_name), summary
    )
    types = type_daily(meters)
    views = {
        METER_VIEW: meters,
        TYPE_VIEW: types,
        DISTRICT_VIEW: district_daily(meters),
        HOURLY_VIEW: hourly,
    }
    for view, table in views.items():
        _write_table(table, view_path(views_root, view, day))
    _write_month(views_root, day)
    totals = {
        name: int(pc.sum(types[name]).as_py() or 0)
        for name in ("reading_count", "faulty_count", "meter_count", "expected_count")
    }
    report = DayReport(
        day=str(day),
        status=STATUS_OK,
        readings=totals["reading_count"],
        good=totals["reading_count"] - totals["faulty_count"],
        faulty=totals["faulty_count"],
        meters=totals["meter_count"],
        expected_readings=totals["expected_count"],
        duration_seconds=round(time.perf_counter() - started, 3),
        views={view: table.num_rows for view, table in views.items()},
        silent_meters=pc.sum(pc.equal(meters["reading_count"], 0)).as_py() or 0,
        mixed_type_meters=mixed.num_rows,
        ledger_seq=ledger_seq,
        changes=_changes(
            before, float(pc.sum(meters["consumption"]).as_py() or 0.0), totals["reading_count"]
        ),
        reran=list(reran),
    )
    write_report(views_root, report)
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
