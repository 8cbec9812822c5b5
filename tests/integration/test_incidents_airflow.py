"""Incidents through Airflow: the Kafka provider's trigger that wakes the DAG, run against
the real broker, and the incident DAG reconciling MongoDB (mongomock here, a real server
with MONGO_URI).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from helpers import ROOT, send
from incidents_helpers import T0, incidents, status

from meterflow.clients import mongo
from meterflow.core import classifier, contract, messages
from meterflow.core.config import Settings
from meterflow.core.events import abnormal_event
from meterflow.serving.incidents import OPEN


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
    reading = classifier.Reading(
        "wm7", contract.MeterType.WATER, 1_717_315_200_000_000, None, None, None,
        contract.FaultCode.NEGATIVE, "usage is negative", {"usage": -3},
    )  # fmt: skip
    event = abnormal_event(
        reading, settings.topic_readings, "AaIrU8Vb", 0, 42, 1_717_315_201_000_000
    )
    send(
        settings,
        [b"not json at all", messages.encode(event)],
        topic=settings.topic_abnormal,
        key=b"wm7",
    )

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

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("meter_incidents")
    run = dag.test(logical_date=T0)

    assert run.state == "success"
    [incident] = incidents(db, "gm4")
    assert incident["status"] == OPEN
    db.client.drop_database(mongo_db_name)
