"""Incidents open for meters that keep failing and close when they recover.

The reconciliation runs against MongoDB (mongomock here, a real server with MONGO_URI).
The Kafka provider's trigger that wakes the DAG, and the DAG itself, are in
tests/integration/test_incidents_airflow.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from incidents_helpers import T0, incidents, status

from meterflow.serving.incidents import CLOSED, OPEN, reconcile


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_incident_opens_once_updates_and_clears_on_recovery(db) -> None:
    status(db, "em1", "SENTINEL", 3, T0, since=T0 - timedelta(minutes=30))
    status(db, "em2", "NEGATIVE", 2, T0, since=T0)  # below the threshold of 3
    status(db, "em3", None, 0, T0)

    first = reconcile(db, threshold=3, now=T0)
    assert (first.opened, first.closed, first.open_now) == (1, 0, 1)
    again = reconcile(db, threshold=3, now=T0 + timedelta(minutes=5))
    assert (again.opened, again.updated, again.open_now) == (0, 0, 1)
    [incident] = incidents(db, "em1")
    assert incident["status"] == OPEN and incident["fault_code"] == "SENTINEL"
    assert _utc(incident["opened_at"]) == T0 - timedelta(minutes=30)
    assert incidents(db, "em2") == [] and incidents(db, "em3") == []

    status(db, "em1", "SENTINEL", 7, T0 + timedelta(minutes=20), since=T0 - timedelta(minutes=30))
    assert reconcile(db, threshold=3).updated == 1
    assert incidents(db, "em1")[0]["faults"] == 7

    recovered_at = T0 + timedelta(minutes=40)
    status(db, "em1", None, 0, recovered_at)
    cleared = reconcile(db, threshold=3)
    assert (cleared.closed, cleared.open_now) == (1, 0)
    [closed] = incidents(db, "em1")
    assert closed["status"] == CLOSED and _utc(closed["closed_at"]) == recovered_at
    assert reconcile(db, threshold=3).closed == 0  # nothing left to close

    # A new failure episode is a new incident; the closed one stays as history.
    status(db, "em1", "OUT_OF_RANGE", 4, T0 + timedelta(hours=2), since=T0 + timedelta(hours=1))
    assert reconcile(db, threshold=3).opened == 1
    history = incidents(db, "em1")
    assert [i["status"] for i in history] == [CLOSED, OPEN]
    assert history[1]["fault_code"] == "OUT_OF_RANGE"
