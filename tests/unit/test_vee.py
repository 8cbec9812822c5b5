"""Validation and estimation of a day (meterflow.batch.vee) against a plain-Python reference
written from the rules in docs/architecture.md ("Validated consumption"), meter by meter and
interval by interval, on small days that hold each case."""

from __future__ import annotations

import random
from datetime import date

import pyarrow as pa
import pytest
from vee_helpers import (
    US,
    MeterCase,
    Row,
    assert_like_reference,
    duplicates_of,
    rows_of,
    run_vee,
)

from meterflow.batch import vee
from meterflow.core.timestamps import day_bounds


def utc_day(day: date) -> vee.Day:
    start, end = day_bounds(day, "UTC")
    return vee.Day(int(start.timestamp() * US), int(end.timestamp() * US), "UTC")


DAY = utc_day(date(2024, 6, 2))
STEP = 900 * US


def end_of(k: int, day: vee.Day = DAY, step: int = STEP) -> int:
    """The stamp of interval ``k``'s reading: its end."""
    return day.start_us + (k + 1) * step


def totals(result: pa.Table, device_id: str) -> tuple[float, dict[str, int]]:
    values = [r for r in rows_of(result, device_id)]
    counts: dict[str, int] = {}
    for r in values:
        counts[r[2]] = counts.get(r[2], 0) + 1
    return sum(r[1] or 0.0 for r in values), counts


def test_usage_duplicates_a_rejected_reading_and_a_short_gap() -> None:
    rows = [
        Row("em1", end_of(k), usage=0.5 + 0.01 * k, offset=k)
        for k in range(96)
        if k not in (10, 11)
    ]
    # Sent again later with another value: the first by ingest order counts.
    rows += [Row("em1", end_of(20), usage=9.0, ingest_us=5, offset=500)]
    rows += [Row("em1", end_of(20), usage=8.0, ingest_us=6, offset=501)]
    rows = [
        Row("em1", r.event_us, usage=None, fault="NEGATIVE", offset=r.offset)
        if r.event_us == end_of(50)
        else r
        for r in rows
    ]
    result = assert_like_reference(rows, [MeterCase("em1")], DAY)
    cells = rows_of(result, "em1")
    assert cells[20][1] == pytest.approx(0.7) and cells[20][2] == "measured"
    assert [c[2:4] for c in cells[10:12]] == [("estimated", "linear")] * 2
    assert cells[10][1] == pytest.approx(0.59 + (0.62 - 0.59) / 3)
    assert cells[50][2:] == ("estimated", "linear", "NEGATIVE")  # rejected, then estimated
    assert duplicates_of(result) == {"em1": 2}
    assert rows_of_duplicates(result, 20) == 2  # where they were sent


def test_registers_out_of_order_with_a_rollover_and_a_gap_keep_the_day_exact() -> None:
    start_register = 99_990.0
    readings = {k: start_register + 0.25 * (k + 1) for k in range(96)}
    rows = [
        Row("gm1", end_of(k), register=round(value % 100_000, 6), offset=k)
        for k, value in readings.items()
        if k not in (30, 31, 32)
    ]
    random.Random(4).shuffle(rows)  # arrival order does not matter
    case = MeterCase("gm1", digits=5, start=(DAY.start_us, start_register))
    result = assert_like_reference(rows, [case], DAY)
    total, counts = totals(result, "gm1")
    assert total == pytest.approx(0.25 * 96)  # the rollover at 100,000 counted, not negative
    assert counts == {"measured": 96 - 4, "estimated": 4}  # the gap's 3 and the reading after
    cells = rows_of(result, "gm1")
    assert {c[3] for c in cells[30:34]} == {"register_spread"}


