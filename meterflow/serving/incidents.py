"""Incidents: the serving layer's list of failures for people to look at.

Two origins share the ``incidents`` collection:

- ``reading`` (documents older than ``origin`` have none): one per meter and run of
  faulty readings, opened by :func:`reconcile` when a meter keeps failing the stateless
  rules and closed as soon as it reports a good reading again. The state comes from
  MongoDB ``meter_status``, which the sink keeps current from the stream's per-meter
  status updates; :func:`reconcile` only compares it with ``incidents``. It is idempotent
  (an open incident is found by device, its ``_id`` is fixed by the run's start), so the
  alert DAG can run it on every abnormal event and on a timer without opening an incident
  twice or leaving one open after the meter recovered.
- ``rule``: one per episode of a stateful rule (STUCK, SPIKE, LEAK, NO_DATA), written by
  the sink as the episode opens and clears (``_id`` = episode id,
  :mod:`meterflow.serving.sink.writer`). :func:`reconcile` leaves them alone, so a meter
  can have one of each origin open at once.

:func:`auto_close` closes incidents of either origin left open too long.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import UpdateOne
from pymongo.database import Database

from meterflow.clients.mongo import INCIDENTS, METER_STATUS
from meterflow.core.contract import SEVERITY
from meterflow.core.logs import get_logger

log = get_logger(__name__)

OPEN = "open"
CLOSED = "closed"
#: ``origin`` of an incident :func:`reconcile` opened from ``meter_status``.
ORIGIN_READING = "reading"
#: ``origin`` of an incident the sink opened for a stateful rule's episode.
ORIGIN_RULE = "rule"
_SEVERITY_OF = {str(code): severity for code, severity in SEVERITY.items()}


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
    that good reading). Incidents of the stateful rules (``origin`` "rule") are not this
    function's: a meter's open one does not count as its incident here. An incident
    :func:`auto_close` closed stays closed while the same run of faults goes on.
    """
    now = now or datetime.now(UTC)
    failing = {
        s["_id"]: s
        for s in db[METER_STATUS].find(
            {"open_fault": {"$ne": None}, "consecutive_faults": {"$gte": threshold}}
        )
    }
    open_incidents = {
        i["device_id"]: i
        for i in db[INCIDENTS].find({"status": OPEN, "origin": {"$ne": ORIGIN_RULE}})
    }
    recovered = {
        s["_id"]: s
        for s in db[METER_STATUS].find({"_id": {"$in": list(open_incidents)}, "open_fault": None})
    }
    writes: list[UpdateOne] = []
    opened = updated = 0
    new_ids = {
        device: incident_id(
            device, _aware(status.get("fault_since")) or _aware(status.get("last_seen")) or now
        )
        for device, status in failing.items()
        if device not in open_incidents
    }
    # Closed with its run of faults still going on: only auto_close does that.
    auto_closed = {
        doc["_id"]
        for doc in db[INCIDENTS].find({"_id": {"$in": sorted(new_ids.values())}}, {"_id": 1})
    }
    for device, status in failing.items():
        progress = {
            "fault_code": status["open_fault"],
            "severity": _SEVERITY_OF.get(status["open_fault"]),
            "faults": status["consecutive_faults"],
            "last_fault_at": _aware(status.get("last_seen")),
            "updated_at": now,
        }
        incident = open_incidents.get(device)
        if incident is None:
            if new_ids[device] in auto_closed:
                continue
            since = _aware(status.get("fault_since")) or _aware(status.get("last_seen")) or now
            writes.append(
                UpdateOne(
                    {"_id": new_ids[device]},
                    {
                        "$setOnInsert": {
                            "device_id": device,
                            "meter_type": status.get("meter_type"),
                            "status": OPEN,
                            "opened_at": since,
                            "closed_at": None,
                            "origin": ORIGIN_READING,
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


def auto_close(db: Database[dict[str, Any]], max_open: timedelta, now: datetime) -> int:
    """Close every incident (either origin) opened more than ``max_open`` before ``now``.

    An incident nobody closes (a clearing lost upstream, a meter never seen again) would
    stay on the open list for good. ``max_open`` of zero or less closes nothing. Returns
    how many were closed; each is logged. ``opened_at`` is the fault's event time, so a
    backfill of old data has its incidents closed at the next run.
    """
    if max_open <= timedelta(0):
        return 0
    hours = max_open.total_seconds() / 3600
    reason = f"auto-closed after {hours:g} h"
    closed = 0
    for incident in db[INCIDENTS].find(
        {"status": OPEN, "opened_at": {"$lt": now - max_open}},
        {"device_id": 1, "fault_code": 1, "opened_at": 1},
    ):
        done = db[INCIDENTS].update_one(
            {"_id": incident["_id"], "status": OPEN},
            {
                "$set": {
                    "status": CLOSED,
                    "closed_at": now,
                    "close_reason": reason,
                    "auto_closed_at": now,
                    "updated_at": now,
                }
            },
        )
        if not done.modified_count:  # closed meanwhile (a clearing, a recovery)
            continue
        closed += 1
        opened_at = _aware(incident.get("opened_at"))
        log.info(
            "incident=auto-closed id=%s device=%s code=%s opened_at=%s hours=%.1f",
            incident["_id"],
            incident.get("device_id"),
            incident.get("fault_code"),
            opened_at.isoformat() if opened_at else None,
            (now - opened_at).total_seconds() / 3600 if opened_at else float("nan"),
        )
    return closed
