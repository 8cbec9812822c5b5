"""Validation and estimation (meterflow.batch.vee) written out plainly: the rules of
docs/architecture.md ("Validated consumption"), one meter and one interval at a time, as the
reference the vectorised code and the daily job are compared with.

Shared by tests/unit/test_vee.py and tests/integration/test_daily_batch.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest

from meterflow.batch import vee
from meterflow.core.lake import TIMESTAMP
from meterflow.core.timestamps import local_hours

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
    edits: dict[int, float] = field(default_factory=dict)  # interval start (us) -> value


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
    edit_rows = [(c.device_id, start, v) for c in cases for start, v in c.edits.items()]
    edits = pa.table(
        {
            "device_id": pa.array([e[0] for e in edit_rows], pa.string()),
            "interval_start": pa.array([e[1] for e in edit_rows], TIMESTAMP),
            "value": pa.array([e[2] for e in edit_rows], pa.float64()),
        }
    )
    return vee.validate_day(table(rows), meters, starts, profile, day, max_linear, edits=edits)


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
        if int(starts[c]) in case.edits:
            value[c] = case.edits[int(starts[c])]
            quality[c], method[c] = "edited", "edit"
        if value[c] is None and fault[c] is not None:
            quality[c] = "rejected"
    return (
        [(int(starts[c]), value[c], quality[c], method[c], fault[c]) for c in range(count)],
        duplicates,
    )


def rows_of(result: pa.Table, device_id: str) -> list[tuple]:
    out = []
    for row in result.to_pylist():
        if row["device_id"] == device_id:
            start = int(row["interval_start"].timestamp() * US)
            out.append((start, row["value"], row["quality"], row["method"], row["fault_code"]))
    return out


def duplicates_of(result: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for device, repeats in zip(
        result["device_id"].to_pylist(), result["duplicates"].to_pylist(), strict=True
    ):
        counts[device] = counts.get(device, 0) + repeats
    return counts


def assert_like_reference(rows, cases, day, max_linear=4) -> pa.Table:
    result = run_vee(rows, cases, day, max_linear)
    duplicates = duplicates_of(result)
    for case in cases:
        expected, expected_duplicates = reference(rows, case, day, max_linear)
        got = rows_of(result, case.device_id)
        assert len(got) == len(expected), case.device_id
        for mine, theirs in zip(got, expected, strict=True):
            assert mine[0] == theirs[0] and mine[2:] == theirs[2:], (case.device_id, mine, theirs)
            assert mine[1] == pytest.approx(theirs[1], abs=1e-9), (case.device_id, mine, theirs)
        assert duplicates[case.device_id] == expected_duplicates, case.device_id
    return result
