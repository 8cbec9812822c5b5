"""Incidents: one per meter and failure episode, opened when a meter keeps failing and
closed as soon as it reports a good reading again.

The state comes from MongoDB ``meter_status``, which the sink keeps current from the
stream's per-meter status updates; this module only compares it with ``incidents``. It
is idempotent (an open incident is found by device, its ``_id`` is fixed by the episode's
start), so the alert DAG can run it on every abnormal event and on a timer without
opening an incident twice or leaving one open after the meter recovered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.database import Database

from meterflow.clients.mongo import INCIDENTS, METER_STATUS

OPEN = "open"
CLOSED = "closed"


@dataclass(frozen=True)
class IncidentReport:
    opened: int
    updated: int
    closed: int
    open_now: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def incident_id(device_id: str, since: datetime) -> str:
    return f"{device_id}|{since.astimezone(UTC).isoformat()}"


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # mongomock and some servers drop tz
        return value.replace(tzinfo=UTC)
    return value


def reconcile(
    db: Database[dict[str, Any]], threshold: int, now: datetime | None = None
) -> IncidentReport:
    """Open, update and close incidents so they match ``meter_status`` now.

    A meter whose latest ``threshold`` or more readings were faulty has an open incident;
    a meter whose latest reading was good has none (its incident closes at the time of
    that good reading).
    """
    now = now or datetime.now(UTC)
    failing = {
        s["_id"]: s
        for s in db[METER_STATUS].find(
            {"open_fault": {"$ne": None}, "consecutive_faults": {"$gte": threshold}}
        )
    }
    open_incidents = {i["device_id"]: i for i in db[INCIDENTS].find({"status": OPEN})}
    recovered = {
        s["_id"]: s
        for s in db[METER_STATUS].find({"_id": {"$in": list(open_incidents)}, "open_fault": None})
    }
    writes: list[UpdateOne] = []
    opened = updated = 0
    for device, status in failing.items():
        progress = {
            "fault_code": status["open_fault"],
            "faults": status["consecutive_faults"],
            "last_fault_at": _aware(status.get("last_seen")),
            "updated_at": now,
        }
        incident = open_incidents.get(device)
        if incident is None:
            since = _aware(status.get("fault_since")) or _aware(status.get("last_seen")) or now
            writes.append(
                UpdateOne(
                    {"_id": incident_id(device, since)},
                    {
                        "$setOnInsert": {
                            "device_id": device,
                            "meter_type": status.get("meter_type"),
                            "status": OPEN,
                            "opened_at": since,
                            "closed_at": None,
                        },
                        "$set": progress,
                    },
                    upsert=True,
                )
            )
            opened += 1
        elif (
            incident.get("faults") != progress["faults"]
            or incident.get("fault_code") != progress["fault_code"]
        ):
            writes.append(UpdateOne({"_id": incident["_id"]}, {"$set": progress}))
            updated += 1
    for device, status in recovered.items():
        writes.append(
            UpdateOne(
                {"_id": open_incidents[device]["_id"], "status": OPEN},
                {
                    "$set": {
                        "status": CLOSED,
                        "closed_at": _aware(status.get("last_seen")) or now,
                        "updated_at": now,
                    }
                },
            )
        )
    if writes:
        db[INCIDENTS].bulk_write(writes, ordered=False)
    open_now = len(open_incidents) - len(recovered) + opened
    return IncidentReport(opened, updated, len(recovered), open_now)
