"""The docker compose environment, checked without Docker.

Static: docker-compose.yml (with .env.example's values, as ``docker compose`` would
interpolate them) validates against the Compose Specification schema vendored by
check-jsonschema; every ``${VAR}`` is documented in .env.example; services named in the
docs exist; Dockerfile COPY sources exist; images are pinned; no credential literals.

Native: every command a service built from this project's images runs is mapped in
:data:`COMMAND_TESTS` to the test that runs it; tests/integration/test_compose_native.py
runs those it takes straight from the compose file (hosts and ports swapped for local
ones). The fixtures ``raw`` and ``resolved`` (the compose file as read and as
interpolated) are in tests/conftest.py.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT

from meterflow.compose_check import active, memory_budget, parse_size
from meterflow.local.compose import (
    BIN,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    VARIABLE,
    env_example,
    interpolate,
    native,
)
from meterflow.stream.supervisor import STREAM_JAVA_OPTIONS

COMPOSE_DOC = ROOT / "docs" / "compose.md"
OUR_IMAGES = {"meterflow/project", "meterflow/airflow"}
SECRET_KEY = re.compile(r"PASS|SECRET|FERNET|TOKEN|_KEY$", re.IGNORECASE)

#: Each compose service built from our images -> the test that runs its command (and its
#: health check) natively. Services whose command is run straight from the compose file
#: point at tests/integration/test_compose_native.py; the others at the test of the feature
#: they start.
NATIVE = "tests/integration/test_compose_native.py::"
DAGS = "tests/integration/test_dags.py::"
COMMAND_TESTS: dict[str, str] = {
    "kafka-init": f"{NATIVE}test_kafka_init_and_fleet_registry_commands",
    "fleet-registry": f"{NATIVE}test_kafka_init_and_fleet_registry_commands",
    "simulator": f"{NATIVE}test_simulator_command",
    "streaming-job": f"{NATIVE}test_streaming_job_command",
    "metabase-init": "tests/unit/test_metabase.py::test_provision_metabase_command",
    "airflow-init": f"{NATIVE}test_airflow_commands",
    "airflow-api-server": f"{NATIVE}test_airflow_commands",
    "airflow-scheduler": f"{NATIVE}test_airflow_commands",
    "airflow-dag-processor": f"{NATIVE}test_airflow_commands",
    "airflow-triggerer": f"{NATIVE}test_airflow_commands",
    "mongo-init": "tests/unit/test_mongo.py::test_init_mongo_command",
    "mongo-users": "tests/unit/test_mongo_users.py::test_mongo_users_command",
    # tests/integration/conftest.py's spark_cluster runs both; these two tests use it.
    "spark-master": f"{DAGS}test_daily_dag_runs_spark_submit_and_loads_mongo",
    "spark-worker": f"{NATIVE}test_streaming_job_command",
    "sink": (
        "tests/integration/test_sink_kafka.py::test_sink_command_stops_on_sigterm_after_committing"
    ),
}


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


def test_variables_are_interpolated_as_compose_does() -> None:
    env = {"SET": "v", "EMPTY": ""}
    given = {"a": ["${SET}", "$SET/x", "$$SET", "${EMPTY:-d}", "${EMPTY-d}", "${UNSET-d}", 3]}
    assert interpolate(given, env) == {"a": ["v", "v/x", "$SET", "d", "", "d", 3]}
    with pytest.raises(KeyError, match="EMPTY: needed"):
        interpolate("${EMPTY:?needed}", env)
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET}", env)


def test_a_compose_command_runs_here_with_local_programs_hosts_and_ports() -> None:
    argv = native(["python", "-m", "meterflow.cli", "--to", "kafka:9092"], {"kafka:9092": "h:1"})
    assert argv == [sys.executable, "-m", "meterflow.cli", "--to", "h:1"]
    assert native(["airflow", "version"], {})[0] == str(BIN / "airflow")


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


def test_only_mongodb_and_mongo_users_see_the_root_credentials(raw) -> None:
    """Every other service reaches MongoDB as the application or the read-only user."""
    holders = {
        name
        for name, service in raw["services"].items()
        if "MONGO_ROOT_" in json.dumps(service.get("environment") or {})
    }
    assert holders == {"mongodb", "mongo-users"}
    services = raw["services"]
    app_uri = raw["x-project-env"]["MONGO_URI"]
    assert "${MONGO_APP_USERNAME}:${MONGO_APP_PASSWORD}@" in app_uri
    reader_uri = services["metabase-init"]["environment"]["METABASE_MONGO_URI"]
    assert "${MONGO_READER_USERNAME}:${MONGO_READER_PASSWORD}@" in reader_uri
    for uri in (app_uri, reader_uri):
        assert uri.endswith("/${MONGO_DB}?authSource=${MONGO_DB}")  # users of that database
    # The users exist before anything logs in as them.
    assert "mongo-users" in services["mongo-init"]["depends_on"]


def test_every_kafka_client_logs_in_and_only_the_broker_listens_in_clear(resolved) -> None:
    services = resolved["services"]
    kafka = services["kafka"]["environment"]
    protocols = dict(
        pair.split(":") for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = kafka["KAFKA_LISTENERS"].split(",")
    for listener in listeners:
        name, _, address = listener.partition("://")
        # Whatever other containers or the host reach requires a login.
        if protocols[name] == "PLAINTEXT" and name != "CONTROLLER":
            assert address.startswith("127.0.0.1:"), f"{listener} is open without a login"
    assert protocols["CLIENT"] == protocols["HOST"] == "SASL_PLAINTEXT"
    login = f"user_{env_example()['KAFKA_SASL_USERNAME']}="
    assert login in kafka["KAFKA_LISTENER_NAME_CLIENT_PLAIN_SASL_JAAS_CONFIG"]
    clients = {
        name: service
        for name, service in services.items()
        if "KAFKA_BOOTSTRAP_SERVERS" in (service.get("environment") or {})
    }
    wanted = {"simulator", "sink", "streaming-job", "kafka-init", "airflow-triggerer"}
    assert wanted <= clients.keys()
    for name, service in clients.items():
        env = service["environment"]
        assert env["KAFKA_SECURITY_PROTOCOL"] == "sasl_plaintext", name
        assert env["KAFKA_SASL_USERNAME"] and env["KAFKA_SASL_PASSWORD"], name
    extra = json.loads(services["airflow-triggerer"]["environment"]["AIRFLOW_CONN_KAFKA_DEFAULT"])
    assert extra["extra"]["sasl.username"] == env_example()["KAFKA_SASL_USERNAME"]
    assert extra["extra"]["security.protocol"] == "sasl_plaintext"


def test_every_host_port_binds_to_the_bind_address(resolved) -> None:
    services = resolved["services"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published.keys() >= {"kafka", "mongodb", "streaming-job", "metabase"}
    for name, ports in published.items():
        for port in ports:
            host_ip, _host, _container = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} is open to the network"
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"


#: Memory a JVM takes beside its heap (metaspace, code cache, threads, buffers), at least.
JVM_OVERHEAD = parse_size("256m")


def java_heap(options: str) -> int:
    match = re.search(r"-Xmx(\S+)", options)
    assert match, f"no -Xmx in {options!r}"
    return parse_size(match[1])


def test_memory_limits_hold_their_heaps_and_fit_9_gb(resolved) -> None:
    """Every service has a limit; each JVM's heap fits inside its container's; the limits of
    the long-running services and the largest one-shot step add up to the total
    docs/compose.md states, under 9 GB. bench/memory.py measures the peaks against these limits."""
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

    default = {name for name, service in services.items() if active(service)}
    one_shot = {name for name in default if services[name].get("restart") == "no"}
    budget = memory_budget(services)
    assert budget == sum(limit[n] for n in default - one_shot) + max(limit[n] for n in one_shot)
    # 9 GiB for Docker, with half a GiB left for its own VM and daemons.
    assert budget <= 8.5 * 2**30, f"limits add up to {budget / 2**30:.2f} GiB"

    # The cluster profile: each daemon's heap and, in the worker, what it offers executors
    # (two of SPARK_EXECUTOR_MEMORY: the streaming job's and the daily job's).
    cluster = {"spark-master", "spark-worker"}
    assert {n for n in services if not active(services[n])} == cluster
    for name in cluster:
        assert services[name]["profiles"] == ["cluster"]
        assert parse_size(env(name)["SPARK_DAEMON_MEMORY"]) + JVM_OVERHEAD <= limit[name]
    worker = services["spark-worker"]["command"]
    offered = parse_size(worker[worker.index("--memory") + 1])
    executor = parse_size(env("streaming-job")["SPARK_EXECUTOR_MEMORY"])
    assert int(worker[worker.index("--cores") + 1]) == 2 and 2 * executor <= offered
    daemon = parse_size(env("spark-worker")["SPARK_DAEMON_MEMORY"])
    assert daemon + offered + 3 * JVM_OVERHEAD <= limit["spark-worker"]
    with_cluster = memory_budget(services, {"cluster"})
    assert with_cluster == budget + limit["spark-master"] + limit["spark-worker"]

    stated = re.findall(r"([\d.]+) GiB( with the cluster profile)?", COMPOSE_DOC.read_text())
    assert stated, "docs/compose.md states the total of the memory limits"
    assert {(float(s), bool(c)) for s, c in stated} == {
        (round(budget / 2**30, 1), False),
        (round(with_cluster / 2**30, 1), True),
    }, "docs/compose.md: the total of the memory limits, and with the cluster profile"


def test_our_images_are_tagged_with_the_package_version(resolved) -> None:
    from meterflow import __version__

    tags = {s["image"] for s in resolved["services"].values()}
    ours = {image for image in tags if image.split(":")[0] in OUR_IMAGES}
    assert ours == {f"{name}:{__version__}" for name in OUR_IMAGES}


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
    # On the cluster the executors write the lake and the stateful stage's state store.
    assert {"lake:/data/lake", "checkpoints:/data/checkpoints"} <= mounts("spark-worker")
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
    # Its JVM starts as `meterflow stream` starts its own.
    command = services["streaming-job"]["command"]
    java_options = command[command.index("--driver-java-options") + 1]
    assert java_options == STREAM_JAVA_OPTIONS


def documented_services() -> set[str]:
    """Service names in the first column of tables headed "Service" in docs/compose.md."""
    names = set()
    for doc in (COMPOSE_DOC,):
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
    assert documented, "docs/compose.md has no Service table"
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
