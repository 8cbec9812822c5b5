"""The docker compose environment's commands, run natively, without Docker.

Every command a service built from this project's images runs is taken from the compose
file itself and run here (hosts and ports swapped for local ones), or is mapped in
tests/unit/test_compose.py's ``COMMAND_TESTS`` to the test that runs it. The services'
health-check script runs here too, against services that are down. The fixture
``resolved`` (the compose file with .env.example's values) is in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers import PROTOTYPE, ROOT, free_port, log_tail, meterflow, send, wait_for

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.local.compose import (
    BIN,
    env_example,
    healthcheck,
    native,
    running,
    service_env,
)
from meterflow.stream.supervisor import APP_NAME as STREAM_APP

#: Spark's noise a stream's log must not carry (the issue "A house a newcomer can live in"):
#: the detector's pre-init worker banners, the job-group cancels of a clean stop, the first
#: batches' "falling behind".
NOISE = (
    "TransformWithStateInPandas Python worker finish init stage",
    "TransformWithStateInPandas Python worker received parameters",
    "TransformWithStateInPandas Python worker Starting execution of UDF",
    "TransformWithStateInPandas Python worker Completed execution of UDF",
    "Failed to cancel job group",
    "Current batch is falling behind",
    "No more data to read from the socket",
)
#: Between health checks: each is a process (``airflow jobs check`` takes seconds of CPU).
HEALTH_POLL_S = 1.0


def test_healthcheck_script_names_what_is_down() -> None:
    script = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    closed = f"127.0.0.1:{free_port()}"
    cases = {
        ("http", f"http://{closed}/api/health"): closed,
        ("mongo",): "did not answer",
    }
    env = {**os.environ, "MONGO_URI": f"mongodb://{closed}/"}
    for args, named in cases.items():
        done = subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and named in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
    usage = subprocess.run([*script, "ftp"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


@pytest.fixture
def meterflow_env(bootstrap: str, make_topics, tmp_path: Path) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        "LAKE_PATH": str(tmp_path / "data" / "lake"),
        "CHECKPOINT_PATH": str(tmp_path / "data" / "checkpoints"),
        # Only has to be set, so nothing starts a MongoDB stand-in: none of these commands
        # opens MongoDB, and the fake (tests/mongomock_client.py) is not installed in them.
        "MONGO_URI": "mongomock://compose",
        "METERFLOW_KAFKA_SOURCE": "python",  # natively there is no spark-sql-kafka jar
        "PYSPARK_PYTHON": sys.executable,
        # Compose's Kafka requires a SASL login; the native broker takes none (it cannot
        # require one: docs/operations.md, "A secured Kafka"). The login itself is run by
        # tests/integration/test_secure_kafka.py, its wiring checked by test_compose.py.
        "KAFKA_SECURITY_PROTOCOL": "plaintext",
        "KAFKA_SASL_USERNAME": "",
        "KAFKA_SASL_PASSWORD": "",
        **make_topics(1),
    }


def test_kafka_init_and_fleet_registry_commands(resolved, meterflow_env, bootstrap) -> None:
    services = resolved["services"]
    suffix = meterflow_env["METERFLOW_TOPIC_READINGS"].split("-")[-1]
    fresh = {
        "METERFLOW_TOPIC_READINGS": f"init-meter-{suffix}",
        "METERFLOW_TOPIC_ABNORMAL": f"init-abnormal-{suffix}",
        "METERFLOW_TOPIC_DEADLETTER": f"init-deadletter-{suffix}",
        "METERFLOW_TOPIC_STATUS": f"init-status-{suffix}",
        "METERFLOW_TOPIC_DIGEST": f"init-digest-{suffix}",
    }
    init = services["kafka-init"]
    env = service_env(init, **{**meterflow_env, **fresh})
    done = subprocess.run(native(init["command"], {}), env=env, cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr
    partitions = int(env_example()["METERFLOW_KAFKA_PARTITIONS"])
    metadata = kafka.consumer(bootstrap).list_topics(timeout=10).topics
    for topic in fresh.values():
        assert len(metadata[topic].partitions) == partitions

    registry = services["fleet-registry"]
    env = service_env(registry, **meterflow_env)
    done = subprocess.run(
        native(registry["command"], {}), env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    table = pq.read_table(Path(Settings.from_env(env).registry_path) / "meters.parquet")
    assert table.num_rows == int(env_example()["SIMULATOR_METERS"])
    assert kafka.read_to_end(bootstrap, env["METERFLOW_TOPIC_READINGS"]) == []


def test_simulator_command(resolved, meterflow_env, bootstrap, tmp_path) -> None:
    service = resolved["services"]["simulator"]
    env = service_env(service, **meterflow_env)
    log = tmp_path / "simulator.log"
    with running(native(service["command"], {}), env, log) as process:
        wait_for(
            lambda: healthcheck(service, {}, env),
            60,
            "simulator health",
            details=tail(log),
            interval=HEALTH_POLL_S,
        )
        topic = env["METERFLOW_TOPIC_READINGS"]
        wait_for(
            lambda: kafka.read_to_end(bootstrap, topic),
            60,
            "the simulator's readings",
            details=tail(log),
            interval=0.5,  # each look reads the topic
        )
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-2000:]
    sent = len(kafka.read_to_end(bootstrap, env["METERFLOW_TOPIC_READINGS"]))
    assert 0 < sent <= float(env_example()["SIMULATOR_RATE"]) * 60
    assert f"sent {sent:,} messages" in log.read_text()


def test_streaming_job_command(resolved, meterflow_env, bootstrap, tmp_path, spark_cluster) -> None:
    """The streaming job as compose starts it (spark-submit with SPARK_MASTER) with the
    cluster profile on, so its executors run on the native standalone cluster: answering
    its health check while it runs, committing the prototype's messages, running the
    stateful stage beside (compose turns it on), and stopping on SIGTERM with a log free of
    Spark's noise and a ledger that reconciles."""
    assert resolved["services"]["streaming-job"]["environment"]["METERFLOW_DETECTION"] == "on"
    service = resolved["services"]["streaming-job"]
    driver_ui = free_port()
    swap = {"localhost:4040": f"127.0.0.1:{driver_ui}"}
    send(Settings.from_env(meterflow_env), PROTOTYPE)
    env = service_env(
        service, **meterflow_env, SPARK_LOCAL_IP="127.0.0.1", METERFLOW_TRIGGER_SECONDS="1"
    )
    command = native(service["command"], {env_example()["SPARK_MASTER"]: spark_cluster.url})
    assert spark_cluster.url in command  # the --master
    command[1:1] = ["--conf", f"spark.ui.port={driver_ui}"]
    log = tmp_path / "streaming-job.log"
    lake = Path(meterflow_env["LAKE_PATH"]) / "readings" / "date=2024-05-27"
    with running(command, env, log) as process:
        wait_for(
            lambda: healthcheck(service, swap, env),
            180,
            "streaming-job health",
            details=tail(log),
            interval=HEALTH_POLL_S,
        )
        wait_for(lambda: list(lake.glob("*.parquet")), 120, "the lake", details=tail(log))
        assert STREAM_APP in spark_cluster.apps("activeapps")
        detector = Path(meterflow_env["CHECKPOINT_PATH"], "detector")
        wait_for(
            lambda: list(detector.glob("*/*/commits/[0-9]*")),
            120,
            "the detector's first batch",
            details=tail(log),
        )
        # `docker stop`: SIGTERM to the container's first process, spark-submit's JVM.
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(60) in (0, 128 + signal.SIGTERM), log.read_text()[-3000:]
        wait_for(
            lambda: not group_alive(process.pid),
            30,
            "the driver to follow the JVM",
            details=tail(log),
        )
    text = log.read_text()
    assert "read=4 valid=2 abnormal=1 deadletter=1" in text
    # The log says what the stream did and no more: no Spark noise, the detector's batches.
    assert "detector_batch=" in text
    assert [line for line in text.splitlines() if any(n in line for n in NOISE)] == []
    ledger = meterflow("reconcile", "--scan-lake", env=meterflow_env)
    assert ledger.returncode == 0, ledger.stderr
    assert "reconciled: 4 offsets in 1 generation(s)" in ledger.stdout


