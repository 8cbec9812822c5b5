"""Publish one day's batch views to MongoDB (the serving layer).

Spark jobs never write MongoDB (docs/architecture.md, "Measured facts behind the choices"):
the daily job leaves Parquet views and a report in the lake, and this loader upserts them
with bulk writes. Publishing is idempotent and replaces the day: every document of D is
written whole (``ReplaceOne``, upsert), and D's documents that the views no longer hold
are deleted afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from itertools import islice
from typing import Any, TypeVar

from pymongo import ReplaceOne
from pymongo.collection import Collection
from pymongo.database import Database

from meterflow.batch.monthly import month_of
from meterflow.batch.views import (
    DISTRICT_MONTHLY_VIEW,
    DISTRICT_VIEW,
    HOURLY_VIEW,
    METER_MONTHLY_VIEW,
    METER_VIEW,
    STATUS_NO_DATA,
    TYPE_VIEW,
    DayReport,
    month_view_path,
    read_partition,
    read_report,
    view_path,
)
from meterflow.clients import mongo
from meterflow.core.errors import MeterflowError
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import as_date

log = get_logger("meterflow.serving.loader")

BATCH_SIZE = 1000
_T = TypeVar("_T")

#: Collection of each view and the view columns that make a document's ``_id`` after the day.
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    METER_VIEW: (mongo.DAILY_METER_AVERAGES, ("device_id",)),
    TYPE_VIEW: (mongo.DAILY_TYPE_AVERAGES, ("meter_type",)),
    DISTRICT_VIEW: (mongo.DAILY_DISTRICT_AVERAGES, ("district", "meter_type")),
    HOURLY_VIEW: (mongo.METER_HOURLY_PROFILES, ("device_id",)),
}
#: The month-to-date views: one document per month and key, replaced as the month grows.
MONTHLY_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    METER_MONTHLY_VIEW: (mongo.MONTHLY_METER_TOTALS, ("device_id",)),
    DISTRICT_MONTHLY_VIEW: (mongo.MONTHLY_DISTRICT_TOTALS, ("district", "meter_type")),
}


class ViewMissingError(MeterflowError):
    """The day's batch job has not run (or its views are gone): nothing to publish."""


@dataclass
class LoadReport:
    day: str
    status: str
    upserted: dict[str, int] = field(default_factory=dict)  # documents written per collection
    deleted: dict[str, int] = field(default_factory=dict)  # stale documents of the day removed

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (an Airflow task's return value goes to XCom)."""
        return asdict(self)


def midnight(day: date) -> datetime:
    """The day as a UTC datetime (MongoDB has no date-only type)."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def document_id(day: date | str, *parts: str) -> str:
    """``"<YYYY-MM-DD>|<part>|..."``: one document per day and key."""
    return "|".join([str(day), *parts])


def _clean(value: Any) -> Any:
    """NaN (an average of no good reading) is stored as null, like a missing value."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _rows(uri: str) -> list[dict[str, Any]] | None:
    """The rows of one view's partition at ``uri``; None when it is missing."""
    table = read_partition(uri)
    return None if table is None else table.to_pylist()


def view_documents(views_root: str, view: str, day: date) -> list[dict[str, Any]]:
    """The view's rows for D as MongoDB documents (``_id``, ``date``, ``day`` added)."""
    _, keys = TARGETS[view]
    path = view_path(views_root, view, day)
    rows = _rows(path)
    if rows is None:
        raise ViewMissingError(f"view {view} of {day} is missing at {path}: run the batch job")
    stamp = midnight(day)
    return [
        {
            "_id": document_id(day, *(row[k] for k in keys)),
            "date": stamp,
            "day": str(day),
            **{name: _clean(value) for name, value in row.items()},
        }
        for row in rows
    ]


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def month_documents(views_root: str, view: str, month: str) -> list[dict[str, Any]]:
    """The month view's rows as MongoDB documents (``_id`` = month and keys, ``month``)."""
    _, keys = MONTHLY_TARGETS[view]
    rows = _rows(month_view_path(views_root, view, month)) or []
    return [
        {
            "_id": document_id(month, *(row[k] for k in keys)),
            **{name: _clean(value) for name, value in row.items()},
        }
        for row in rows
    ]


def replace_day(
    collection: Collection[dict[str, Any]],
    day: date | str,
    documents: list[dict[str, Any]],
    scope: str = "day",
) -> tuple[int, int]:
    """Upsert ``documents`` in unordered batches, then delete the others whose ``scope``
    field (the day, or the month) is ``day``; (written, deleted)."""
    for chunk in _chunks(documents, BATCH_SIZE):
        collection.bulk_write(
            [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in chunk], ordered=False
        )
    keep = {d["_id"] for d in documents}
    stale = [
        d["_id"] for d in collection.find({scope: str(day)}, {"_id": 1}) if d["_id"] not in keep
    ]
    deleted = 0
    for chunk in _chunks(stale, BATCH_SIZE):
        deleted += collection.delete_many({"_id": {"$in": chunk}}).deleted_count
    return len(documents), deleted


def report_document(report: DayReport, loaded_at: datetime) -> dict[str, Any]:
    day = date.fromisoformat(report.day)
    return {
        "_id": report.day,
        "date": midnight(day),
        "day": report.day,
        "status": report.status,
        "readings": report.readings,
        "good": report.good,
        "faulty": report.faulty,
        "meters": report.meters,
        "silent_meters": report.silent_meters,
        "mixed_type_meters": report.mixed_type_meters,
        "expected_readings": report.expected_readings,
        "views": report.views,
        "changes": report.changes,
        "reran": report.reran,
        "job_seconds": report.duration_seconds,
        "loaded_at": loaded_at,
    }


def publish_day(views_root: str, day: date | str, db: Database[dict[str, Any]]) -> LoadReport:
    """Publish D's views (under ``views_root``) and report to ``db``; a no_data day clears
    D's documents and writes its report.

    Raises :class:`ViewMissingError` when the batch job has not run for D.
    """
    day = as_date(day)
    report = read_report(views_root, day)
    if report is None:
        raise ViewMissingError(f"no batch report for {day} under {views_root}: run the batch job")
    result = LoadReport(day=str(day), status=report.status)
    for view, (collection, _) in TARGETS.items():
        documents = [] if report.status == STATUS_NO_DATA else view_documents(views_root, view, day)
        written, deleted = replace_day(db[collection], day, documents)
        result.upserted[collection] = written
        result.deleted[collection] = deleted
    month = month_of(day)
    for view, (collection, _) in MONTHLY_TARGETS.items():
        documents = month_documents(views_root, view, month)
        written, deleted = replace_day(db[collection], month, documents, scope="month")
        result.upserted[collection] = written
        result.deleted[collection] = deleted
    db[mongo.DAILY_REPORTS].replace_one(
        {"_id": report.day}, report_document(report, datetime.now(UTC)), upsert=True
    )
    result.upserted[mongo.DAILY_REPORTS] = 1
    log.info(
        "load=%s day=%s upserted=%s deleted=%s", report.status, day, result.upserted, result.deleted
    )
    return result


def days_to_publish(views_root: str, day: date | str) -> list[str]:
    """D and the late days its run ran again (its report's ``reran``), oldest first."""
    report = read_report(views_root, as_date(day))
    return [*(report.reran if report else []), str(as_date(day))]
