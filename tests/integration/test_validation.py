"""The daily job's validation in Spark (meterflow.batch.validation) against the plain-Python
reference of tests/vee_helpers.py: registers across days, a rollover, duplicates, gaps (one
linear, one from the profile of four weeks' same weekdays), a silent meter."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lake_helpers import FILE_SCHEMA, run_batch, write_lake_day
from pyspark.sql import SparkSession
from vee_helpers import US, MeterCase, Row, reference

from meterflow.batch import edits, validation, vee, views
from meterflow.batch.daily import run_late
from meterflow.batch.late import late_days
from meterflow.core import registry
from meterflow.core.config import Settings
from meterflow.core.ledger import BATCH, Ledger, Range
from meterflow.core.timestamps import day_bounds

DAY = date(2024, 6, 10)
WEEK_BEFORE = DAY - timedelta(days=7)
STEP = 900 * US


def lake_row(row: Row, meter_type: str) -> dict:
    at = datetime.fromtimestamp(row.event_us / US, UTC)
    return {
        "device_id": row.device_id,
        "meter_type": meter_type,
        "event_time": at,
        "consumption": row.usage,
        "unit": {"electricity": "kWh", "gas": "m3"}[meter_type],
        "flow_rate": None,
        "register": row.register,
        "fault_code": row.fault,
        "reason": None,
        "source_topic": "iot-meter",
        "source_partition": row.partition,
        "source_offset": row.offset,
        "ingest_time": datetime.fromtimestamp(row.ingest_us / US, UTC) if row.ingest_us else at,
    }


def bounds(day: date) -> vee.Day:
    start, end = day_bounds(day, "UTC")
    return vee.Day(int(start.timestamp() * US), int(end.timestamp() * US), "UTC")


def end_of(day: date, k: int) -> int:
    return bounds(day).start_us + (k + 1) * STEP


@pytest.fixture
def lake(tmp_path: Path) -> Settings:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path / "data")})
    registry.write(
        pa.table(
            {
                "device_id": ["em1", "gm1", "em2"],
                "meter_type": ["electricity", "gas", "electricity"],
                "district": ["north", "north", "south"],
                "interval_seconds": pa.array([900, 900, 900], pa.int64()),
                "register_digits": pa.array([None, 5, None], pa.int64()),
            }
        ),
        settings.registry_path,
    )
    return settings


def test_the_job_validates_like_the_reference(spark: SparkSession, lake: Settings) -> None:
    chance = random.Random(3)
    # A week before: em1's profile day (the same weekday), and gm1's register.
    profile_rows = [Row("em1", end_of(WEEK_BEFORE, k), usage=0.1 * (k // 4)) for k in range(96)]
    register = 99_950.0
    before = [Row("gm1", end_of(DAY - timedelta(days=1), 95), register=register)]
    write_lake_day(lake, WEEK_BEFORE, [lake_row(r, "electricity") for r in profile_rows])
    write_lake_day(lake, DAY - timedelta(days=1), [lake_row(r, "gas") for r in before])
    # The day: em1 with a 2-interval gap, a 10-interval gap and a duplicate; gm1 with a
    # rollover at 100,000 and a 3-interval gap, out of order; em2 silent.
    usage = [
        Row("em1", end_of(DAY, k), usage=round(chance.uniform(0.1, 1), 3), offset=k)
        for k in range(96)
        if k not in (5, 6) and not 40 <= k < 50
    ]
    usage.append(Row("em1", end_of(DAY, 20), usage=50.0, offset=1000, ingest_us=end_of(DAY, 95)))
    registers = []
    for k in range(96):
        register += 1.5
        if k not in (70, 71, 72):
            registers.append(Row("gm1", end_of(DAY, k), register=round(register % 100_000, 3)))
    chance.shuffle(registers)
    for offset, row in enumerate(registers):
        row.offset = 2000 + offset
    rows = [lake_row(r, "electricity") for r in usage] + [lake_row(r, "gas") for r in registers]
    write_lake_day(lake, DAY, rows)

    edited_start = bounds(DAY).start_us + 60 * STEP
    stamp = datetime.fromtimestamp(edited_start / US, UTC).isoformat()
    edits.record(lake.lake_path, [edits.Edit("em1", stamp, 7.0, "read on site")], "ann")

    run_batch(spark, lake, WEEK_BEFORE)
    report = run_batch(spark, lake, DAY)
    assert report.status == views.STATUS_OK

    hours = {h: 0.1 * h for h in range(24)}  # the week before's mean per hour
    cases = [
        MeterCase("em1", profile=hours, edits={edited_start: 7.0}),
        MeterCase("gm1", digits=5, start=(before[0].event_us, before[0].register or 0.0)),
        MeterCase("em2"),
    ]
    validated = pq.read_table(validation.validated_path(lake.lake_path, DAY)).sort_by(
        [("device_id", "ascending"), ("interval_start", "ascending")]
    )
    meter_view = {
        r["device_id"]: r
        for r in pq.read_table(views.view_path(lake.views_path, views.METER_VIEW, DAY)).to_pylist()
    }
    for case in cases:
        expected, duplicates = reference(usage + registers, case, bounds(DAY))
        got = [r for r in validated.to_pylist() if r["device_id"] == case.device_id]
        assert len(got) == 96, case.device_id
        for mine, theirs in zip(got, expected, strict=True):
            assert int(mine["interval_start"].timestamp() * US) == theirs[0]
            assert (mine["quality"], mine["method"], mine["fault_code"]) == theirs[2:], theirs
            assert mine["value"] == pytest.approx(theirs[1], abs=1e-9), theirs
        counted = [e[1] for e in expected if e[2] in ("measured", "estimated", "edited")]
        view = meter_view[case.device_id]
        assert view["consumption"] == pytest.approx(sum(counted) if counted else None)
        assert view["measured_intervals"] == sum(e[2] == "measured" for e in expected)
        assert view["estimated_intervals"] == sum(e[2] == "estimated" for e in expected)
        assert view["missing_intervals"] == sum(e[2] == "missing" for e in expected)
        assert view["duplicate_readings"] == duplicates
    assert meter_view["gm1"]["consumption"] == pytest.approx(1.5 * 96)  # exact over the gap
    assert meter_view["em1"]["duplicate_readings"] == 1
    assert meter_view["em1"]["estimated_intervals"] == 12
    assert [r["quality"] for r in validated.to_pylist() if r["value"] == 7.0] == ["edited"]
    assert 0 < meter_view["em1"]["estimated_share"] < 1
    assert meter_view["em2"]["missing_intervals"] == 96
    hourly = {
        r["device_id"]: r
        for r in pq.read_table(views.view_path(lake.views_path, views.HOURLY_VIEW, DAY)).to_pylist()
    }
    for device in ("em1", "gm1"):
        hours = hourly[device]["hours"]
        assert len(hours) == len(hourly[device]["hour_starts"]) == 24
        assert sum(hours) == pytest.approx(meter_view[device]["consumption"])
    assert hourly["em2"]["hours"] == [None] * 24  # registered, silent: nothing counted

    # A reading of em2 lands after the day was published: the ledger says so, and the day
    # runs again with what changed in its report.
    late = Row("em2", end_of(DAY, 30), usage=4.0, offset=9000)
    name = f"readings/date={DAY}/part-late.parquet"
    pq.write_table(
        pa.Table.from_pylist([lake_row(late, "electricity")], schema=FILE_SCHEMA),
        Path(lake.lake_path) / name,
    )
    Ledger.load(lake.lake_path).commit(BATCH, [Range("iot-meter", "g", 0, 9000, 9001)], [name])
    assert late_days(lake.lake_path, WEEK_BEFORE, DAY) == [DAY]
    (again,) = run_late(spark, lake.lake_path, WEEK_BEFORE, DAY, 900)
    consumption = sum(meter_view[d]["consumption"] or 0.0 for d in meter_view)
    assert again.changes["readings_added"] == 1
    assert again.changes["consumption_before"] == pytest.approx(consumption)
    assert again.changes["consumption_after"] == pytest.approx(consumption + 4.0)
    assert late_days(lake.lake_path, WEEK_BEFORE, DAY) == []

    # The month to date, per meter and per district, includes both days and the late one.
    def month(view: str) -> list[dict]:
        return pq.read_table(views.month_view_path(lake.views_path, view, "2024-06")).to_pylist()

    def day_view(day: date) -> dict[str, dict]:
        rows = pq.read_table(views.view_path(lake.views_path, views.METER_VIEW, day)).to_pylist()
        return {r["device_id"]: r for r in rows}

    days = [day_view(WEEK_BEFORE), day_view(DAY)]
    per_meter = {r["device_id"]: r for r in month(views.METER_MONTHLY_VIEW)}
    for device, row in per_meter.items():
        published = [d[device] for d in days if device in d]
        assert row["days"] == len(published)
        assert row["consumption"] == pytest.approx(sum(p["consumption"] or 0.0 for p in published))
    assert per_meter["em2"]["consumption"] == pytest.approx(4.0)
    north = {(r["district"], r["meter_type"]): r for r in month(views.DISTRICT_MONTHLY_VIEW)}
    electricity = north[("north", "electricity")]
    assert electricity["meter_count"] == 1
    assert electricity["consumption"] == pytest.approx(per_meter["em1"]["consumption"])


def test_a_dst_day_has_its_local_intervals_and_hours(spark: SparkSession, tmp_path: Path) -> None:
    """The autumn change in Paris: 25 hours, one of them twice (the 23-hour spring day is
    tests/unit/test_vee.py's and tests/unit/test_local_days.py's)."""
    day, hours = date(2024, 10, 27), 25
    settings = Settings.from_env(
        {"METERFLOW_DATA_DIR": str(tmp_path / "data"), "METERFLOW_TIMEZONE": "Europe/Paris"}
    )
    registry.write(
        pa.table({"device_id": ["em1"], "meter_type": ["electricity"], "interval_seconds": [900]}),
        settings.registry_path,
    )
    start, _end = day_bounds(day, "Europe/Paris")
    first = int(start.timestamp() * US)
    rows = [Row("em1", first + (k + 1) * STEP, usage=0.25, offset=k) for k in range(hours * 4)]
    write_lake_day(settings, day, [lake_row(r, "electricity") for r in rows])
    run_batch(spark, settings, day)

    view = pq.read_table(views.view_path(settings.views_path, views.METER_VIEW, day)).to_pylist()
    assert (view[0]["expected_count"], view[0]["measured_intervals"]) == (hours * 4, hours * 4)
    assert view[0]["consumption"] == pytest.approx(0.25 * 4 * hours)
    (hourly,) = pq.read_table(
        views.view_path(settings.views_path, views.HOURLY_VIEW, day)
    ).to_pylist()
    assert hourly["hours"] == pytest.approx([1.0] * hours)
    assert len(set(hourly["hour_starts"])) == hours  # the repeated hour told apart
