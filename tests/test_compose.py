"""The docker compose environment, checked without Docker.

Static: docker-compose.yml (with .env.example's values, as ``docker compose`` would
interpolate them) validates against the Compose Specification schema vendored by
check-jsonschema; every ``${VAR}`` is documented in .env.example; services named in the
docs exist; Dockerfile COPY sources exist; images are pinned; no credential literals.

Native: every command a service built from this project's images runs is taken from the
compose file itself and run here (hosts and ports swapped for local ones), or is mapped in
:data:`COMMAND_TESTS` to the test that runs it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from bench.common import free_port
from bench.compose_native import (
    BIN,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    VARIABLE,
    env_example,
    healthcheck,
    interpolate,
    native,
    running,
    service_env,
)
from meterflow.clients import kafka
from meterflow.compose_check import memory_budget, parse_size
from meterflow.core.config import Settings

README = ROOT / "README.md"
OUR_IMAGES = {"meterflow/project", "meterflow/airflow"}
SECRET_KEY = re.compile(r"PASS|SECRET|FERNET|TOKEN|_KEY$", re.IGNORECASE)

#: Each compose service built from our images -> the test that runs its command (and its
#: health check) natively. Services whose command is run straight from the compose file
#: point at this module's tests; the others at the test of the feature they start.
COMMAND_TESTS: dict[str, str] = {
    "kafka-init": "tests/test_compose.py::test_kafka_init_and_fleet_registry_commands",
    "fleet-registry": "tests/test_compose.py::test_kafka_init_and_fleet_registry_commands",
    "simulator": "tests/test_compose.py::test_simulator_command",
    "streaming-job": "tests/test_compose.py::test_streaming_job_command",
    "metabase-init": "tests/test_metabase.py::test_provision_metabase_command",
    "airflow-init": "tests/test_compose.py::test_airflow_commands",
    "airflow-api-server": "tests/test_compose.py::test_airflow_commands",
    "airflow-scheduler": "tests/test_compose.py::test_airflow_commands",
    "airflow-dag-processor": "tests/test_compose.py::test_airflow_commands",
    "airflow-triggerer": "tests/test_compose.py::test_airflow_commands",
    "mongo-init": "tests/test_mongo.py::test_init_mongo_command",
    "sink": "tests/test_sink.py::test_sink_command_stops_on_sigterm_after_committing",
}


# -- reading the compose file as docker compose does ------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved(raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw, env_example())


def our_services(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in resolved["services"].items()
        if service.get("image", "").split(":")[0] in OUR_IMAGES
    }


# -- static checks -----------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification(resolved, tmp_path) -> None:
    from check_jsonschema.builtin_schemas import get_builtin_schema

    assert get_builtin_schema("vendor.compose-spec")["title"] == "Compose Specification"
    checker = shutil.which("check-jsonschema", path=str(BIN))
    assert checker, "check-jsonschema is not installed (requirements-dev.txt)"
    good = tmp_path / "compose.json"
    good.write_text(json.dumps(resolved))
    done = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(good)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # The checker must be able to fail: a misspelt condition is not the specification.
    broken = json.loads(good.read_text())
    broken["services"]["sink"]["depends_on"]["mongo-init"]["condition"] = "service_done"
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    refused = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "service_done" in refused.stdout + refused.stderr


def test_every_variable_is_in_env_example_and_documented() -> None:
    text = COMPOSE_FILE.read_text()
    used = {m["braced"] or m["bare"] for m in VARIABLE.finditer(text) if not m["dollar"]}
    documented = env_example()
    assert used - documented.keys() == set(), "add these to .env.example"
    assert documented.keys() - used == set(), ".env.example entries the compose file ignores"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = index - 1
            while above >= 0 and "=" in lines[above] and not lines[above].startswith("#"):
                above -= 1  # entries grouped under one comment
            assert above >= 0 and lines[above].startswith("#"), f"{line} has no comment"


def test_services_are_wired_healthy_and_pinned(raw, resolved) -> None:
    services = resolved["services"]
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert {"kafka-init", "mongo-init", "airflow-init", "metabase-init"} <= one_shot
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        if name not in one_shot:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
            assert service.get("restart") == "unless-stopped", f"{name} is not restarted"
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            wanted = "service_completed_successfully" if target in one_shot else "service_healthy"
            assert rule["condition"] == wanted, f"{name} -> {target}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in (resolved.get("volumes") or {}), f"{name}: {source} is not named"
    # Every credential comes from .env: literal values only where nothing is secret.
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            secret = SECRET_KEY.search(key) or re.search(r"://[^/\s]*@", text)
            if secret and key != "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE":
                assert "${" in text, f"{name}: {key} holds a literal credential"


#: Memory a JVM takes beside its heap (metaspace, code cache, threads, buffers), at least.
JVM_OVERHEAD = parse_size("256m")


def java_heap(options: str) -> int:
    match = re.search(r"-Xmx(\S+)", options)
    assert match, f"no -Xmx in {options!r}"
    return parse_size(match[1])


def test_memory_limits_hold_their_heaps_and_fit_8_gb(resolved) -> None:
    """Every service has a limit; each JVM's heap fits inside its container's; the limits of
    the long-running services and the largest one-shot step add up to the total the README
    states, under 8 GB. bench/memory.py measures the peaks against these limits."""
    services = resolved["services"]
    limit = {name: parse_size(str(s.get("mem_limit", "0"))) for name, s in services.items()}
    assert [name for name, size in limit.items() if size == 0] == [], "services with no limit"

    def env(name: str) -> dict[str, str]:
        return {k: str(v) for k, v in services[name].get("environment", {}).items()}

    assert java_heap(env("kafka")["KAFKA_HEAP_OPTS"]) + JVM_OVERHEAD <= limit["kafka"]
    assert java_heap(env("metabase")["JAVA_OPTS"]) + JVM_OVERHEAD <= limit["metabase"]
    mongo_cache = services["mongodb"]["command"]
    cache = float(mongo_cache[mongo_cache.index("--wiredTigerCacheSizeGB") + 1]) * 2**30
    assert cache + JVM_OVERHEAD <= limit["mongodb"]
    for name in ("streaming-job", "airflow-scheduler"):
        assert parse_size(env(name)["SPARK_DRIVER_MEMORY"]) + JVM_OVERHEAD <= limit[name]
    # LocalExecutor forks `parallelism` workers up front; the scheduler's limit counts them.
    assert int(env("airflow-scheduler")["AIRFLOW__CORE__PARALLELISM"]) <= 8

    one_shot = {name for name, service in services.items() if service.get("restart") == "no"}
    budget = memory_budget(services)
    assert budget == sum(v for n, v in limit.items() if n not in one_shot) + max(
        limit[n] for n in one_shot
    )
    # 8 GiB for Docker, with half a GiB left for its own VM and daemons.
    assert budget <= 7.5 * 2**30, f"limits add up to {budget / 2**30:.2f} GiB"
    stated = re.search(r"memory limits add up to ([\d.]+) GiB", README.read_text())
    assert stated, "the README states the total of the memory limits"
    assert float(stated[1]) == round(budget / 2**30, 1), "update the total in the README"


def test_the_scheduler_waits_for_the_api_server_its_tasks_call(resolved) -> None:
    scheduler = resolved["services"]["airflow-scheduler"]
    assert scheduler["depends_on"]["airflow-api-server"]["condition"] == "service_healthy"
    url = scheduler["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert url.startswith("http://airflow-api-server:8080/")


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "data", ".git", "bench/results", "**/__pycache__"):
        assert path in ignored, path
    # What the Dockerfiles copy must not be ignored.
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert source.split("/")[0] not in ignored, (dockerfile.name, source)


def test_state_lives_on_named_volumes(resolved) -> None:
    services = resolved["services"]

    def mounts(name: str) -> set[str]:
        return set(services[name].get("volumes", []))

    assert {"lake:/data/lake", "checkpoints:/data/checkpoints"} <= mounts("streaming-job")
    assert "lake:/data/lake" in mounts("airflow-scheduler")
    for name, path in {
        "kafka": "/var/lib/kafka/data",
        "mongodb": "/data/db",
        "airflow-postgres": "/var/lib/postgresql/data",
        "metabase-postgres": "/var/lib/postgresql/data",
    }.items():
        assert any(m.endswith(f":{path}") for m in mounts(name)), name
    # The apache/kafka image writes to /tmp/kraft-combined-logs unless told otherwise.
    assert services["kafka"]["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert services["metabase"]["environment"]["MB_DB_TYPE"] == "postgres"
    # Both Spark jobs run where SPARK_MASTER says: the streaming job and the DAGs' connection.
    master = env_example()["SPARK_MASTER"]
    assert master in services["streaming-job"]["command"]
    connection = json.loads(
        services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_SPARK_DEFAULT"]
    )
    assert connection["host"] == master
    assert services["streaming-job"]["environment"]["METERFLOW_KAFKA_SOURCE"] == "jvm"


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


def documented_services() -> set[str]:
    """Service names in the first column of tables headed "Service" in the README."""
    names = set()
    for doc in (ROOT / "README.md",):
        in_table = False
        for line in doc.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells[0].lower() == "service":
                in_table = True
            elif not line.startswith("|"):
                in_table = False
            elif in_table and (match := re.fullmatch(r"`([a-z0-9-]+)`.*", cells[0])):
                names.add(match.group(1))
    return names


def test_every_documented_service_exists_and_every_service_is_documented(resolved) -> None:
    documented = documented_services()
    assert documented, "README.md has no Service table"
    assert documented - resolved["services"].keys() == set()
    assert resolved["services"].keys() - documented == set()


def dockerfile_copies(dockerfile: Path) -> list[str]:
    sources = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() in {"COPY", "ADD"}:
            args = [w for w in words[1:] if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in words), "multi-stage COPY"
            sources += args[:-1]
    return sources


def test_dockerfile_copy_sources_exist(resolved) -> None:
    dockerfiles = set()
    for service in resolved["services"].values():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            dockerfiles.add((context, context / service["build"]["dockerfile"]))
    assert len(dockerfiles) == 2
    for context, dockerfile in dockerfiles:
        sources = dockerfile_copies(dockerfile)
        assert "requirements.txt" in sources and "constraints.txt" in sources
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name}: COPY {source} is missing"


def test_spark_image_carries_the_connector_of_the_installed_spark() -> None:
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    (scala,) = {p.name.split("-")[2][:4] for p in jars.glob("scala-library-*.jar")}
    wanted = f"org.apache.spark:spark-sql-kafka-0-10_{scala}:{pyspark.__version__}"
    assert f"ARG SPARK_KAFKA_PACKAGE={wanted}\n" in (ROOT / "docker/spark.Dockerfile").read_text()


def test_every_command_of_our_images_is_run_by_a_native_test(resolved) -> None:
    ours = our_services(resolved)
    assert ours.keys() == COMMAND_TESTS.keys()
    missing = []
    for node in sorted(set(COMMAND_TESTS.values())):
        path, _, name = node.partition("::")
        file = ROOT / path
        tree = ast.parse(file.read_text()) if file.exists() else ast.Module(body=[])
        if name not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
            missing.append(node)
    assert missing == [], "compose commands whose native test does not exist"


# -- running the compose commands natively ---------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)
            pytest.fail(f"{what} not ready after {timeout:.0f} s\n{tails}")
        time.sleep(1)


@pytest.fixture
def meterflow_env(bootstrap: str, make_topics, tmp_path: Path) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        "LAKE_PATH": str(tmp_path / "data" / "lake"),
        "CHECKPOINT_PATH": str(tmp_path / "data" / "checkpoints"),
        "MONGO_URI": "mongomock://compose",
        "METERFLOW_KAFKA_SOURCE": "python",  # natively there is no spark-sql-kafka jar
        "PYSPARK_PYTHON": sys.executable,
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
    assert kafka.read_all(bootstrap, env["METERFLOW_TOPIC_READINGS"]) == []


def test_simulator_command(resolved, meterflow_env, bootstrap, tmp_path) -> None:
    service = resolved["services"]["simulator"]
    env = service_env(service, **meterflow_env)
    log = tmp_path / "simulator.log"
    with running(native(service["command"], {}), env, log) as process:
        wait_for(lambda: healthcheck(service, {}, env), "simulator health", 60, log)
        time.sleep(4)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-2000:]
    sent = len(kafka.read_all(bootstrap, env["METERFLOW_TOPIC_READINGS"]))
    assert 0 < sent <= float(env_example()["SIMULATOR_RATE"]) * 60
    assert f"sent {sent:,} messages" in log.read_text()


def test_streaming_job_command(resolved, meterflow_env, bootstrap, tmp_path) -> None:
    """The streaming job as compose starts it (spark-submit with SPARK_MASTER), answering
    its health check while it runs, then committing the prototype's messages."""
    service = resolved["services"]["streaming-job"]
    driver_ui = free_port()
    swap = {"localhost:4040": f"127.0.0.1:{driver_ui}"}
    send_prototype(meterflow_env)
    env = service_env(
        service, **meterflow_env, SPARK_LOCAL_IP="127.0.0.1", METERFLOW_TRIGGER_SECONDS="1"
    )
    command = native(service["command"], {})
    command[1:1] = ["--conf", f"spark.ui.port={driver_ui}"]
    log = tmp_path / "streaming-job.log"
    lake = Path(meterflow_env["LAKE_PATH"]) / "readings" / "date=2024-05-27"
    with running(command, env, log) as process:
        wait_for(lambda: healthcheck(service, swap, env), "streaming-job health", 180, log)
        wait_for(lambda: bool(list(lake.glob("*.parquet"))), "the lake", 120, log)
        # `docker stop`: SIGTERM to the container's first process, spark-submit's JVM.
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(60) in (0, 128 + signal.SIGTERM), log.read_text()[-3000:]
        wait_for(lambda: not group_alive(process.pid), "the driver to follow the JVM", 30, log)
    assert "read=4 valid=2 abnormal=1 deadletter=1" in log.read_text()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def send_prototype(env: dict[str, str]) -> None:
    producer = kafka.producer(env["KAFKA_BOOTSTRAP_SERVERS"])
    for value in (
        b'{"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 9}',
        b'{"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 18, "flow_rate": 5}',
        b'{"device_id": "em2", "timestamp": "2024-05-27T15:57:54Z", "usage_kwh": -1}',
        b"garbage",
    ):
        producer.produce(env["METERFLOW_TOPIC_READINGS"], value, b"k")
    assert producer.flush(30) == 0


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
            wait_for(lambda s=service, e=env: healthcheck(s, swap, e), name, 240, *logs)


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
