"""Replay real recordings as contract messages (``meterflow replay FILE``).

The format is recognised from the header line:

* **UCI** "Individual household electric power consumption"
  (``household_power_consumption.txt``): ``Date;Time;Global_active_power;...``, one row a
  minute, ``?`` for a missing value. ``Global_active_power`` is the minute's average
  power in kW, so the minute's reading is ``usage_kwh = kW / 60``. Its times are the
  house's local clock without a zone; the contract reads naive times as UTC, and so does
  the replay.
* **AMPds2 electricity** (``unix_ts`` or ``TS``, then ``V, I, f, DPF, APF, P, Pt, ...``):
  a row per minute. ``P`` is the minute's real power in W, so
  ``usage_kwh = P / 1000 / 60``. ``Pt`` (cumulative real energy, kWh) is used only when a
  file has no ``P``: its resolution is too coarse for one minute. Then the reading is
  ``Pt``'s increase since the previous row.
* **AMPds2 water and natural gas** (``unix_ts, counter, avg_rate, inst_rate``): ``counter``
  is the meter's cumulative volume, litres for water and dm3 for gas (as the AMPds2 data
  descriptor gives them). A reading is the counter's increase since the previous row with
  a counter (``usage`` in L; ``usage_m3`` = dm3 / 1000), and a water reading's
  ``flow_rate`` is that increase over the minutes it took (L/min), so the two agree.
  ``avg_rate`` and ``inst_rate`` are not used: the counter's difference needs no unit
  guess. The first row only sets the baseline (it is counted, not sent). A counter that
  goes backwards gives a negative reading, which the pipeline flags: that is the
  recording's anomaly, not the replay's. Water or gas is told by ``meter_type`` or the file
  name (``gas``, ``WHG``, ``FRG`` mean gas; ``water``, ``WHW``, ``HTW``, ``DWW`` water).

A file whose name ends in ``.gz`` is read through gzip (the excerpts in ``tests/data/real``).

A missing value (``?``, empty, ``NaN``) becomes a reading *without* its metric, which the
pipeline flags as ``MISSING_METRIC``. A row that cannot be read (wrong column count, bad
date, a number that is not one) is reported with its line number, counted and skipped.
Nothing in a file stops a replay.
"""

from __future__ import annotations

import gzip
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from meterflow.core.contract import METER_SPECS, MeterType
from meterflow.core.logs import get_logger
from meterflow.core.messages import ReadingMessage, encode
from simulator.generator import Emit, Stopper, StopSignal, format_stamp

log = get_logger("simulator.replay")

UCI_HEADER = "Date;Time;Global_active_power"
UCI_COLUMNS = 9
AMPDS_TIME_COLUMNS = ("unix_ts", "ts")
GAS_NAMES = ("gas", "whg", "frg")
WATER_NAMES = ("water", "whw", "htw", "dww")
MISSING = frozenset({"", "?", "nan", "na", "null", "none"})
#: AMPds2 rows are one minute apart; a minute's power gives that minute's energy.
ROW_MINUTES = 1.0
DM3_PER_M3 = 1000.0
VALUE_DECIMALS = 6
#: How many bad rows the summary lists (all are counted and logged).
LISTED_BAD_ROWS = 20
PROGRESS_EVERY_ROWS = 1000


class ReplayError(ValueError):
    """The file cannot be replayed at all; the message says what was expected."""


@dataclass
class ReplaySummary:
    """What a replay read and sent. ``rows == sent + baseline_rows + bad_rows`` unless stopped."""

    rows: int = 0  # data lines read (header and blank lines aside)
    sent: int = 0
    missing_values: int = 0  # readings sent without their metric
    baseline_rows: int = 0  # counter rows that only set the starting value
    bad_rows: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # the first few
    first_event: str | None = None
    last_event: str | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Row:
    """One recording row as a reading: ``usage is None`` means the value was missing."""

    at_s: int  # epoch seconds, UTC
    usage: float | None
    flow_rate: float | None = None


def _number(text: str) -> float | None:
    """A cell's value; None when the recording marks it missing. Raises ValueError."""
    cell = text.strip()
    if cell.lower() in MISSING:
        return None
    value = float(cell)
    return None if math.isnan(value) else value


#: A numbered row: a reading, why it is bad (text), or None for a counter's baseline row.
RowOrBad = tuple[int, Row | str | None]


