"""Retention: bounded MongoDB collections and lake.

MongoDB's own TTL indexes expire abnormal readings and closed incidents after
``METERFLOW_ABNORMAL_TTL_DAYS``; this DAG (re)applies that setting and deletes lake
partitions (readings and batch views) older than ``METERFLOW_LAKE_RETENTION_DAYS``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="meterflow_retention",
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"owner": "meterflow", "retries": 1},
    tags=["meterflow", "maintenance"],
    doc_md=__doc__,
)
def meterflow_retention() -> None:
    @task
    def apply_mongo_ttl() -> dict:
        """Create or update the TTL indexes from the configured number of days."""
        from meterflow.serving.indexes import ensure_indexes
        from meterflow_airflow.hooks import MeterflowHook

        with MeterflowHook() as hook:
            return ensure_indexes(hook.get_conn(), hook.settings.abnormal_ttl_days)

    @task
    def drop_old_lake_partitions(ds: str | None = None) -> dict:
        """Delete readings and view partitions older than the retention period."""
        from meterflow.batch.retention import drop_expired_partitions
        from meterflow_airflow.hooks import MeterflowHook

        settings = MeterflowHook().settings
        return drop_expired_partitions(settings.lake_path, settings.lake_retention_days, ds)

    apply_mongo_ttl()
    drop_old_lake_partitions()


meterflow_retention()
