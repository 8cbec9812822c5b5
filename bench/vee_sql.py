"""The daily validation (VEE) of one day in DuckDB SQL, for bench/daily_batch.py.

The same rules as :func:`meterflow.batch.vee.validate_day` (docs/architecture.md,
"Validated consumption"), over the same Parquet the Spark job reads: the day's and the
week before's lake partitions, the registry, the validated days of the same weekday of
the last four weeks (the profile) and the edits trail. It is written as plain CTEs so a
reader can check it rule by rule against vee.py; the benchmark asserts both give the same
table, so neither engine is timed doing less than the other.
"""

from __future__ import annotations

import os
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa

from meterflow.batch import vee
from meterflow.batch.edits import edits_path
from meterflow.batch.validation import PROFILE_WEEKS, REGISTER_LOOKBACK_DAYS, validated_path
from meterflow.core import lake
from meterflow.core.timestamps import day_bounds

# Integer floor division (DuckDB's // truncates towards zero): a register start before the
# day has a negative interval index.
MACROS = """
CREATE OR REPLACE MACRO floor_div(a, b) AS (a // b) - CASE WHEN a % b < 0 THEN 1 ELSE 0 END;
"""

VEE_SQL = """
WITH
-- The meters: the registry's, installed by the day, and any other that sent readings
-- (with the default interval, no digits, no exchange), each with its last good register of
-- the week before. A meter's intervals are numbered meter after meter (its cells: base ..
-- base + intervals - 1), so that all after the readings' first join is on integer keys.
registered AS (
    SELECT device_id,
           coalesce(interval_seconds::BIGINT, {default_interval}) * 1000000 AS step_us,
           register_digits::DOUBLE AS digits,
           epoch_us(register_reset_at) AS reset_at_us
    FROM read_parquet('{registry}')
    WHERE installed_on IS NULL OR installed_on <= DATE '{day}'
),
raw AS (
    SELECT device_id, epoch_us(event_time) AS event_us, consumption, register, fault_code,
           epoch_us(ingest_time) AS ingest_us, source_partition, source_offset
    FROM read_parquet('{day_files}')
),
-- The latest register; of repeats at that time, the first by ingest order.
starts AS (
    SELECT device_id, max(epoch_us(event_time)) AS start_us,
           arg_min(register, (-epoch_us(event_time), epoch_us(ingest_time),
                              source_partition, source_offset)) AS start_register
    FROM read_parquet('{readings_root}/*/*.parquet', hive_partitioning = true,
                      hive_types = {{'date': DATE}}, union_by_name = true)
    WHERE date BETWEEN DATE '{first_lookback}' AND DATE '{last_lookback}'
      AND register IS NOT NULL AND fault_code IS NULL
    GROUP BY device_id
),
meters AS MATERIALIZED (
    SELECT *, (sum(intervals) OVER (ORDER BY device_id) - intervals)::BIGINT AS base
    FROM (
        SELECT m.*, ({end_us} - {start_us}) // m.step_us AS intervals,
               s.start_us, s.start_register
        FROM (
            SELECT * FROM registered
            UNION ALL
            SELECT DISTINCT device_id, {default_interval} * 1000000, NULL::DOUBLE, NULL::BIGINT
            FROM raw ANTI JOIN registered USING (device_id)
        ) m
        LEFT JOIN starts s USING (device_id)
    )
),

-- 1. Intervals: a reading ends the interval it measures (its time rounded up to the
-- meter's grid). Readings outside the day's intervals count nowhere: dropped first.
located AS (
    SELECT * FROM (
        SELECT r.* EXCLUDE (device_id), m.intervals, m.base,
               floor_div(r.event_us - {start_us} + m.step_us - 1, m.step_us) - 1 AS k,
               m.base + k AS cell
        FROM raw r JOIN meters m USING (device_id)
    )
    WHERE k >= 0 AND k < intervals
),
-- 2. Duplicates: one reading per meter and event time (per cell and event time), the first
-- by ingest order (ingest time, a missing one last, then Kafka partition and offset); each
-- interval counts the others. Most intervals hold one reading: they skip the ranking.
per_cell AS (
    SELECT cell, any_value(base) AS base, count(*) AS n,
           any_value(event_us) AS event_us, any_value(consumption) AS consumption,
           any_value(register) AS register, any_value(fault_code) AS fault_code
    FROM located
    GROUP BY cell
),
ranked AS (
    SELECT *, count(*) OVER same_reading - 1 AS repeats
    FROM located SEMI JOIN (SELECT cell FROM per_cell WHERE n > 1) USING (cell)
    WINDOW same_reading AS (PARTITION BY cell, event_us)
    QUALIFY row_number() OVER (
        PARTITION BY cell, event_us
        ORDER BY coalesce(ingest_us, 9223372036854775807), coalesce(source_partition, 0),
                 coalesce(source_offset, 0)) = 1
),
-- A faulty reading is rejected; the others give usage and register (NaN counts as none).
good AS (
    SELECT cell, base, alone, repeats, event_us, fault_code AS fault,
           CASE WHEN fault_code IS NULL AND NOT isnan(consumption) THEN consumption END AS usage,
           CASE WHEN fault_code IS NULL AND NOT isnan(register) THEN register END AS register
    FROM (
        SELECT cell, base, true AS alone, 0 AS repeats, event_us, consumption, register,
               fault_code
        FROM per_cell WHERE n = 1
        UNION ALL
        SELECT cell, base, false, repeats, event_us, consumption, register, fault_code
        FROM ranked
    )
),
-- Per interval: the repeats dropped, the fault of its first rejected reading, its usage
-- summed and its latest register (the interval's register "point"); an interval of one
-- reading is that reading.
readings AS MATERIALIZED (
    SELECT cell, base, repeats AS duplicates, fault, usage, register AS point,
           CASE WHEN register IS NOT NULL THEN event_us END AS point_us
    FROM good WHERE alone
    UNION ALL
    SELECT cell, any_value(base), sum(repeats),
           arg_min(fault, event_us) FILTER (WHERE fault IS NOT NULL),
           sum(usage),
           arg_max(register, event_us) FILTER (WHERE register IS NOT NULL),
           max(event_us) FILTER (WHERE register IS NOT NULL)
    FROM good WHERE NOT alone
    GROUP BY cell
),

-- 3. Registers: each point differenced from the meter's previous point, the meter's first
-- from its start register (the interval a start ends is before the day: negative).
points AS (
    SELECT p.cell, p.point AS current, p.point_us, p.usage, m.digits, m.reset_at_us,
           p.cell - m.base AS k, lag(p.cell) OVER w AS previous_cell,
           CASE WHEN previous_cell >= m.base THEN lag(p.point) OVER w
                ELSE m.start_register END AS previous,
           CASE WHEN previous_cell >= m.base THEN previous_cell - m.base
                ELSE floor_div(coalesce(m.start_us, 0) - {start_us} + m.step_us - 1,
                               m.step_us) - 1 END AS previous_k,
           CASE WHEN previous_cell >= m.base THEN lag(p.point_us) OVER w
                ELSE coalesce(m.start_us, 0) END AS previous_us
    FROM readings p JOIN meters m USING (base)
    WHERE p.point IS NOT NULL
    WINDOW w AS (ORDER BY p.cell)
),
differenced AS (
    SELECT cell, k, usage, previous, previous_k, k - previous_k AS span,
           -- a meter exchange between the two points starts a new register: no difference
           coalesce(reset_at_us > previous_us AND reset_at_us <= point_us, false) AS exchanged,
           -- a drop that 10**digits explains (rolled amount at most half) is a rollover
           current - previous AS raw_difference, power(10.0, digits) AS wrap,
           CASE WHEN raw_difference < 0 AND raw_difference + wrap <= wrap / 2
                THEN raw_difference + wrap ELSE raw_difference END AS difference
    FROM points
),
registers AS (
    SELECT *,
           difference IS NOT NULL AND NOT exchanged AND difference >= 0 AS usable,
           -- any other drop is a reset: flagged, not counted
           previous IS NOT NULL AND NOT exchanged AND NOT (difference >= 0) AS reset
    FROM differenced
),
-- Over one interval: the difference is its value unless usage measured it; usage that
-- disagrees with it beyond the tolerance flags the interval.
single AS (
    SELECT cell,
           CASE WHEN usage IS NULL THEN difference END AS value,
           usage IS NOT NULL AND abs(usage - difference) > {tolerance} * greatest(
               1.0, abs(usage), abs(difference)) AS mismatch
    FROM registers
    WHERE usable AND span = 1
),
-- Over several: the day's part of the difference (intervals first_k..k), less the usage
-- measured in it, spread evenly over its intervals without usage.
spread_points AS (
    SELECT cell AS point_cell, cell - k + greatest(previous_k + 1, 0) AS first_cell,
           difference * (k - greatest(previous_k + 1, 0) + 1) / span AS share
    FROM registers
    WHERE usable AND span > 1
),
spans AS (
    SELECT p.point_cell, p.share, c.cell, r.usage
    FROM (SELECT *, unnest(range(first_cell, point_cell + 1)) AS cell FROM spread_points) c
    JOIN spread_points p USING (point_cell)
    LEFT JOIN readings r USING (cell)
),
spread AS (
    SELECT s.cell, t.rest
    FROM spans s JOIN (
        SELECT point_cell,
               greatest(any_value(share) - coalesce(sum(usage), 0.0), 0.0)
                   / greatest(count(*) FILTER (WHERE usage IS NULL), 1) AS rest
        FROM spans GROUP BY point_cell
    ) t USING (point_cell)
    WHERE s.usage IS NULL
),
-- What the registers gave an interval: a value and its method, or a flag.
outcomes AS (
    SELECT cell, value, 'register' AS method, NULL AS flag FROM single WHERE value IS NOT NULL
    UNION ALL
    SELECT cell, rest, 'register_spread', NULL FROM spread
    UNION ALL
    SELECT cell, NULL, NULL, '{reset}' FROM registers WHERE reset
    UNION ALL
    SELECT cell, NULL, NULL, '{mismatch}' FROM single WHERE mismatch
),

-- Every expected interval of every meter, with what it holds so far.
measured AS MATERIALIZED (
    SELECT g.device_id, g.cell, g.k, g.intervals, g.step_us,
           coalesce(r.duplicates, 0) AS duplicates, coalesce(r.fault, o.flag) AS fault,
           coalesce(r.usage, o.value) AS value,
           CASE WHEN r.usage IS NOT NULL THEN 'usage' ELSE o.method END AS method
    FROM (
        SELECT device_id, step_us, intervals, base,
               unnest(range(base, base + intervals)) AS cell, cell - base AS k
        FROM meters
    ) g
    LEFT JOIN readings r USING (cell)
    LEFT JOIN outcomes o USING (cell)
),

-- 4. Gaps of up to max_linear intervals: linear between the nearest values on each side
-- (one side only, at the day's edge: its value). Only neighbours up to max_linear + 1 away
-- can bound such a gap, so only those are looked up. left_k -1 / right_k = intervals: the
-- day's edge; NULL: no value near enough.
empty AS (
    SELECT cell, k, intervals FROM measured WHERE value IS NULL
),
near AS (
    SELECT e.cell, n.cell AS other, n.value, e.d < 0 AS before
    FROM (SELECT *, unnest(range(-{max_linear} - 1, {max_linear} + 2)) AS d FROM empty) e
    JOIN measured n ON n.cell = e.cell + e.d
    WHERE e.d <> 0 AND e.k + e.d BETWEEN 0 AND e.intervals - 1 AND n.value IS NOT NULL
),
neighbours AS (
    SELECT e.cell, e.k,
           coalesce(e.k - (e.cell - max(n.other) FILTER (WHERE n.before)),
                    -- every interval before was looked at: the day's edge
                    CASE WHEN e.k <= {max_linear} + 1 THEN -1 END) AS left_k,
           arg_max(n.value, n.other) FILTER (WHERE n.before) AS left_value,
           coalesce(e.k + (min(n.other) FILTER (WHERE NOT n.before) - e.cell),
                    CASE WHEN e.intervals - e.k <= {max_linear} + 2 THEN e.intervals END)
               AS right_k,
           arg_min(n.value, n.other) FILTER (WHERE NOT n.before) AS right_value
    FROM empty e LEFT JOIN near n USING (cell)
    GROUP BY e.cell, e.k, e.intervals
),
linear AS (
    SELECT cell,
           CASE WHEN left_value IS NOT NULL AND right_value IS NOT NULL
                THEN left_value + (right_value - left_value)
                     * ((k - left_k)::DOUBLE / greatest(right_k - left_k, 1))
                ELSE coalesce(left_value, right_value) END AS value
    FROM neighbours
    WHERE right_k - left_k - 1 <= {max_linear}
      AND (left_value IS NOT NULL OR right_value IS NOT NULL)
),
-- Longer: the meter's mean measured value at that local hour, same weekday, four weeks.
profile AS (
    {profile}
),
profiled AS (
    SELECT m.cell, p.value
    FROM (SELECT * FROM measured WHERE value IS NULL) m
    ANTI JOIN linear USING (cell)
    JOIN profile p
      ON p.device_id = m.device_id
     AND p.hour = hour(timezone('{zone}',
                                make_timestamp({start_us} + m.k * m.step_us)::TIMESTAMPTZ))
),
-- Edits: a person's value replaces the interval's, whatever it was.
edited AS (
    SELECT m.base + (e.start_us - {start_us}) // m.step_us AS cell, e.value
    FROM ({edits}) e JOIN meters m USING (device_id)
    WHERE (e.start_us - {start_us}) % m.step_us = 0
)
SELECT m.device_id, {start_us} + m.k * m.step_us AS interval_start,
       {start_us} + (m.k + 1) * m.step_us AS interval_end,
       coalesce(e.value, m.value, l.value, p.value) AS value,
       CASE WHEN e.value IS NOT NULL THEN 'edited'
            WHEN m.method IN ('usage', 'register') THEN 'measured'
            WHEN coalesce(m.value, l.value, p.value) IS NOT NULL THEN 'estimated'
            -- 5. Rejected: still without a value, with a fault.
            WHEN m.fault IS NOT NULL THEN 'rejected'
            ELSE 'missing' END AS quality,
       CASE WHEN e.value IS NOT NULL THEN 'edit'
            WHEN m.value IS NOT NULL THEN m.method
            WHEN l.value IS NOT NULL THEN 'linear'
            WHEN p.value IS NOT NULL THEN 'profile' END AS method,
       m.fault AS fault_code, m.duplicates
FROM measured m
LEFT JOIN linear l USING (cell)
LEFT JOIN profiled p USING (cell)
LEFT JOIN edited e USING (cell)
"""