@dataclass(frozen=True)
class Layout:
    """A recognised file: its format, the meter type it holds and its column names."""

    kind: str  # "uci", "ampds-electricity" or "ampds-counter"
    meter_type: MeterType
    columns: tuple[str, ...]


def _open_text(path: Path) -> TextIO:
    """The file as text; gzipped when its name ends in ``.gz`` (recordings compress 5-6x)."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return path.open(encoding="utf-8-sig", errors="replace")


def detect(path: Path, meter_type: MeterType | None = None) -> Layout:
    """Recognise the file from its header; raise :class:`ReplayError` if it is neither."""
    try:
        with _open_text(path) as handle:
            header = handle.readline().strip()
    except (OSError, EOFError) as exc:
        raise ReplayError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    columns = tuple(c.strip().lower() for c in header.split(","))
    if header.startswith(UCI_HEADER):
        layout = Layout("uci", MeterType.ELECTRICITY, tuple(header.split(";")))
    elif columns[0] in AMPDS_TIME_COLUMNS and "counter" in columns:
        layout = Layout("ampds-counter", meter_type or _water_or_gas(path), columns)
    elif columns[0] in AMPDS_TIME_COLUMNS and ("p" in columns or "pt" in columns):
        layout = Layout("ampds-electricity", MeterType.ELECTRICITY, columns)
    else:
        raise ReplayError(
            f"{path.name}: header {header[:60]!r} is neither UCI ({UCI_HEADER};...) nor an "
            "AMPds2 export (unix_ts,...,P,... or unix_ts,counter,avg_rate,inst_rate)"
        )
    fits = (
        (MeterType.WATER, MeterType.GAS) if layout.kind == "ampds-counter" else (layout.meter_type,)
    )
    if meter_type is not None and meter_type not in fits:
        raise ReplayError(f"{path.name} records {' or '.join(fits)}, not {meter_type}")
    return layout


def _water_or_gas(path: Path) -> MeterType:
    name = path.name.lower()
    if any(word in name for word in GAS_NAMES):
        return MeterType.GAS
    if any(word in name for word in WATER_NAMES):
        return MeterType.WATER
    raise ReplayError(f"{path.name}: cannot tell water from gas by the name; give the meter type")


def _uci_rows(lines: Iterator[tuple[int, str]], _layout: Layout) -> Iterator[RowOrBad]:
    for line_no, line in lines:
        parts = line.split(";")
        if len(parts) != UCI_COLUMNS:
            yield line_no, f"{len(parts)} columns, expected {UCI_COLUMNS}"
            continue
        try:
            day, month, year = (int(x) for x in parts[0].split("/"))
            hour, minute, second = (int(x) for x in parts[1].split(":"))
            at = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
            power_kw = _number(parts[2])
        except ValueError as exc:
            yield line_no, f"unreadable date, time or power ({exc})"
            continue
        usage = None if power_kw is None else power_kw * ROW_MINUTES / 60
        yield line_no, Row(int(at.timestamp()), usage)


def _ampds_column(
    lines: Iterator[tuple[int, str]], layout: Layout, column: str
) -> Iterator[tuple[int, tuple[int, float | None] | str]]:
    """Each AMPds2 row's time and one column's value, or why the row cannot be read."""
    width, position = len(layout.columns), layout.columns.index(column)
    for line_no, line in lines:
        parts = line.split(",")
        if len(parts) != width:
            yield line_no, f"{len(parts)} columns, expected {width}"
            continue
        try:
            yield line_no, (int(float(parts[0])), _number(parts[position]))
        except ValueError as exc:
            yield line_no, f"unreadable time or {column} ({exc})"


def _ampds_power_rows(lines: Iterator[tuple[int, str]], layout: Layout) -> Iterator[RowOrBad]:
    """AMPds2 electricity with ``P``: the minute's mean power makes the minute's energy."""
    for line_no, read in _ampds_column(lines, layout, "p"):
        if isinstance(read, str):
            yield line_no, read
            continue
        at_s, watts = read
        yield line_no, Row(at_s, None if watts is None else watts / 1000 * ROW_MINUTES / 60)


def _ampds_counter_rows(lines: Iterator[tuple[int, str]], layout: Layout) -> Iterator[RowOrBad]:
    """AMPds2 cumulative counters (water, gas, or electricity ``Pt``): readings are increases."""
    column = "counter" if "counter" in layout.columns else "pt"
    previous: tuple[int, float] | None = None  # (time, value) of the last counter read
    for line_no, read in _ampds_column(lines, layout, column):
        if isinstance(read, str):
            yield line_no, read
            continue
        at_s, counter = read
        if counter is None:
            yield line_no, Row(at_s, None)
        elif previous is None:
            yield line_no, None
        else:
            increase = counter - previous[1]
            minutes = max((at_s - previous[0]) / 60, ROW_MINUTES)
            if layout.meter_type is MeterType.WATER:
                yield line_no, Row(at_s, increase, increase / minutes)
            elif layout.meter_type is MeterType.GAS:
                yield line_no, Row(at_s, increase / DM3_PER_M3)
            else:
                yield line_no, Row(at_s, increase)
        if counter is not None:
            previous = (at_s, counter)


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered data lines after the header; blank lines are skipped."""
    with _open_text(path) as handle:
        next(handle, None)
        for line_no, line in enumerate(handle, start=2):
            text = line.strip()
            if text:
                yield line_no, text


