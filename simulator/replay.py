"""Replay real recordings as contract messages.

Supported inputs, recognised from their header line:

* UCI "Individual household electric power consumption" (``household_power_consumption.txt``):
  ``Date;Time;Global_active_power;...``, one row a minute, ``?`` for a missing value.
  ``Global_active_power`` is the minute's average kW, so the reading is
  ``usage_kwh = kW / 60`` (energy in that minute).
* AMPds2 CSV exports, one file per meter, ``unix_ts`` first:
  electricity (``unix_ts,V,I,f,DPF,APF,P,Pt,...``): ``P`` is the minute's real power in W,
  so ``usage_kwh = P / 1000 * minutes since the previous row`` (one minute for the first);
  water and natural gas (``unix_ts,counter,avg_rate,inst_rate``): ``counter`` is the
  cumulative volume (litres for water, m³ for gas as exported), so the reading's usage is
  the counter's increase since the previous row, and for water ``flow_rate = avg_rate``
  (L/min). Gas or water is told by the file name (``gas``/``WHG`` means gas) unless
  ``meter_type`` is given.

A missing value (``?``, empty, ``NaN``) becomes a reading *without* its metric, which the
pipeline flags as ``MISSING_METRIC``; a row that cannot be read at all (wrong column count,
bad date) is reported with its line number, counted, and skipped. Nothing stops a replay.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meterflow.contract import METER_SPECS, MeterType
from meterflow.logs import get_logger

log = get_logger("simulator.replay")
Emit = Callable[[bytes | None, bytes], None]

UCI_HEADER = "Date;Time;Global_active_power"
_MISSING = {"", "?", "nan", "NaN", "NA", "null"}


class ReplayError(ValueError):
    """The file is not in a supported format; the message says what was expected."""


@dataclass
class ReplaySummary:
    rows: int = 0
    sent: int = 0
    missing_values: int = 0
    bad_rows: int = 0
    bad_lines: list[int] = field(default_factory=list)  # the first few, for the report


@dataclass(frozen=True)
class Row:
    """One recording row mapped to the contract; ``usage is None`` means missing."""

    at: datetime
    usage: float | None
    flow_rate: float | None = None


def detect(path: Path) -> str:
    """``uci``, ``ampds-electricity`` or ``ampds-counter`` from the header line."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip()
    if header.startswith(UCI_HEADER):
        return "uci"
    columns = [c.strip().lower() for c in header.split(",")]
    if columns and columns[0] in ("unix_ts", "ts"):
        if "p" in columns:
            return "ampds-electricity"
        if "counter" in columns:
            return "ampds-counter"
    raise ReplayError(
        f"{path.name}: header {header[:60]!r} is neither UCI ({UCI_HEADER};...) nor an AMPds2 "
        "export (unix_ts,...,P,... or unix_ts,counter,avg_rate,inst_rate)"
    )


def _number(text: str) -> float | None:
    text = text.strip()
    if text in _MISSING:
        return None
    value = float(text)
    return None if math.isnan(value) else value


def _uci_rows(path: Path, summary: ReplaySummary) -> Iterator[Row]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        next(handle)
        for line_no, line in enumerate(handle, start=2):
            parts = line.rstrip("\n").split(";")
            try:
                if len(parts) != 9:
                    raise ValueError(f"{len(parts)} columns, expected 9")
                at = datetime.strptime(f"{parts[0]} {parts[1]}", "%d/%m/%Y %H:%M:%S")
                power_kw = _number(parts[2])
            except ValueError as exc:
                _bad(summary, line_no, str(exc))
                continue
            yield Row(at.replace(tzinfo=UTC), None if power_kw is None else power_kw / 60)


def _ampds_rows(path: Path, kind: str, summary: ReplaySummary) -> Iterator[Row]:
    previous_ts: float | None = None
    previous_counter: float | None = None
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        header = [c.strip().lower() for c in next(reader)]
        for line_no, parts in enumerate(reader, start=2):
            try:
                if len(parts) != len(header):
                    raise ValueError(f"{len(parts)} columns, expected {len(header)}")
                record = dict(zip(header, parts, strict=True))
                stamp = float(record[header[0]])
                at = datetime.fromtimestamp(stamp, UTC)
                minutes = 1.0 if previous_ts is None else max((stamp - previous_ts) / 60, 0.0)
                if kind == "ampds-electricity":
                    watts = _number(record["p"])
                    row = Row(at, None if watts is None else watts / 1000 * minutes / 60)
                else:
                    counter = _number(record["counter"])
                    rate = _number(record.get("avg_rate", ""))
                    if counter is None:
                        usage = None
                    elif previous_counter is None:
                        usage = (rate or 0.0) * minutes
                    else:
                        usage = max(counter - previous_counter, 0.0)
                    previous_counter = counter if counter is not None else previous_counter
                    row = Row(at, usage, rate)
                previous_ts = stamp
            except (ValueError, KeyError) as exc:
                _bad(summary, line_no, str(exc))
                continue
            yield row


def _bad(summary: ReplaySummary, line_no: int, why: str) -> None:
    summary.bad_rows += 1
    if len(summary.bad_lines) < 20:
        summary.bad_lines.append(line_no)
    log.warning("replay=bad_row line=%d reason=%s", line_no, why)


def meter_type_for(path: Path, kind: str, meter_type: MeterType | None) -> MeterType:
    if meter_type is not None:
        return meter_type
    if kind in ("uci", "ampds-electricity"):
        return MeterType.ELECTRICITY
    name = path.name.lower()
    return MeterType.GAS if "gas" in name or "whg" in name else MeterType.WATER


def replay(
    path: Path,
    emit: Emit,
    device_id: str | None = None,
    meter_type: MeterType | None = None,
    speedup: float = 0.0,
    rebase: bool = False,
    limit: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[ReplaySummary], None] | None = None,
    summary: ReplaySummary | None = None,
) -> ReplaySummary:
    """Send the file's rows as readings; ``speedup`` N plays N times faster than recorded
    (0 = as fast as possible); ``rebase`` shifts the first row to now."""
    kind = detect(path)
    meter_type = meter_type_for(path, kind, meter_type)
    spec = METER_SPECS[meter_type]
    device_id = device_id or f"{spec.id_prefix}-{path.stem.lower()}"
    summary = summary if summary is not None else ReplaySummary()
    rows = _uci_rows(path, summary) if kind == "uci" else _ampds_rows(path, kind, summary)
    started, first, shift = time.monotonic(), None, timedelta(0)
    for row in rows:
        if should_stop() or (limit is not None and summary.sent >= limit):
            break
        summary.rows += 1
        if first is None:
            first = row.at
            shift = datetime.now(UTC) - first if rebase else timedelta(0)
        if speedup > 0:
            delay = (row.at - first).total_seconds() / speedup - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
        at = row.at + shift
        message: dict[str, object] = {
            "device_id": device_id,
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "meter_type": str(meter_type),
        }
        if row.usage is None:
            summary.missing_values += 1
        else:
            message[spec.metric] = round(row.usage, 6)
        if meter_type is MeterType.WATER and row.flow_rate is not None:
            message["flow_rate"] = row.flow_rate
        emit(device_id.encode(), json.dumps(message).encode())
        summary.sent += 1
        if progress and summary.sent % 10_000 == 0:
            progress(summary)
    return summary
