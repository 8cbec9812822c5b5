"""Incidents open for meters that keep failing and close when they recover.

The reconciliation runs against MongoDB (mongomock here, a real server with MONGO_URI).
The Kafka provider's trigger that wakes the DAG, and the DAG itself, are in
tests/integration/test_incidents_airflow.py.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from incidents_helpers import T0, incidents, status

from meterflow.clients import mongo
from meterflow.serving.incidents import (
    CLOSED,
    OPEN,
    ORIGIN_READING,
    ORIGIN_RULE,
    auto_close,
    reconcile,
)
from meterflow.serving.indexes import ensure_indexes


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


def rule_incident(db, device: str, code: str, opened_at: datetime, **fields) -> str:
    """An open incident as the sink writes it for a stateful rule's episode."""
    start_us = int(opened_at.timestamp() * 1_000_000)
    episode = f"{device}|{code}|{start_us}"
    db[mongo.INCIDENTS].insert_one(
        {
            "_id": episode,
            "episode_id": episode,
            "device_id": device,
            "meter_type": "electricity",
            "fault_code": code,
            "origin": ORIGIN_RULE,
            "status": OPEN,
            "opened_at": opened_at,
            "closed_at": None,
            **fields,
        }
    )
    return episode


def test_reconcile_leaves_rule_incidents_alone(db) -> None:
    ensure_indexes(db, 0)  # one open per meter holds for stateless ones; no TTL (2024 dates)
    stuck = rule_incident(db, "em1", "STUCK", T0 - timedelta(hours=2))
    silent = rule_incident(db, "em1", "NO_DATA", T0 - timedelta(hours=1))
    status(db, "em1", "SENTINEL", 3, T0, since=T0 - timedelta(minutes=30))

    first = reconcile(db, threshold=3, now=T0)
    assert (first.opened, first.updated, first.closed, first.open_now) == (1, 0, 0, 1)
    stateless = [i for i in incidents(db, "em1") if i.get("origin") != ORIGIN_RULE]
    assert [(i["status"], i["fault_code"], i["origin"]) for i in stateless] == [
        (OPEN, "SENTINEL", ORIGIN_READING)
    ]
    assert stateless[0]["severity"] == "minor"
    assert reconcile(db, threshold=3, now=T0).opened == 0

    status(db, "em1", None, 0, T0 + timedelta(minutes=15))
    cleared = reconcile(db, threshold=3, now=T0 + timedelta(minutes=20))
    assert (cleared.closed, cleared.open_now) == (1, 0)
    assert db[mongo.INCIDENTS].find_one({"_id": stateless[0]["_id"]})["status"] == CLOSED
    for episode in (stuck, silent):
        assert db[mongo.INCIDENTS].find_one({"_id": episode})["status"] == OPEN


def test_an_old_stateless_incident_without_origin_is_still_reconciled(db) -> None:
    db[mongo.INCIDENTS].insert_one(
        {"_id": "em2|old", "device_id": "em2", "status": OPEN, "opened_at": T0, "closed_at": None}
    )
    status(db, "em2", None, 0, T0 + timedelta(minutes=5))
    assert reconcile(db, threshold=3, now=T0 + timedelta(minutes=10)).closed == 1
    assert db[mongo.INCIDENTS].find_one({"_id": "em2|old"})["status"] == CLOSED


def test_auto_close_closes_only_incidents_open_too_long(db, caplog) -> None:
    now = T0 + timedelta(days=10)
    old_rule = rule_incident(db, "wm1", "LEAK", now - timedelta(hours=200))
    young_rule = rule_incident(db, "wm1", "NO_DATA", now - timedelta(hours=10))
    status(db, "em3", "NEGATIVE", 5, now, since=now - timedelta(hours=170))
    reconcile(db, threshold=3, now=now)
    [old_stateless] = incidents(db, "em3")
    db[mongo.INCIDENTS].insert_one(
        {
            "_id": "gm1|closed",
            "device_id": "gm1",
            "status": CLOSED,
            "opened_at": now - timedelta(hours=300),
            "closed_at": now - timedelta(hours=250),
        }
    )

    assert auto_close(db, timedelta(0), now) == 0  # 0 hours: never
    with caplog.at_level(logging.INFO, logger="meterflow.serving.incidents"):
        assert auto_close(db, timedelta(hours=168), now) == 2

    by_id = {i["_id"]: i for i in db[mongo.INCIDENTS].find()}
    for closed in (old_rule, old_stateless["_id"]):
        assert by_id[closed]["status"] == CLOSED
        assert by_id[closed]["close_reason"] == "auto-closed after 168 h"
        assert _utc(by_id[closed]["closed_at"]) == now
    assert by_id[young_rule]["status"] == OPEN
    assert _utc(by_id["gm1|closed"]["closed_at"]) == now - timedelta(hours=250)
    lines = [r.getMessage() for r in caplog.records if "incident=auto-closed" in r.getMessage()]
    assert sorted(lines) == sorted(
        [
            f"incident=auto-closed id={old_rule} device=wm1 code=LEAK "
            f"opened_at={(now - timedelta(hours=200)).isoformat()} hours=200.0",
            f"incident=auto-closed id={old_stateless['_id']} device=em3 code=NEGATIVE "
            f"opened_at={(now - timedelta(hours=170)).isoformat()} hours=170.0",
        ]
    )
    assert auto_close(db, timedelta(hours=168), now) == 0
    # The meter still fails with the same run of faults: its incident stays closed.
    again = reconcile(db, threshold=3, now=now + timedelta(minutes=5))
    assert (again.opened, again.open_now) == (0, 0)
    assert [i["status"] for i in incidents(db, "em3")] == [CLOSED]
