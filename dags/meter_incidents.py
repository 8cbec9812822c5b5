"""Incidents for meters that keep failing, cleared when they report good readings again.

Event-driven: an Asset watches ``iot-abnormal`` through the Kafka provider's message-queue
trigger (connection ``kafka_default``), so an abnormal reading starts a run within
seconds; a five-minute timer also runs it, because recoveries arrive as good readings,
not as abnormal events. Each run compares ``meter_status`` (kept by ``meterflow sink``)
with ``incidents``: a meter with ``METERFLOW_INCIDENT_THRESHOLD`` faulty readings in a row
gets one open incident; a meter whose latest reading was good gets its incident closed.
Incidents of the stateful rules' episodes are the sink's; this DAG only closes those (and
its own) still open after ``METERFLOW_INCIDENT_AUTOCLOSE_HOURS`` (0 = never).
"""

from __future__ import annotations

import pendulum
from airflow.providers.apache.kafka.triggers.msg_queue import KafkaMessageQueueTrigger
from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable, dag, task

from meterflow.core.config import env_value

ABNORMAL_TOPIC = env_value("METERFLOW_TOPIC_ABNORMAL")

abnormal_events = Asset(
    name="meterflow_abnormal_readings",
    watchers=[
        AssetWatcher(
            name="iot_abnormal_watcher",
            trigger=KafkaMessageQueueTrigger(
                topics=[ABNORMAL_TOPIC],
                kafka_config_id="kafka_default",
                apply_function="meterflow_airflow.triggers.abnormal_event",
                poll_interval=5,
            ),
        )
    ],
)


@dag(
    dag_id="meter_incidents",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/5 * * * *", timezone="UTC"), assets=[abnormal_events]
    ),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "meterflow", "retries": 3},
    tags=["meterflow", "alerts"],
    doc_md=__doc__,
)
def meter_incidents() -> None:
    @task
    def reconcile_incidents() -> dict:
        """Close incidents open longer than ``METERFLOW_INCIDENT_AUTOCLOSE_HOURS`` (first,
        so ``open_now`` counts what is left), then open incidents for failing meters and
        close those of recovered ones."""
        from datetime import UTC, datetime, timedelta

        from meterflow.serving.incidents import auto_close, reconcile
        from meterflow_airflow.hooks import MeterflowHook

        with MeterflowHook() as hook:
            db = hook.get_conn()
            max_open = timedelta(hours=hook.settings.incident_autoclose_hours)
            closed = auto_close(db, max_open, datetime.now(UTC))
            report = reconcile(db, hook.settings.incident_threshold)
        return {**report.as_dict(), "auto_closed": closed}

    reconcile_incidents()


meter_incidents()