def test_a_register_drop_is_a_reset_and_an_exchange_starts_a_new_register() -> None:
    dropped = [Row("gm2", end_of(k), register=500.0 + k, offset=k) for k in range(40)]
    dropped += [Row("gm2", end_of(k), register=float(k - 40), offset=k) for k in range(40, 96)]
    exchange_at = end_of(39) + 60 * US
    exchanged = [Row("gm3", end_of(k), register=500.0 + k, offset=k) for k in range(40)]
    exchanged += [Row("gm3", end_of(k), register=float(k - 40), offset=k) for k in range(40, 96)]
    cases = [
        MeterCase("gm2", start=(DAY.start_us, 499.0)),
        MeterCase("gm3", start=(DAY.start_us, 499.0), reset_at_us=exchange_at),
    ]
    result = assert_like_reference(dropped + exchanged, cases, DAY)
    reset = rows_of(result, "gm2")[40]
    assert reset[4] == vee.REGISTER_RESET and reset[3] == "linear"  # flagged, then estimated
    assert rows_of(result, "gm3")[40][4] is None  # an exchange is no fault
    assert all(c[1] is not None and c[1] >= 0 for c in rows_of(result, "gm2"))


def test_usage_that_disagrees_with_its_register_is_flagged() -> None:
    rows = [Row("em2", end_of(k), usage=1.0, register=100.0 + k + 1, offset=k) for k in range(96)]
    rows[60] = Row("em2", end_of(60), usage=3.0, register=161.0, offset=60)
    rows[61] = Row("em2", end_of(61), usage=1.0, register=162.0, offset=61)
    result = assert_like_reference(rows, [MeterCase("em2", start=(DAY.start_us, 100.0))], DAY)
    flagged = [c for c in rows_of(result, "em2") if c[4]]
    assert [(c[1], c[4]) for c in flagged] == [(3.0, vee.REGISTER_MISMATCH)]


def test_a_long_gap_takes_the_profile_or_stays_missing() -> None:
    rows = [
        Row(d, end_of(k), usage=0.4, offset=k)
        for d in ("em3", "em4")
        for k in range(96)
        if not 40 <= k < 50
    ]
    profile = {hour: 0.1 * hour for hour in range(24)}
    cases = [MeterCase("em3", profile=profile), MeterCase("em4"), MeterCase("em5")]
    result = assert_like_reference(rows, cases, DAY)
    with_profile = rows_of(result, "em3")[40:50]
    assert {c[2:4] for c in with_profile} == {("estimated", "profile")}
    assert with_profile[0][1] == pytest.approx(1.0)  # 10:00 UTC is hour 10
    assert {c[2] for c in rows_of(result, "em4")[40:50]} == {"missing"}
    assert {c[2] for c in rows_of(result, "em5")} == {"missing"}  # registered, silent


def test_a_gap_of_more_than_the_linear_limit_is_not_interpolated() -> None:
    rows = [Row("em6", end_of(k), usage=1.0, offset=k) for k in range(96) if not 10 <= k < 13]
    assert_like_reference(rows, [MeterCase("em6")], DAY, max_linear=2)
    result = run_vee(rows, [MeterCase("em6")], DAY, max_linear=2)
    assert {c[2] for c in rows_of(result, "em6")[10:13]} == {"missing"}


@pytest.mark.parametrize(("day", "intervals"), [(date(2024, 3, 31), 92), (date(2024, 10, 27), 100)])
def test_dst_days_have_92_or_100_quarter_hours(day: date, intervals: int) -> None:
    start, end = day_bounds(day, "Europe/Paris")
    paris = vee.Day(int(start.timestamp() * US), int(end.timestamp() * US), "Europe/Paris")
    rows = [Row("em7", end_of(k, paris), usage=0.25, offset=k) for k in range(intervals) if k != 7]
    profile = {h: 9.0 for h in range(24)}
    result = assert_like_reference(rows, [MeterCase("em7", profile=profile)], paris)
    total, counts = totals(result, "em7")
    assert counts == {"measured": intervals - 1, "estimated": 1}
    assert total == pytest.approx(0.25 * intervals)
    # The local midnight's reading closes the day; one a second later is the next day's.
    late = [Row("em7", paris.end_us + US, usage=5.0)]
    assert totals(run_vee(rows + late, [MeterCase("em7")], paris), "em7")[0] == pytest.approx(total)


