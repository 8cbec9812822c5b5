"""Publishing batch views to MongoDB without Spark: what the loader says before any batch
job ran, and the checks of a day without readings.

MongoDB is mongomock unless MONGO_URI names a server. The loader and checks on views the
real batch job wrote are in tests/integration/test_loader_spark.py.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lake_helpers import D1

from meterflow.batch.views import (
    STATUS_NO_DATA,
    DayReport,
    read_report,
    report_path,
    write_report,
)
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.serving.checks import CheckFailed, check_day
from meterflow.serving.loader import ViewMissingError, publish_day, report_document


def test_load_before_the_batch_job_is_a_clear_error(env: dict[str, str], db: Any) -> None:
    with pytest.raises(ViewMissingError, match="run the batch job"):
        publish_day(Settings.from_env(env).views_path, D1, db)


def _publish_no_data_day(settings: Settings, db: Any) -> None:
    """What the daily job and the loader leave for a day without readings."""
    write_report(settings.views_path, DayReport(day=str(D1), status=STATUS_NO_DATA))
    publish_day(settings.views_path, D1, db)


def _write_registry(settings: Settings, installed_on: list[date | None]) -> None:
    registry = Path(lake.registry_file(settings.lake_path))
    registry.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "device_id": [f"em{n:06d}" for n in range(len(installed_on))],
                "meter_type": ["electricity"] * len(installed_on),
                "installed_on": pa.array(installed_on, pa.date32()),
            }
        ),
        registry,
    )


def test_a_day_without_readings_fails_when_meters_were_registered(
    env: dict[str, str], db: Any
) -> None:
    """Issue: yesterday was published as no_data, green, while the stream had not read it."""
    settings = Settings.from_env(env)
    before, on_the_day, after = D1 - timedelta(days=30), D1, D1 + timedelta(days=1)
    _write_registry(settings, [before, on_the_day, None, after])
    _publish_no_data_day(settings, db)
    with pytest.raises(CheckFailed) as failed:
        check_day(settings.lake_path, D1, db)
    assert str(failed.value) == (
        f"{D1}: no readings for 3 registered meters: the stream has not read that day "
        "(is it running? caught up?); re-run the day once it has"
    )


def test_a_day_without_readings_or_registered_meters_is_no_data(
    env: dict[str, str], db: Any
) -> None:
    settings = Settings.from_env(env)
    _publish_no_data_day(settings, db)
    assert check_day(settings.lake_path, D1, db).status == STATUS_NO_DATA  # no registry at all
    _write_registry(settings, [D1 + timedelta(days=1)])  # installed only after the day
    report = check_day(settings.lake_path, D1, db)
    assert report.status == STATUS_NO_DATA and "no registered meters" in report.notes[0]


def test_a_report_of_an_older_version_still_reads(env: dict[str, str]) -> None:
    """Reports written before ``expected_per_meter`` was dropped (it used the default
    interval for every meter) are read without it."""
    settings = Settings.from_env(env)
    report = DayReport(day=str(D1), status="ok", readings=96, expected_readings=192)
    old = {**json.loads(report.to_json()), "expected_per_meter": 96}
    path = Path(report_path(settings.views_path, D1))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    assert read_report(settings.views_path, D1) == report
    assert "expected_per_meter" not in report_document(report, datetime.now(UTC))
