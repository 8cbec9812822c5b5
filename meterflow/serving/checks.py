"""Checks that a published day is whole and sane: the last task of the daily DAG.

They compare three independent things: the lake (counted again here with pyarrow, only
the files the streaming sink committed), the batch views, and what MongoDB serves.
A failure raises :class:`CheckFailed` with a message that says what disagrees. A day
without readings passes only when the registry expects none: registered meters that all
stayed silent mean the stream has not read the day, not that nothing happened.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from pymongo.database import Database

from meterflow.batch.monthly import month_of
from meterflow.batch.registry import installed_by, read_registry
from meterflow.batch.views import (
    METER_VIEW,
    STATUS_NO_DATA,
    TYPE_VIEW,
    read_report,
    view_path,
)
from meterflow.clients import mongo
from meterflow.core import lake
from meterflow.core.errors import MeterflowError
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import as_date
from meterflow.serving.loader import MONTHLY_TARGETS, TARGETS, month_documents

log = get_logger("meterflow.serving.checks")

SINK_LOG = "_spark_metadata"


class CheckFailed(MeterflowError, AssertionError):  # noqa: N818 (the name the DAGs use)
    """A published day disagrees with its lake or views; the message says how."""

    exit_code = 1


@dataclass
class CheckReport:
    day: str
    status: str
    lake_counts: dict[str, int] = field(default_factory=dict)  # readings per meter type
    documents: dict[str, int] = field(default_factory=dict)  # per collection
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (an Airflow task's return value goes to XCom)."""
        return asdict(self)


def _committed_files(readings: str, day: date) -> list[str] | None:
    """Files of ``date=D`` the streaming sink's log committed, or None when there is no log."""
    fs, root = lake.filesystem_for(readings)
    log_dir = posixpath.join(root, SINK_LOG)
    if fs.get_file_info(log_dir).type == pafs.FileType.NotFound:
        return None
    added: set[str] = set()
    removed: set[str] = set()
    for info in fs.get_file_info(pafs.FileSelector(log_dir)):
        if info.type != pafs.FileType.File or info.base_name.startswith("."):
            continue
        with fs.open_input_stream(info.path) as stream:
            for line in stream.read().decode().splitlines()[1:]:  # line 1 is the version
                entry = json.loads(line)
                (added if entry.get("action", "add") == "add" else removed).add(entry["path"])
    marker = f"/{lake.PARTITION_COLUMN}={day}/"
    return sorted(p for p in added - removed if marker in p)


def _path_of(uri: str) -> str:
    """A sink-log entry (``file:/x``, ``file:///x``, ``s3://b/x``) as a filesystem path."""
    if uri.startswith("file:"):  # Hadoop writes URIs: percent-encoded
        return "/" + unquote(uri.removeprefix("file:")).lstrip("/")
    return lake.filesystem_for(uri)[1]


def lake_counts(lake_path: str, day: date) -> dict[str, int]:
    """Readings per meter type in D's lake partition, counted with pyarrow (not Spark)."""
    readings = lake.readings_path(lake_path)
    fs, root = lake.filesystem_for(readings)
    committed = _committed_files(readings, day)
    if committed is None:
        partition = posixpath.join(root, f"{lake.PARTITION_COLUMN}={day}")
        if fs.get_file_info(partition).type == pafs.FileType.NotFound:
            return {}
        source: str | list[str] = partition
    else:
        # Committed files that retention has deleted since hold no readings any more.
        infos = fs.get_file_info([_path_of(p) for p in committed])
        source = [i.path for i in infos if i.type == pafs.FileType.File]
        if not source:
            return {}
    dataset = pads.dataset(source, filesystem=fs, format="parquet")
    if not dataset.files:
        return {}
    table = dataset.to_table(columns=["meter_type"])
    grouped = table.group_by("meter_type").aggregate([("meter_type", "count")])
    return dict(
        zip(
            grouped.column("meter_type").to_pylist(),
            grouped.column("meter_type_count").to_pylist(),
            strict=True,
        )
    )


