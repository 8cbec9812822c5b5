"""Batch views in the lake: their names, paths and the per-day report.

The daily job (meterflow.batch.daily) writes ``<views>/<view>/date=D/`` and
``<views>/_reports/date=D.json``; the loader and the checks read them. This module is the
one home of that layout, and it needs no Spark.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import date

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from meterflow.core.lake import filesystem_for, write_atomically

METER_VIEW = "meter_daily"
TYPE_VIEW = "type_daily"
DISTRICT_VIEW = "district_daily"
#: Per meter and day, its validated consumption per local hour: one row holding the day's
#: 23, 24 or 25 hours, not one row per hour (a city's fleet would make that 24M a day).
HOURLY_VIEW = "meter_hourly"
VIEWS: tuple[str, ...] = (METER_VIEW, TYPE_VIEW, DISTRICT_VIEW, HOURLY_VIEW)
#: Month to date per meter and per district and type (meterflow.batch.monthly), under
#: ``<views>/<view>/month=YYYY-MM/``.
METER_MONTHLY_VIEW = "meter_monthly"
DISTRICT_MONTHLY_VIEW = "district_monthly"
MONTHLY_VIEWS: tuple[str, ...] = (METER_MONTHLY_VIEW, DISTRICT_MONTHLY_VIEW)
#: The per-meter columns the validation adds to ``meter_daily``, which types, districts and
#: months sum (with the estimated part of the consumption, for their estimated share).
COUNTED_COLUMNS = (
    "consumption",
    "measured_intervals",
    "estimated_intervals",
    "missing_intervals",
    "duplicate_readings",
)
REPORTS_DIR = "_reports"
STATUS_OK = "ok"
STATUS_NO_DATA = "no_data"
#: District of readings whose meter the registry does not know: kept and counted, never dropped.
UNKNOWN_DISTRICT = "unknown"


@dataclass(frozen=True)
class DayReport:
    """What the job found for one day; the loader and the checks start from it."""

    day: str
    status: str  # STATUS_OK or STATUS_NO_DATA
    readings: int = 0
    good: int = 0
    faulty: int = 0
    meters: int = 0  # in the views: those that reported and registered silent ones
    #: Readings those meters should have sent, each at its own interval (the registry's
    #: ``interval_seconds``; the default interval where it gives none).
    expected_readings: int = 0
    duration_seconds: float = 0.0
    views: dict[str, int] = field(default_factory=dict)  # rows per view
    silent_meters: int = 0  # registered meters with no reading that day (completeness 0)
    mixed_type_meters: int = 0  # devices whose readings disagree on their meter type
    #: The lake's ledger when the job read the day: a later entry that added readings to
    #: the day makes it late (meterflow.batch.late).
    ledger_seq: int = 0
    #: For a day run again: ``consumption_before``, ``consumption_after``, ``readings_added``.
    changes: dict[str, float] = field(default_factory=dict)
    #: Days with late readings the job ran again before this one (their reports say how).
    reran: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DayReport:
        """Fields a report of an older version has and this one dropped are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


# --- paths ----------------------------------------------------------------------------------


def view_path(views_root: str, view: str, day: date | str) -> str:
    return f"{views_root.rstrip('/')}/{view}/date={day}"


def month_view_path(views_root: str, view: str, month: str) -> str:
    return f"{views_root.rstrip('/')}/{view}/month={month}"


def read_partition(path: str) -> pa.Table | None:
    """One view's partition (a day's or a month's) as written; None when there is none."""
    fs, local = filesystem_for(path)
    try:
        return pads.dataset(local, filesystem=fs, format="parquet").to_table()
    except FileNotFoundError:
        return None


def report_path(views_root: str, day: date | str) -> str:
    return f"{views_root.rstrip('/')}/{REPORTS_DIR}/date={day}.json"


def read_report(views_root: str, day: date | str) -> DayReport | None:
    """The day's report, or None when the job has not run for it."""
    fs, path = filesystem_for(report_path(views_root, day))
    try:
        with fs.open_input_stream(path) as stream:
            return DayReport.from_json(stream.read().decode())
    except FileNotFoundError:
        return None


def write_report(views_root: str, report: DayReport) -> None:
    """Temp file then move, so a reader never sees half a report."""
    fs, path = filesystem_for(report_path(views_root, report.day))
    write_atomically(fs, path, report.to_json().encode())


def remove_report(views_root: str, day: date) -> None:
    fs, path = filesystem_for(report_path(views_root, day))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def exists(path: str) -> bool:
    fs, local = filesystem_for(path)
    return bool(fs.get_file_info(local).type != pafs.FileType.NotFound)


def remove_views(views_root: str, day: date) -> None:
    for view in VIEWS:
        fs, path = filesystem_for(view_path(views_root, view, day))
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
