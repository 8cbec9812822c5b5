"""Incidents open for meters that keep failing and close when they recover.

The reconciliation runs against MongoDB (mongomock here, a real server with MONGO_URI);
the Kafka provider's trigger that wakes the DAG runs against the real broker.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meterflow.clients import kafka, mongo
from meterflow.core import contract
from meterflow.core.config import Settings
from meterflow.serving.incidents import CLOSED, OPEN, reconcile

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


def test_kafka_trigger_fires_on_an_abnormal_event(make_settings, monkeypatch) -> None:
    """The provider's trigger, as the AssetWatcher runs it, over the real broker."""
    from airflow.providers.apache.kafka.triggers.msg_queue import KafkaMessageQueueTrigger

    settings: Settings = make_settings(partitions=1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_KAFKA_DEFAULT",
        json.dumps(
            {
                "conn_type": "kafka",
                "extra": {
                    "bootstrap.servers": settings.bootstrap_servers,
                    "group.id": "meterflow-incidents-test",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                },
            }
        ),
    )
    producer = kafka.producer(settings.bootstrap_servers)
    reading = contract.Reading(
        "wm7", contract.MeterType.WATER, 1_717_315_200_000_000, None, None,
        contract.FaultCode.NEGATIVE, "usage is negative", {"usage": -3},
    )  # fmt: skip
    event = contract.abnormal_event(
        reading, settings.topic_readings, "AaIrU8Vb", 0, 42, 1_717_315_201_000_000
    )
    producer.produce(settings.topic_abnormal, b"not json at all", b"wm7")
    producer.produce(settings.topic_abnormal, json.dumps(event).encode(), b"wm7")
    assert producer.flush(30) == 0

    trigger = KafkaMessageQueueTrigger(
        topics=[settings.topic_abnormal],
        apply_function="meterflow_airflow.triggers.abnormal_event",
        poll_interval=0.2,
    )

    async def first_event():
        async for fired in trigger.run():
            return fired

    fired = asyncio.run(asyncio.wait_for(first_event(), timeout=90))
    assert fired.payload == {"device_id": "wm7", "fault_code": "NEGATIVE"}


def test_incident_dag_reconciles_through_airflow(
    airflow_db, mongo_uri, mongo_db_name, monkeypatch, tmp_path: Path
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MONGO_URI", mongo_uri)
    monkeypatch.setenv("MONGO_DB", mongo_db_name)
    monkeypatch.setenv("METERFLOW_DATA_DIR", str(tmp_path))
    db = mongo.client(mongo_uri)[mongo_db_name]
    status(db, "gm4", "SENTINEL", 5, T0, since=T0)

    dag = DagBag(dag_folder=str(Path(__file__).parents[1] / "dags")).get_dag("meter_incidents")
    run = dag.test(logical_date=T0)

    assert run.state == "success"
    [incident] = incidents(db, "gm4")
    assert incident["status"] == OPEN
    db.client.drop_database(mongo_db_name)