def _view_rows(views_root: str, view: str, day: date) -> pa.Table:
    fs, path = lake.filesystem_for(view_path(views_root, view, day))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def check_day(lake_path: str, day: date | str, db: Database[dict[str, Any]]) -> CheckReport:
    """Verify D of the lake at ``lake_path`` against ``db`` end to end; raises
    :class:`CheckFailed` naming the first disagreement."""
    day = as_date(day)
    views_root = lake.views_path(lake_path)
    report = read_report(views_root, day)
    if report is None:
        raise CheckFailed(f"{day}: no batch report under {views_root}")
    result = CheckReport(day=str(day), status=report.status)
    result.lake_counts = lake_counts(lake_path, day)
    published = db[mongo.DAILY_REPORTS].find_one({"_id": str(day)})
    if published is None or published.get("status") != report.status:
        raise CheckFailed(f"{day}: MongoDB's daily report does not say {report.status!r}")

    if report.status == STATUS_NO_DATA:
        if result.lake_counts:
            raise CheckFailed(
                f"{day}: the batch found no data but the lake now holds "
                f"{sum(result.lake_counts.values()):,} readings: re-run the day"
            )
        registered = installed_by(read_registry(lake_path), day).num_rows
        if registered:
            raise CheckFailed(
                f"{day}: no readings for {registered:,} registered meters: the stream has not "
                "read that day (is it running? caught up?); re-run the day once it has"
            )
        result.notes.append(f"{day}: no data in the lake and no registered meters: none expected")
        log.info("check=passed day=%s status=no_data registered_meters=0", day)
        return result

    for view, (collection, _) in TARGETS.items():
        expected = _view_rows(views_root, view, day).num_rows
        found = db[collection].count_documents({"day": str(day)})
        result.documents[collection] = found
        if found != expected:
            raise CheckFailed(
                f"{day}: {collection} holds {found} documents, the {view} view {expected} rows"
            )
        for name in ("avg", "consumption"):
            negative = db[collection].count_documents({"day": str(day), name: {"$lt": 0}})
            if negative:
                raise CheckFailed(
                    f"{day}: {negative} documents of {collection} have a negative {name}"
                )

    month = month_of(day)
    for view, (collection, _) in MONTHLY_TARGETS.items():
        expected = len(month_documents(views_root, view, month))
        found = db[collection].count_documents({"month": month})
        result.documents[collection] = found
        if found != expected:
            raise CheckFailed(
                f"{day}: {collection} holds {found} documents for {month}, the {view} view "
                f"{expected} rows"
            )

    types = _view_rows(views_root, TYPE_VIEW, day)
    in_view = dict(
        zip(
            types.column("meter_type").to_pylist(),
            types.column("reading_count").to_pylist(),
            strict=True,
        )
    )
    served: dict[str, Any] = {
        d["meter_type"]: d.get("reading_count")
        for d in db[mongo.DAILY_TYPE_AVERAGES].find({"day": str(day)})
    }
    expected = result.lake_counts
    if report.mixed_type_meters:
        # Those devices' readings all count under one type: only the total must agree.
        result.notes.append(
            f"{day}: {report.mixed_type_meters} devices reported two meter types; "
            "readings compared in total, not per type"
        )
        in_view, served, expected = (
            {"all types": sum(c.values())} for c in (in_view, served, expected)
        )
    for name, counts in (("the type view", in_view), ("MongoDB", served)):
        if counts != expected:
            raise CheckFailed(
                f"{day}: readings per type in {name} {counts} differ from the lake's {expected}"
            )

    meters = _view_rows(views_root, METER_VIEW, day).column("completeness")
    missing = meters.null_count + db[mongo.DAILY_METER_AVERAGES].count_documents(
        {"day": str(day), "completeness": None}
    )
    if missing:
        raise CheckFailed(f"{day}: {missing} meters have no completeness")
    if pc.any(pc.less(meters, 0)).as_py():
        raise CheckFailed(f"{day}: a meter has a negative completeness")
    log.info("check=passed day=%s readings=%d", day, sum(result.lake_counts.values()))
    return result
