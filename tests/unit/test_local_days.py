"""Days cut at local midnight; a reading's timestamp ends its interval (docs/architecture.md,
"Days")."""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pytest
from helpers import kafka_records

from meterflow.batch.daily import meter_view
from meterflow.core import timestamps
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import LocalClock, day_seconds, parse_timestamp_us, reading_days
from meterflow.stream.classify import classify_batch

PARIS = "Europe/Paris"


def days(*stamps: str, zone: str) -> list[str]:
    micros = np.array([parse_timestamp_us(s) for s in stamps], dtype=np.int64)
    epoch = date(1970, 1, 1).toordinal()
    return [str(date.fromordinal(epoch + int(d))) for d in reading_days(micros, zone)]


def test_the_midnight_reading_closes_the_day_before() -> None:
    assert days(
        "2024-05-27T23:45:00Z", "2024-05-28T00:00:00Z", "2024-05-28T00:00:01Z", zone="UTC"
    ) == [
        "2024-05-27",
        "2024-05-27",
        "2024-05-28",
    ]
    # Paris is UTC+2 in May: its midnight is 22:00 UTC the evening before.
    assert days(
        "2024-05-27T21:59:00Z", "2024-05-27T22:00:00Z", "2024-05-27T22:15:00Z", zone=PARIS
    ) == [
        "2024-05-27",
        "2024-05-27",
        "2024-05-28",
    ]


@pytest.mark.parametrize(
    ("day", "seconds"),
    [(date(2024, 3, 31), 23 * 3600), (date(2024, 10, 27), 25 * 3600), (date(2024, 6, 1), 86_400)],
)
def test_dst_days_are_an_hour_shorter_or_longer(day: date, seconds: int) -> None:
    assert day_seconds(day, PARIS) == seconds
    assert day_seconds(day, "UTC") == 86_400


def test_a_dst_day_expects_92_or_100_quarter_hours() -> None:
    aggregated = pa.table(
        {
            "device_id": ["em1"],
            "meter_type": ["electricity"],
            "total": [1.0],
            "min": [0.1],
            "max": [0.2],
            "reading_count": [92],
            "good_count": [92],
            "faulty_count": [0],
        }
    )
    registry = pa.table(
        {
            "device_id": pa.array(["em1"]),
            "meter_type": pa.array(["electricity"]),
            "district": pa.array(["north"]),
            "installed_on": pa.array([None], pa.date32()),
            "interval_seconds": pa.array([900], pa.int64()),
        }
    )
    spring = meter_view(aggregated, registry, date(2024, 3, 31), 900, PARIS)
    autumn = meter_view(aggregated, registry, date(2024, 10, 27), 900, PARIS)
    assert spring["expected_count"].to_pylist() == [92]
    assert spring["completeness"].to_pylist() == [1.0]
    assert autumn["expected_count"].to_pylist() == [100]


def test_the_stream_files_readings_under_local_days() -> None:
    readings = [
        b'{"device_id": "em1", "timestamp": "2024-05-27T22:00:00Z", "usage_kwh": 1}',
        b'{"device_id": "em1", "timestamp": "2024-05-27T22:15:00Z", "usage_kwh": 1}',
    ]
    now = parse_timestamp_us("2024-05-28T00:00:00Z")
    batch = kafka_records(list(readings), now)
    paris = classify_batch(batch, Rules(), now_us=now, zone_name=PARIS).classified
    utc = classify_batch(batch, Rules(), now_us=now).classified
    assert [str(d) for d in paris.column("date").to_pylist()] == ["2024-05-27", "2024-05-28"]
    assert [str(d) for d in utc.column("date").to_pylist()] == ["2024-05-27", "2024-05-27"]


def test_local_clock_follows_dst() -> None:
    clock = LocalClock(PARIS)
    winter = parse_timestamp_us("2024-01-15T12:00:00Z")
    summer = parse_timestamp_us("2024-07-15T12:00:00Z")
    assert (clock(winter) - winter, clock(summer) - summer) == (3600 * 10**6, 7200 * 10**6)
    assert LocalClock()(summer) == summer


def test_a_wrong_zone_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"METERFLOW_TIMEZONE": "Europe/Pariss"})
    assert str(caught.value) == (
        "METERFLOW_TIMEZONE='Europe/Pariss' is not an IANA time zone name (for example UTC, "
        "Europe/Paris, America/New_York)"
    )
    assert Settings.from_env({}).timezone == timestamps.UTC_NAME
