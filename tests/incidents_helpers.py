"""Meter status and incident documents for the incident tests (tests/unit/test_incidents.py,
tests/integration/test_incidents_airflow.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from meterflow.clients import mongo

T0 = datetime(2024, 6, 2, 8, 0, tzinfo=UTC)


def status(db, device: str, fault: str | None, run: int, seen: datetime, since=None) -> None:
    db[mongo.METER_STATUS].replace_one(
        {"_id": device},
        {
            "device_id": device,
            "meter_type": "electricity",
            "last_seen": seen,
            "open_fault": fault,
            "fault_since": since,
            "consecutive_faults": run,
            "fault_count": run,
        },
        upsert=True,
    )


def incidents(db, device: str) -> list[dict]:
    return sorted(db[mongo.INCIDENTS].find({"device_id": device}), key=lambda i: i["opened_at"])