_PROFILE = """
    SELECT device_id, hour(timezone('{zone}', interval_start)) AS hour, avg(value) AS value
    FROM read_parquet({paths})
    WHERE quality = '{measured}'
    GROUP BY ALL
"""
_NO_PROFILE = "SELECT NULL::VARCHAR AS device_id, NULL::BIGINT AS hour, NULL::DOUBLE AS value"
# The latest override of each interval of the day (by the time it was recorded).
_EDITS = """
    SELECT device_id, epoch_us(interval_start) AS start_us,
           arg_max(value, recorded_at) AS value
    FROM read_parquet('{trail}/*.parquet')
    WHERE epoch_us(interval_start) >= {start_us} AND epoch_us(interval_start) < {end_us}
    GROUP BY ALL
"""
_NO_EDITS = (
    "SELECT NULL::VARCHAR AS device_id, NULL::BIGINT AS start_us, NULL::DOUBLE AS value LIMIT 0"
)


def _has_parquet(directory: str) -> bool:
    path = Path(directory)
    return path.is_dir() and any(path.glob("*.parquet"))


def vee_query(
    lake_path: str,
    day: date,
    default_interval: int,
    zone_name: str,
    max_linear: int = 4,
    tolerance: float = 0.01,
) -> str:
    """The SQL of :func:`validate_day_sql` (local lake paths only)."""
    start, end = day_bounds(day, zone_name)
    start_us, end_us = int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)
    weeks = [day - timedelta(days=7 * w) for w in range(1, PROFILE_WEEKS + 1)]
    earlier = [validated_path(lake_path, d) for d in weeks]
    earlier = [f"{path}/*.parquet" for path in earlier if _has_parquet(path)]
    profile = (
        _PROFILE.format(zone=zone_name, paths=earlier, measured=vee.MEASURED)
        if earlier
        else _NO_PROFILE
    )
    trail = edits_path(lake_path)
    edited = (
        _EDITS.format(trail=trail, start_us=start_us, end_us=end_us)
        if _has_parquet(trail)
        else _NO_EDITS
    )
    readings = lake.readings_path(lake_path)
    return VEE_SQL.format(
        registry=lake.registry_file(lake_path),
        day=day,
        day_files=f"{readings}/{lake.PARTITION_COLUMN}={day}/*.parquet",
        readings_root=readings,
        first_lookback=day - timedelta(days=REGISTER_LOOKBACK_DAYS),
        last_lookback=day - timedelta(days=1),
        start_us=start_us,
        end_us=end_us,
        default_interval=int(default_interval),
        max_linear=int(max_linear),
        tolerance=float(tolerance),
        reset=vee.REGISTER_RESET,
        mismatch=vee.REGISTER_MISMATCH,
        zone=zone_name,
        profile=profile,
        edits=edited,
    )


def validate_day_sql(
    lake_path: str,
    day: date,
    default_interval: int,
    zone_name: str,
    max_linear: int = 4,
    tolerance: float = 0.01,
    threads: int | None = None,
) -> pa.Table:
    """The day's validated intervals (:data:`meterflow.batch.vee.VALIDATED_SCHEMA`) of every
    registered meter and every meter that sent readings, computed by DuckDB."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {threads or os.cpu_count() or 2}")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(MACROS)
        sql = vee_query(lake_path, day, default_interval, zone_name, max_linear, tolerance)
        table = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    return pa.table(
        {field.name: table[field.name].cast(field.type) for field in vee.VALIDATED_SCHEMA},
        schema=vee.VALIDATED_SCHEMA,
    )
