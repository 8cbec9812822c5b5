"""``meterflow run --airflow``'s environment, resolved by the real provider hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from airflow.providers.apache.kafka.hooks.base import KafkaBaseHook
from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

from meterflow.core.config import Settings
from meterflow.local.airflow import airflow_env


@pytest.mark.parametrize("master", ["local[*]", "local[2]", "spark://spark-master:7077"])
def test_spark_default_submits_to_the_configured_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, master: str
) -> None:
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path), "SPARK_MASTER": master})
    env = airflow_env(settings, date(2024, 6, 3), {})
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", env["AIRFLOW_CONN_SPARK_DEFAULT"])

    hook = SparkSubmitHook(conn_id="spark_default")

    assert (hook._connection["master"], hook._connection["deploy_mode"]) == (master, "client")
    command = hook._build_spark_submit_command("jobs/daily_batch_job.py")
    assert command[command.index("--master") + 1] == master


def test_kafka_default_points_at_this_runs_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env(
        {"METERFLOW_DATA_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "broker.test:19092"}
    )
    env = airflow_env(settings, date(2024, 6, 3), {})
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", env["AIRFLOW_CONN_KAFKA_DEFAULT"])

    connection = KafkaBaseHook.get_connection("kafka_default")

    assert connection.extra_dejson["bootstrap.servers"] == "broker.test:19092"
    assert env["METERFLOW_DAG_START_DATE"] == "2024-06-03"


def test_tasks_queued_at_start_wait_for_the_api_server(tmp_path: Path) -> None:
    """Airflow's task client reads the retry count meant for the API server's slow start
    (the variable's name is one Airflow knows: a misspelled one would leave its 5)."""
    settings = Settings.from_env({"METERFLOW_DATA_DIR": str(tmp_path)})
    env = airflow_env(settings, date(2024, 6, 3), os.environ)

    printed = subprocess.run(
        [sys.executable, "-c", "from airflow.sdk.api import client; print(client.API_RETRIES)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout

    assert printed.split()[-1] == "10"
