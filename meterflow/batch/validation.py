"""The daily job's validation step in Spark: :func:`meterflow.batch.vee.validate_day` run per
partition of meters, its intervals written to ``validated/date=D/``.

Everything a meter's validation needs travels in one frame keyed by ``device_id`` (its
readings of the day, its last register before the day, its profile, its registry row), so
one shuffle puts each meter's rows in one task, and ``mapInArrow`` validates that task's
meters at once with numpy. The driver collects one row per meter, never the readings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from meterflow.batch import edits, vee
from meterflow.batch.views import exists
from meterflow.core import lake
from meterflow.core.registry import INTERVAL
from meterflow.core.timestamps import day_bounds

#: Days read back for a meter's last register before the day.
REGISTER_LOOKBACK_DAYS = 7
#: Same weekdays read back for a meter's profile.
PROFILE_WEEKS = 4
#: A day's expected intervals (the registry's meters, each by its interval) validated by
#: one task at most. A task holds all its meters' rows in its Python worker at once (a
#: meter's intervals depend on each other), about half a kB each in bench/memory.py's
#: daily run, so the task count grows with the fleet and its reading rate, and a worker's
#: memory does not: about 130 MB.
INTERVALS_PER_TASK = 250_000

_READING, _START, _PROFILE, _METER, _EDIT = 0, 1, 2, 3, 4
_FRAME = pa.schema(
    [
        ("kind", pa.int32()),
        ("device_id", pa.string()),
        ("event_time", lake.TIMESTAMP),
        ("consumption", pa.float64()),
        ("register", pa.float64()),
        ("fault_code", pa.string()),
        ("ingest_time", lake.TIMESTAMP),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("hour", pa.int64()),
        ("value", pa.float64()),
        ("interval_seconds", pa.int64()),
        ("register_digits", pa.int64()),
        ("register_reset_at", lake.TIMESTAMP),
    ]
)
_LAKE_DDL = lake.spark_ddl(lake.LAKE_SCHEMA)


def validated_path(lake_path: str, day: date) -> str:
    return f"{lake.validated_path(lake_path)}/{lake.PARTITION_COLUMN}={day}"


def _readings(spark: SparkSession, lake_path: str, first: date, last: date) -> DataFrame:
    return (
        spark.read.schema(_LAKE_DDL)
        .parquet(lake.readings_path(lake_path))
        .where(F.col(lake.PARTITION_COLUMN).between(F.lit(first), F.lit(last)))
    )


def _shaped(frame: DataFrame, kind: int) -> DataFrame:
    """``frame`` with the columns of :data:`_FRAME` (null where it has none) and its kind."""
    present = set(frame.columns)
    columns = []
    for field in _FRAME:
        if field.name == "kind":
            column = F.lit(kind)
        elif field.name in present:
            column = F.col(field.name)
        else:
            column = F.lit(None)
        columns.append(column.cast(lake.spark_type(field.type)))
    return frame.select(*(c.alias(f.name) for c, f in zip(columns, _FRAME, strict=True)))


def validation_input(
    spark: SparkSession,
    lake_path: str,
    day: date,
    registry: pa.Table,
    zone_name: str,
    overrides: pa.Table,
) -> DataFrame:
    """The day's readings, each meter's last register of the week before, its profile (the
    same weekday's measured intervals of the last four weeks, per local hour), its
    registry row and the day's edits (``overrides``), in one frame."""
    week_before = _readings(
        spark, lake_path, day - timedelta(days=REGISTER_LOOKBACK_DAYS), day - timedelta(days=1)
    )
    # The latest register; of repeats at that time, the first by ingest order (as in vee).
    first_of_latest = F.struct(
        (F.lit(0) - F.unix_micros("event_time")).alias("event"),
        F.unix_micros("ingest_time").alias("ingest"),
        "source_partition",
        "source_offset",
    )
    starts = (
        week_before.where(F.col("register").isNotNull() & F.col("fault_code").isNull())
        .groupBy("device_id")
        .agg(
            F.max("event_time").alias("event_time"),
            F.min_by("register", first_of_latest).alias("register"),
        )
    )
    frames = [_shaped(_readings(spark, lake_path, day, day), _READING), _shaped(starts, _START)]
    weeks = [day - timedelta(days=7 * w) for w in range(1, PROFILE_WEEKS + 1)]
    earlier = [validated_path(lake_path, d) for d in weeks]
    earlier = [path for path in earlier if exists(path)]
    if earlier:
        local_hour = F.hour(F.from_utc_timestamp("interval_start", zone_name))
        profile = (
            spark.read.parquet(*earlier)
            .where(F.col("quality") == vee.MEASURED)
            .groupBy("device_id", local_hour.alias("hour"))
            .agg(F.avg("value").alias("value"))
        )
        frames.append(_shaped(profile, _PROFILE))
    if registry.num_rows:
        frames.append(_shaped(spark.createDataFrame(registry), _METER))
    if overrides.num_rows:
        as_rows = overrides.rename_columns(["device_id", "event_time", "value"])
        frames.append(_shaped(spark.createDataFrame(as_rows), _EDIT))
    frame = frames[0]
    for other in frames[1:]:
        frame = frame.unionByName(other)
    return frame


def partition_validator(
    day: vee.Day, default_interval: int, max_linear: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function ``mapInArrow`` runs on a task's rows (every row of its meters)."""

    def validate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        received = list(batches)
        if not received:
            return
        rows = pa.Table.from_batches(received)
        kind = rows["kind"]
        readings, starts, profile, registered, edited = (
            rows.filter(pc.equal(kind, k)) for k in (_READING, _START, _PROFILE, _METER, _EDIT)
        )
        overrides = edited.select(["device_id", "event_time", "value"]).rename_columns(
            ["device_id", "interval_start", "value"]
        )
        # Meters that sent readings without a registry row: the default interval.
        unregistered = pc.unique(
            readings["device_id"].filter(
                pc.invert(pc.is_in(readings["device_id"], value_set=registered["device_id"]))
            )
        )
        extra = pa.table(
            {
                "device_id": unregistered,
                "interval_seconds": pa.nulls(len(unregistered), pa.int64()),
                "register_digits": pa.nulls(len(unregistered), pa.int64()),
                "register_reset_at": pa.nulls(len(unregistered), lake.TIMESTAMP),
            }
        )
        meters = pa.concat_tables([registered.select(extra.column_names), extra])
        meters = meters.set_column(
            1, "interval_seconds", pc.fill_null(meters["interval_seconds"], default_interval)
        )
        yield from vee.validate_day(
            readings, meters, starts, profile, day, max_linear, edits=overrides
        ).to_batches()

    return validate


def expected_intervals(registry: pa.Table, default_interval: int, day: date, zone: str) -> int:
    """How many intervals the registry's meters have on ``day``, each by its own interval."""
    if not registry.num_rows:
        return 0
    start, end = day_bounds(day, zone)
    seconds = (end - start).total_seconds()
    if INTERVAL not in registry.column_names:
        return int(registry.num_rows * seconds // default_interval)
    intervals = pc.fill_null(registry.column(INTERVAL), default_interval).to_numpy()
    return int((seconds // intervals).sum())


def validate(
    spark: SparkSession,
    lake_path: str,
    day: date,
    registry: pa.Table,
    default_interval: int,
    zone_name: str,
    max_linear: int,
) -> DataFrame:
    """The day's validated intervals (:data:`~meterflow.batch.vee.VALIDATED_SCHEMA`) of
    every registered meter (installed by ``day``, ``registry``) and every meter that sent
    readings."""
    start, end = day_bounds(day, zone_name)
    bounds = vee.Day(int(start.timestamp() * 1e6), int(end.timestamp() * 1e6), zone_name)
    overrides = edits.latest(edits.read(lake_path), bounds.start_us, bounds.end_us)
    frame = validation_input(spark, lake_path, day, registry, zone_name, overrides)
    tasks = max(
        int(spark.conf.get("spark.sql.shuffle.partitions") or 1),
        -(-expected_intervals(registry, default_interval, day, zone_name) // INTERVALS_PER_TASK),
    )
    return frame.repartition(tasks, "device_id").mapInArrow(
        partition_validator(bounds, default_interval, max_linear),
        lake.spark_ddl(vee.VALIDATED_SCHEMA),
    )


def per_meter(spark: SparkSession, path: str, zone_name: str) -> tuple[pa.Table, pa.Table]:
    """One pass over the validated intervals at ``path``, per meter: its day's summary
    (validated consumption, the estimated part of it, intervals by quality, duplicates) and
    its hourly profile: ``hour_starts`` (UTC instants, so the hour a DST day repeats is told
    apart) and ``hours``, in order; an hour without a counted interval is null."""
    local = F.from_utc_timestamp("interval_start", zone_name)
    into_hour = F.minute(local) * 60 + F.second(local)  # offsets are whole minutes
    hour_start = F.timestamp_seconds(F.unix_timestamp("interval_start") - into_hour)
    quality = F.col("quality")
    estimated = quality == vee.ESTIMATED
    counted = quality.isin(vee.MEASURED, vee.ESTIMATED, vee.EDITED)
    hourly = (
        spark.read.parquet(path)
        .groupBy("device_id", hour_start.alias("hour_start"))
        .agg(
            F.sum(F.when(counted, F.col("value"))).alias("value"),
            F.sum(F.when(estimated, F.col("value"))).alias("estimated_value"),
            F.count_if(quality == vee.MEASURED).alias("measured"),
            F.count_if(estimated).alias("estimated"),
            F.count_if(quality.isin(vee.MISSING, vee.REJECTED)).alias("missing"),
            F.sum("duplicates").alias("duplicates"),
        )
    )
    meters = (
        hourly.groupBy("device_id")
        .agg(
            F.sum("value").alias("consumption"),
            F.sum("estimated_value").alias("estimated_consumption"),
            F.sum("measured").alias("measured_intervals"),
            F.sum("estimated").alias("estimated_intervals"),
            F.sum("missing").alias("missing_intervals"),
            F.sum("duplicates").alias("duplicate_readings"),
            F.sort_array(F.collect_list(F.struct("hour_start", "value"))).alias("profile"),
        )
        .select(
            "*",
            F.col("profile.hour_start").alias("hour_starts"),
            F.col("profile.value").alias("hours"),
        )
        .drop("profile")
        .toArrow()
        .sort_by("device_id")
    )
    profiles = ["device_id", "hour_starts", "hours"]
    summary = [name for name in meters.column_names if name not in profiles[1:]]
    return meters.select(summary), meters.select(profiles)