def default_device_id(path: Path, meter_type: MeterType) -> str:
    """The type's id prefix and the file name: ``em-household-power-consumption``."""
    stem = path.with_suffix("").stem if path.suffix.lower() == ".gz" else path.stem
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "replay"
    return f"{METER_SPECS[meter_type].id_prefix}-{slug}"


def replay(
    path: Path,
    emit: Emit,
    *,
    device_id: str | None = None,
    meter_type: MeterType | None = None,
    speedup: float = 0.0,
    rebase: bool = False,
    limit: int | None = None,
    should_stop: StopSignal | None = None,
    progress: Callable[[ReplaySummary], None] | None = None,
    summary: ReplaySummary | None = None,
) -> ReplaySummary:
    """Send ``path``'s rows as readings of one meter; return what was read and sent.

    ``speedup`` N plays N times faster than recorded (0: as fast as possible); ``rebase``
    moves the first row to now and the others by the same amount. ``limit`` caps the
    messages sent. Raises :class:`ReplayError` only when the file is not replayable at all.
    """
    layout = detect(path, meter_type)
    spec = METER_SPECS[layout.meter_type]
    device_id = device_id or default_device_id(path, layout.meter_type)
    key = device_id.encode()
    summary = summary if summary is not None else ReplaySummary()
    stopper = Stopper(should_stop)
    lines = _data_lines(path)
    rows = {
        "uci": _uci_rows,
        "ampds-electricity": _ampds_power_rows if "p" in layout.columns else _ampds_counter_rows,
        "ampds-counter": _ampds_counter_rows,
    }[layout.kind](lines, layout)
    started = time.monotonic()
    first_at: int | None = None
    shift_s = 0
    for line_no, row in rows:
        if stopper.requested() or (limit is not None and summary.sent >= limit):
            break
        summary.rows += 1
        if isinstance(row, str):
            _bad_row(summary, path, line_no, row)
            continue
        if row is None:
            summary.baseline_rows += 1
            continue
        if first_at is None:
            first_at = row.at_s
            shift_s = int(time.time()) - first_at if rebase else 0
        if speedup > 0:
            stopper.wait_until(started + (row.at_s - first_at) / speedup)
        stamp = format_stamp(row.at_s + shift_s)
        message = ReadingMessage(
            device_id=device_id, timestamp=stamp, meter_type=str(layout.meter_type)
        )
        if row.usage is None:
            summary.missing_values += 1
        else:
            setattr(message, spec.metric, round(row.usage, VALUE_DECIMALS))
            if row.flow_rate is not None:
                message.flow_rate = round(row.flow_rate, VALUE_DECIMALS)
        emit(key, encode(message))
        summary.sent += 1
        summary.first_event = summary.first_event or stamp
        summary.last_event = stamp
        if progress is not None and summary.rows % PROGRESS_EVERY_ROWS == 0:
            summary.elapsed_s = time.monotonic() - started
            progress(summary)
    summary.elapsed_s = time.monotonic() - started
    return summary


def _bad_row(summary: ReplaySummary, path: Path, line_no: int, reason: str) -> None:
    summary.bad_rows += 1
    if len(summary.bad_lines) < LISTED_BAD_ROWS:
        summary.bad_lines.append((line_no, reason))
    log.warning("replay=bad_row file=%s line=%d reason=%r", path.name, line_no, reason)
