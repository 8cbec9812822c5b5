"""Daily batch views: per meter, per meter type and per district, for each day.

For the run's day (a local date in ``METERFLOW_TIMEZONE``, which the schedule follows: a
run starts after that zone's midnight): wait until the lake partition is complete (the stream's
event-time watermark, for the readings topic's current generation, passed the day's end;
or, with no stream running, a grace period did), aggregate it with the Spark batch job
(spark-submit through the ``spark_default`` connection, whose master is ``SPARK_MASTER``:
``local[*]`` natively, ``local[1]`` in the scheduler's container under docker compose,
which runs no Spark cluster), publish the views to MongoDB, then check them against
the lake: a day with registered meters and no readings fails there, to be re-run once the
stream has read it. The job first runs again the days of the last five weeks that received
readings after they were published (late data, found in the lake's ledger); ``load`` and
``check`` publish and check those days too. Every step replaces the day's results, so
re-runs and backfills (``catchup``) give the same documents as running the days one by
one. The sensor looks every minute.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import dag, task

from meterflow.core.config import env_value
from meterflow_airflow.hooks import MeterflowHook, job_path
from meterflow_airflow.sensors import LakePartitionCompleteSensor

TIMEZONE = env_value("METERFLOW_TIMEZONE")
START_DATE = pendulum.parse(env_value("METERFLOW_DAG_START_DATE"), tz=TIMEZONE)
#: The run's day in the DAG's zone. ``ds`` is the logical date in UTC: a day behind for a
#: zone east of UTC, whose midnight is the evening before in UTC.
DAY = f"{{{{ data_interval_start.in_timezone('{TIMEZONE}') | ds }}}}"
#: How far back a run looks for days that received readings after they were published.
LATE_DAYS = 35
LATE_SINCE = (
    f"{{{{ macros.ds_add(data_interval_start.in_timezone('{TIMEZONE}') | ds, -{LATE_DAYS}) }}}}"
)
#: How often the sensor looks (reschedule mode: a short task run each time, the slot freed
#: in between). Yesterday's views follow the stream's watermark within about a minute.
POKE_SECONDS = 60


@dag(
    dag_id="meter_daily_averages",
    schedule="@daily",
    start_date=START_DATE,
    catchup=True,
    max_active_runs=2,
    default_args={"owner": "meterflow", "retries": 2, "retry_delay": timedelta(minutes=2)},
    tags=["meterflow", "batch"],
    doc_md=__doc__,
)
def meter_daily_averages() -> None:
    wait = LakePartitionCompleteSensor(
        task_id="wait_for_partition",
        day=DAY,
        mode="reschedule",
        poke_interval=POKE_SECONDS,
        timeout=timedelta(days=2).total_seconds(),
    )
    aggregate = SparkSubmitOperator(
        task_id="aggregate",
        conn_id="spark_default",
        application=job_path("daily_batch_job"),
        application_args=["--date", DAY, "--late-since", LATE_SINCE],
        name=f"meterflow-daily-{DAY}",
        # One Spark driver at a time in the scheduler's container, also during catch-up.
        max_active_tis_per_dag=1,
    )

    @task
    def load(day: str) -> list[dict]:
        """Publish the day's views to MongoDB (upserts that replace the day), and those of
        the late days the job ran again."""
        from meterflow.serving.loader import days_to_publish, publish_day

        with MeterflowHook() as hook:
            views = hook.settings.views_path
            return [
                publish_day(views, d, hook.get_conn()).as_dict()
                for d in days_to_publish(views, day)
            ]

    @task
    def check(day: str) -> list[dict]:
        """Fail the run if MongoDB disagrees with the lake for the day (or a late day run
        again), or if registered meters sent nothing the stream has read."""
        from meterflow.serving.checks import check_day
        from meterflow.serving.loader import days_to_publish

        with MeterflowHook() as hook:
            settings = hook.settings
            return [
                check_day(settings.lake_path, d, hook.get_conn()).as_dict()
                for d in days_to_publish(settings.views_path, day)
            ]

    wait >> aggregate >> load(DAY) >> check(DAY)


meter_daily_averages()
