"""Fixtures of the integration tests: a real Kafka-protocol broker over TCP, a real local
Spark, and a throw-away Airflow home."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, free_port, log_tail, wait_for

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.local.broker import LocalBroker
from meterflow.local.compose import healthcheck, native, resolved_compose, running, service_env
from meterflow.local.spark_cluster import local_ui, status

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
    from meterflow.spark.session import checkpoint_conf, get_spark

    session = get_spark(
        "meterflow-tests",
        "local[2]",
        # The tests' checkpoints are on local disk, as a native run's are by default.
        **{
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "2",
            **checkpoint_conf(tempfile.gettempdir()),
        },
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


@dataclass(frozen=True)
class ClusterUnderTest:
    url: str
    ui_port: int

    def apps(self, kind: str) -> list[str]:
        """Names of the applications the master runs (``activeapps``) or ran
        (``completedapps``)."""
        answer = status(local_ui(self.ui_port)) or {}
        return [app["name"] for app in answer.get(kind, [])]


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterUnderTest]:
    """The compose ``cluster`` profile natively, from the compose file's own commands:
    ``spark-master``, then ``spark-worker`` twice (one core each, on this 2-core machine),
    each up by its compose health check."""
    services = resolved_compose()["services"]
    root = tmp_path_factory.mktemp("spark-cluster")
    rpc, master_ui = free_port(), free_port()
    cluster = {"spark-master": "127.0.0.1", "spark-worker": "127.0.0.1", "7077": str(rpc)}
    logs = []
    with ExitStack() as stack:
        master = services["spark-master"]
        swap = {**cluster, "8080": str(master_ui)}
        env = service_env(master)
        logs.append(root / "spark-master.log")
        stack.enter_context(running(native(master["command"], swap), env, logs[-1]))
        details = lambda: log_tail(*logs, chars=2000)  # noqa: E731
        wait_for(lambda: healthcheck(master, swap, env), 120, "spark-master", details=details)
        worker = services["spark-worker"]
        checks = []
        for number in (1, 2):  # both start at once; each is up by its own health check
            ui = free_port()  # the worker's UI is --ui-port + 1
            swap = {**cluster, "8080": str(ui - 1), "8081": str(ui)}
            command = native(worker["command"], swap)
            command[command.index("--cores") + 1] = "1"
            command[command.index("--state-dir") + 1] = str(root / f"worker-{number}")
            env = service_env(worker, PYSPARK_PYTHON=sys.executable)
            logs.append(root / f"spark-worker-{number}.log")
            stack.enter_context(running(command, env, logs[-1]))
            checks.append(lambda swap=swap, env=env: healthcheck(worker, swap, env))
        for up in checks:
            wait_for(up, 120, "spark-worker", details=details)
        wait_for(
            lambda: (status(local_ui(master_ui)) or {}).get("aliveworkers") == 2,
            60,
            "two workers alive",
            details=details,
        )
        yield ClusterUnderTest(f"spark://127.0.0.1:{rpc}", master_ui)
