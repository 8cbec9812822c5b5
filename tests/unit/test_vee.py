"""Validation and estimation of a day (meterflow.batch.vee) against a plain-Python reference
written from the rules in docs/architecture.md ("Validated consumption"), meter by meter and
interval by interval, on small days that hold each case."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa
import pytest

from meterflow.batch import vee
from meterflow.core.lake import TIMESTAMP
from meterflow.core.timestamps import day_bounds, local_hours

US = 1_000_000


@dataclass
class Row:
    device_id: str
    event_us: int
    usage: float | None = None
    register: float | None = None
    fault: str | None = None
    ingest_us: int = 0
    partition: int = 0
    offset: int = 0


@dataclass
class MeterCase:
    device_id: str
    interval_s: int = 900
    digits: int | None = None
    reset_at_us: int | None = None
    start: tuple[int, float] | None = None  # (event_us, register) before the day
    profile: dict[int, float] = field(default_factory=dict)  # local hour -> value


def table(rows: list[Row]) -> pa.Table:
    return pa.table(
        {
            "device_id": pa.array([r.device_id for r in rows], pa.string()),
            "event_time": pa.array([r.event_us for r in rows], TIMESTAMP),
            "consumption": pa.array([r.usage for r in rows], pa.float64()),
            "register": pa.array([r.register for r in rows], pa.float64()),
            "fault_code": pa.array([r.fault for r in rows], pa.string()),
            "ingest_time": pa.array([r.ingest_us for r in rows], TIMESTAMP),
            "source_partition": pa.array([r.partition for r in rows], pa.int32()),
            "source_offset": pa.array([r.offset for r in rows], pa.int64()),
        }
    )


def run_vee(rows: list[Row], cases: list[MeterCase], day: vee.Day, max_linear: int = 4):
    meters = pa.table(
        {
            "device_id": [c.device_id for c in cases],
            "interval_seconds": pa.array([c.interval_s for c in cases], pa.int64()),
            "register_digits": pa.array([c.digits for c in cases], pa.int64()),
            "register_reset_at": pa.array([c.reset_at_us for c in cases], TIMESTAMP),
        }
    )
    with_start = [c for c in cases if c.start]
    starts = pa.table(
        {
            "device_id": pa.array([c.device_id for c in with_start], pa.string()),
            "event_time": pa.array([c.start[0] for c in with_start if c.start], TIMESTAMP),
            "register": pa.array([c.start[1] for c in with_start if c.start], pa.float64()),
        }
    )
    profile_rows = [(c.device_id, h, v) for c in cases for h, v in c.profile.items()]
    profile = pa.table(
        {
            "device_id": pa.array([p[0] for p in profile_rows], pa.string()),
            "hour": pa.array([p[1] for p in profile_rows], pa.int64()),
            "value": pa.array([p[2] for p in profile_rows], pa.float64()),
        }
    )
    return vee.validate_day(table(rows), meters, starts, profile, day, max_linear)


def reference(rows: list[Row], case: MeterCase, day: vee.Day, max_linear: int = 4):
    """The rules, one meter at a time and one interval at a time."""
    step = case.interval_s * US
    count = (day.end_us - day.start_us) // step
    mine = sorted(
        (r for r in rows if r.device_id == case.device_id),
        key=lambda r: (r.event_us, r.ingest_us, r.partition, r.offset),
    )
    seen: set[int] = set()
    usage: list[float | None] = [None] * count
    register: list[tuple[int, float] | None] = [None] * count
    fault: list[str | None] = [None] * count
    duplicates = 0
    for r in mine:
        if r.event_us in seen:
            duplicates += 1
            continue
        seen.add(r.event_us)
        k = math.ceil((r.event_us - day.start_us) / step) - 1
        if not 0 <= k < count:
            continue
        if r.fault:
            fault[k] = fault[k] or r.fault
            continue
        if r.usage is not None:
            usage[k] = (usage[k] or 0.0) + r.usage
        if r.register is not None:
            register[k] = (r.event_us, r.register)
    value: list[float | None] = list(usage)
    quality = ["measured" if u is not None else "missing" for u in usage]
    method: list[str | None] = ["usage" if u is not None else None for u in usage]

    previous = None
    if case.start:
        t, reading = case.start
        previous = (t, reading, math.ceil((t - day.start_us) / step) - 1)
    for k in range(count):
        if register[k] is None:
            continue
        t, reading = register[k]
        if previous is not None:
            t0, before, k0 = previous
            exchanged = case.reset_at_us is not None and t0 < case.reset_at_us <= t
            change = reading - before
            if change < 0 and case.digits and change + 10**case.digits <= 10**case.digits / 2:
                change += 10**case.digits
            if exchanged:
                pass
            elif change < 0:
                fault[k] = fault[k] or vee.REGISTER_RESET
            elif k - k0 == 1:
                if usage[k] is None:
                    value[k], quality[k], method[k] = change, "measured", "register"
                elif abs(usage[k] - change) > 0.01 * max(1.0, abs(usage[k]), abs(change)):
                    fault[k] = fault[k] or vee.REGISTER_MISMATCH
            else:
                span = range(max(k0 + 1, 0), k + 1)
                share = change * len(span) / (k - k0)
                used = sum(usage[c] or 0.0 for c in span)
                empty = [c for c in span if usage[c] is None]
                for c in empty:
                    value[c] = max(share - used, 0.0) / len(empty)
                    quality[c], method[c] = "estimated", "register_spread"
        previous = (t, reading, k)

    k = 0
    filled = list(value)
    while k < count:
        if filled[k] is not None:
            k += 1
            continue
        end = k
        while end < count and filled[end] is None:
            end += 1
        left = filled[k - 1] if k > 0 else None
        right = filled[end] if end < count else None
        if end - k <= max_linear and (left is not None or right is not None):
            for c in range(k, end):
                if left is not None and right is not None:
                    value[c] = left + (right - left) * (c - k + 1) / (end - k + 1)
                else:
                    value[c] = left if left is not None else right
                quality[c], method[c] = "estimated", "linear"
        k = end
    starts = np.array([day.start_us + c * step for c in range(count)], dtype=np.int64)
    hours = local_hours(starts, day.zone_name)
    for c in range(count):
        if value[c] is None and int(hours[c]) in case.profile:
            value[c] = case.profile[int(hours[c])]
            quality[c], method[c] = "estimated", "profile"
        if value[c] is None and fault[c] is not None:
            quality[c] = "rejected"
    return (
        [(int(starts[c]), value[c], quality[c], method[c], fault[c]) for c in range(count)],
        duplicates,
    )


def rows_of(result: vee.Validated, device_id: str) -> list[tuple]:
    out = []
    for row in result.intervals.to_pylist():
        if row["device_id"] == device_id:
            start = int(row["interval_start"].timestamp() * US)
            out.append((start, row["value"], row["quality"], row["method"], row["fault_code"]))
    return out


def assert_like_reference(rows, cases, day, max_linear=4) -> vee.Validated:
    result = run_vee(rows, cases, day, max_linear)
    duplicates = dict(
        zip(
            result.duplicates["device_id"].to_pylist(),
            result.duplicates["duplicate_readings"].to_pylist(),
            strict=True,
        )
    )
    for case in cases:
        expected, expected_duplicates = reference(rows, case, day, max_linear)
        got = rows_of(result, case.device_id)
        assert len(got) == len(expected), case.device_id
        for mine, theirs in zip(got, expected, strict=True):
            assert mine[0] == theirs[0] and mine[2:] == theirs[2:], (case.device_id, mine, theirs)
            assert mine[1] == pytest.approx(theirs[1], abs=1e-9), (case.device_id, mine, theirs)
        assert duplicates[case.device_id] == expected_duplicates, case.device_id
    return result


def utc_day(day: date) -> vee.Day:
    start, end = day_bounds(day, "UTC")
    return vee.Day(int(start.timestamp() * US), int(end.timestamp() * US), "UTC")


DAY = utc_day(date(2024, 6, 2))
STEP = 900 * US


def end_of(k: int, day: vee.Day = DAY, step: int = STEP) -> int:
    """The stamp of interval ``k``'s reading: its end."""
    return day.start_us + (k + 1) * step


def totals(result: vee.Validated, device_id: str) -> tuple[float, dict[str, int]]:
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
    assert result.duplicates["duplicate_readings"].to_pylist() == [2]


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