def tail(*logs: Path) -> Callable[[], str]:
    return lambda: log_tail(*logs, chars=2000)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_airflow_commands(resolved, tmp_path) -> None:
    """airflow-init, then api-server, scheduler, dag-processor and triggerer with their
    health checks, as compose runs them (SQLite instead of PostgreSQL)."""
    from airflow.utils.net import get_hostname  # what the jobs record as their host

    services = resolved["services"]
    api_port, health_port = free_port(), free_port()
    swap = {"8080": str(api_port), "localhost:8974": f"127.0.0.1:{health_port}"}
    home = tmp_path / "airflow"
    overrides = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "auth" / "pw.json"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__API_AUTH__JWT_SECRET": "native-test-jwt-secret-0123456789",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(health_port),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW_ADMIN_PASSWORD": "native-test-password",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # Set, but never opened: the DAGs stay paused and no task runs (see meterflow_env).
        "MONGO_URI": "mongomock://airflow",
    }
    init = services["airflow-init"]
    env = service_env(init, **overrides)
    done = subprocess.run(
        native(init["command"], swap), env=env, cwd=ROOT, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    passwords = json.loads((home / "auth" / "pw.json").read_text())
    assert passwords == {env_example()["AIRFLOW_ADMIN_USERNAME"]: "native-test-password"}

    names = [
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    ]
    with running_all(services, names, swap, overrides, tmp_path) as logs:
        for name in names:
            service = services[name]
            env = service_env(service, **overrides, HOSTNAME=get_hostname())
            wait_for(
                lambda s=service, e=env: healthcheck(s, swap, e),
                240,
                name,
                details=tail(*logs),
                interval=HEALTH_POLL_S,
            )


@contextmanager
def running_all(
    services: dict[str, Any],
    names: list[str],
    swap: dict[str, str],
    overrides: dict[str, str],
    tmp_path: Path,
) -> Iterator[list[Path]]:
    logs = [tmp_path / f"{name}.log" for name in names]
    with ExitStack() as stack:
        for name, log in zip(names, logs, strict=True):
            argv = native(services[name]["command"], swap)
            stack.enter_context(running(argv, service_env(services[name], **overrides), log))
        yield logs