def test_random_days_agree_with_the_reference() -> None:
    """Mixed meters with random gaps, faults, duplicates and registers."""
    chance = random.Random(11)
    rows: list[Row] = []
    cases: list[MeterCase] = []
    for m in range(12):
        device = f"m{m}"
        register = chance.uniform(0, 999)
        cases.append(
            MeterCase(
                device,
                interval_s=chance.choice([900, 1800, 3600]),
                digits=3 if m % 3 == 0 else None,
                start=(DAY.start_us - 3600 * US, register) if m % 2 else None,
                profile={h: chance.uniform(0, 2) for h in range(24)} if m % 4 == 1 else {},
            )
        )
        step = cases[-1].interval_s * US
        for k in range(86_400 * US // step):
            if chance.random() < 0.2:
                continue
            used = round(chance.uniform(0, 3), 3)
            register += used
            kind = chance.random()
            row = Row(
                device,
                end_of(k, DAY, step),
                usage=used if kind < 0.6 else None,
                register=round(register % 1000 if m % 3 == 0 else register, 3)
                if kind > 0.4
                else None,
                fault="SENTINEL" if chance.random() < 0.05 else None,
                ingest_us=chance.randrange(10),
                offset=len(rows),
            )
            if row.usage is None and row.register is None:
                row.usage = used
            rows.append(row)
            if chance.random() < 0.05:
                rows.append(Row(device, row.event_us, usage=99.0, ingest_us=99, offset=len(rows)))
    chance.shuffle(rows)
    assert_like_reference(rows, cases, DAY)


def rows_of_duplicates(result: pa.Table, interval: int) -> int:
    return int(result["duplicates"][interval].as_py())


def test_an_edit_replaces_whatever_the_interval_had() -> None:
    rows = [Row("em8", end_of(k), usage=1.0, offset=k) for k in range(96) if k != 30]
    rows.append(Row("em8", end_of(50), fault="SENTINEL", offset=500))
    edits = {DAY.start_us + 30 * STEP: 2.5, DAY.start_us + 10 * STEP: 0.0, DAY.start_us + 7: 9.0}
    case = MeterCase("em8", edits=edits)
    result = assert_like_reference(rows, [case], DAY)
    cells = rows_of(result, "em8")
    assert cells[30][1:4] == (2.5, "edited", "edit") and cells[10][1:4] == (0.0, "edited", "edit")
    assert sum(c[2] == "edited" for c in cells) == 2  # one off the grid is ignored


def test_registered_meters_without_any_reading_are_missing_all_day() -> None:
    """A validation task may hold registered meters and no reading at all (the job sizes
    its tasks by the fleet): every interval of theirs is missing."""
    result = assert_like_reference([], [MeterCase("em1"), MeterCase("wm2")], DAY)
    for device in ("em1", "wm2"):
        assert {cell[2] for cell in rows_of(result, device)} == {"missing"}
        assert len(rows_of(result, device)) == 96


def test_validation_tasks_are_sized_by_the_intervals_expected() -> None:
    """A task holds its meters' rows at once, so the count of tasks follows the day's
    expected intervals: a one-minute meter weighs 15 quarter-hour ones, a DST day its hours."""
    from meterflow.batch.validation import expected_intervals
    from meterflow.core.registry import INTERVAL

    registry = pa.table({"device_id": ["a", "b", "c"], INTERVAL: [60, 900, None]})
    assert expected_intervals(registry, 900, date(2024, 6, 3), "UTC") == 1440 + 96 + 96
    assert expected_intervals(registry, 900, date(2024, 3, 31), "Europe/Paris") == 1380 + 92 + 92
    assert expected_intervals(registry.drop_columns([INTERVAL]), 60, date(2024, 6, 3), "UTC") == (
        3 * 1440
    )
    assert expected_intervals(registry.slice(0, 0), 900, date(2024, 6, 3), "UTC") == 0
