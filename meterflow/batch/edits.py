"""Editing: a person's value for one interval of one meter, kept in an audit trail.

``meterflow edit`` appends each batch of overrides as a new file under ``LAKE_PATH/edits/``
(never rewritten, never deleted by retention: it is the trail), with its author, reason and
time. The daily job applies the latest override of each interval when that day runs
again, with quality ``edited`` (docs/architecture.md, "Validated consumption").
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from meterflow.core import lake
from meterflow.core.errors import MeterflowError
from meterflow.core.timestamps import local_days, parse_timestamp_us

EDITS = "edits"
EDIT_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("interval_start", lake.TIMESTAMP),
        ("value", pa.float64()),
        ("reason", pa.string()),
        ("author", pa.string()),
        ("recorded_at", lake.TIMESTAMP),
    ]
)


class EditRejectedError(MeterflowError):
    """An override that cannot be recorded (a bad value, time or reason); nothing was."""

    exit_code = 2


@dataclass(frozen=True)
class Edit:
    device_id: str
    interval_start: str  # ISO 8601, the start of the interval it replaces
    value: float
    reason: str


def edits_path(lake_path: str) -> str:
    return f"{lake_path.rstrip('/')}/{EDITS}"


def _checked(edit: Edit, where: str) -> tuple[str, int, float, str]:
    if not edit.device_id.strip():
        raise EditRejectedError(f"{where}: no device id")
    try:
        start_us = parse_timestamp_us(edit.interval_start)
    except ValueError:
        raise EditRejectedError(
            f"{where}: {edit.interval_start!r} is not an ISO 8601 time (the interval's start)"
        ) from None
    if not edit.value == edit.value or edit.value < 0:  # NaN or negative
        raise EditRejectedError(f"{where}: value {edit.value!r} must be a number, 0 or more")
    if not edit.reason.strip():
        raise EditRejectedError(f"{where}: every edit needs a reason (--reason)")
    return edit.device_id.strip(), start_us, float(edit.value), edit.reason.strip()


def read_edit_file(path: str) -> list[Edit]:
    """Edits from a CSV with ``device_id, interval_start, value, reason`` columns."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"device_id", "interval_start", "value", "reason"} - set(rows[0] if rows else {})
    if missing:
        raise EditRejectedError(f"{path}: the header lacks {', '.join(sorted(missing))}")
    edits = []
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["value"])
        except ValueError:
            raise EditRejectedError(
                f"{path} line {line}: value {row['value']!r} is not a number"
            ) from None
        edits.append(Edit(row["device_id"], row["interval_start"], value, row["reason"] or ""))
    return edits


@dataclass(frozen=True)
class Recorded:
    path: str
    rows: pa.Table


def record(lake_path: str, edits: list[Edit], author: str, now: datetime | None = None) -> Recorded:
    """Append ``edits`` to the trail as one new file; all are checked first, none is
    written if one is wrong."""
    if not edits:
        raise EditRejectedError("no edits to record")
    checked = [_checked(e, f"edit {i}") for i, e in enumerate(edits, start=1)]
    stamp = now or datetime.now(UTC)
    table = pa.table(
        {
            "device_id": [c[0] for c in checked],
            "interval_start": pa.array([c[1] for c in checked], lake.TIMESTAMP),
            "value": [c[2] for c in checked],
            "reason": [c[3] for c in checked],
            "author": [author] * len(checked),
            "recorded_at": pa.array([stamp] * len(checked), lake.TIMESTAMP),
        },
        schema=EDIT_SCHEMA,
    )
    filesystem, root = lake.filesystem_for(edits_path(lake_path))
    filesystem.create_dir(root, recursive=True)
    name = f"{root}/{stamp:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    lake.write_atomically(filesystem, name, buffer.getvalue().to_pybytes())
    return Recorded(name, table)


def read(lake_path: str, device_id: str | None = None) -> pa.Table:
    """The whole trail (or one meter's), oldest first."""
    filesystem, root = lake.filesystem_for(edits_path(lake_path))
    try:
        table = pads.dataset(root, filesystem=filesystem, schema=EDIT_SCHEMA).to_table()
    except FileNotFoundError:
        table = EDIT_SCHEMA.empty_table()
    if device_id is not None:
        table = table.filter(pc.equal(table["device_id"], device_id))
    return table.sort_by([("recorded_at", "ascending"), ("interval_start", "ascending")])


def latest(trail: pa.Table, start_us: int, end_us: int) -> pa.Table:
    """Per meter and interval starting in ``[start_us, end_us)``, the latest override."""
    starts = pc.cast(trail["interval_start"], pa.int64())
    inside = pc.and_(pc.greater_equal(starts, start_us), pc.less(starts, end_us))
    rows = trail.filter(inside).sort_by(
        [("device_id", "ascending"), ("interval_start", "ascending"), ("recorded_at", "ascending")]
    )
    if rows.num_rows == 0:
        return rows.select(["device_id", "interval_start", "value"])
    device, start = rows["device_id"].to_pylist(), pc.cast(rows["interval_start"], pa.int64())
    start_list = start.to_pylist()
    last = [
        i
        for i in range(rows.num_rows)
        if i + 1 == rows.num_rows
        or (device[i], start_list[i]) != (device[i + 1], start_list[i + 1])
    ]
    return rows.take(pa.array(last)).select(["device_id", "interval_start", "value"])


def days_of(trail: pa.Table, zone_name: str) -> list[date]:
    """The local days the overrides in ``trail`` fall on: the days to run again."""
    if trail.num_rows == 0:
        return []
    starts = np.asarray(pc.cast(trail["interval_start"], pa.int64()).to_numpy(), dtype=np.int64)
    epoch = date(1970, 1, 1).toordinal()
    return sorted({date.fromordinal(epoch + int(d)) for d in local_days(starts, zone_name)})


def trail_lines(lake_path: str, device_id: str) -> list[str]:
    """What ``meterflow edit --list`` prints: a meter's edits, oldest first, and a count."""
    trail = read(lake_path, device_id).to_pylist()
    lines = [
        f"{row['recorded_at']:%Y-%m-%dT%H:%M:%SZ} {row['author']}: {row['device_id']} "
        f"{row['interval_start']:%Y-%m-%dT%H:%M:%SZ} = {row['value']:g} ({row['reason']})"
        for row in trail
    ]
    return [*lines, f"{len(trail)} edits of {device_id}"]
