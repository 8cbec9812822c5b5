"""Fixtures of the integration tests: a real Kafka-protocol broker over TCP, a real local
Spark, and a throw-away Airflow home."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, free_port

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.local.broker import LocalBroker

# Airflow reads its configuration when first imported: point it at a throw-away home,
# the project's DAGs and plugins, and SQLite, before any test imports it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="meterflow-airflow-")
for _name, _value in {
    "AIRFLOW_HOME": _AIRFLOW_HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
}.items():
    os.environ[_name] = _value


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker for the whole run (fails, never skips, if it cannot start)."""
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    broker = LocalBroker(free_port(), log_path).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def make_topics(bootstrap: str) -> Callable[..., dict[str, str]]:
    """Fresh, uniquely named readings/abnormal/dead-letter/status/digest topics for one test."""

    def make(partitions: int = 2) -> dict[str, str]:
        suffix = uuid.uuid4().hex[:8]
        names = {
            "METERFLOW_TOPIC_READINGS": f"meter-{suffix}",
            "METERFLOW_TOPIC_ABNORMAL": f"abnormal-{suffix}",
            "METERFLOW_TOPIC_DEADLETTER": f"deadletter-{suffix}",
            "METERFLOW_TOPIC_STATUS": f"status-{suffix}",
            "METERFLOW_TOPIC_DIGEST": f"digest-{suffix}",
        }
        kafka.ensure_topics(bootstrap, names.values(), partitions)
        return names

    return make


@pytest.fixture
def make_settings(
    bootstrap: str, tmp_path: Path, make_topics: Callable[..., dict[str, str]]
) -> Callable[..., Settings]:
    def make(partitions: int = 2, **env: str) -> Settings:
        values = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "METERFLOW_DATA_DIR": str(tmp_path / "data"),
            "METERFLOW_KAFKA_SOURCE": "python",
            **make_topics(partitions),
            **env,
        }
        return Settings.from_env(values)

    return make


@pytest.fixture(scope="session")
def spark():
    from meterflow.spark.session import get_spark

    session = get_spark(
        "meterflow-tests",
        "local[2]",
        **{"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"},
    )
    yield session
    session.stop()
    # Close py4j's connections now, while pytest's streams are open: left to the
    # interpreter's exit, each logs "Closing down" into a handler Airflow's import
    # installed on a stream pytest has closed by then ("--- Logging error ---").
    from pyspark import SparkContext

    if SparkContext._gateway is not None:
        SparkContext._gateway.shutdown()
        SparkContext._gateway = None
        SparkContext._jvm = None


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated Airflow metadata database (SQLite) for tests that run DAGs."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stderr[-3000:]}"
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
