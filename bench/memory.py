"""Peak memory of each compose service, measured natively in compose's shape.

Every service built from this project's images is started here with the compose file's
own command and environment (``meterflow.local.compose``: ``.env.example``'s values, hosts
and ports swapped for local ones, heap settings kept): the streaming job (``spark-submit``
with ``SPARK_MASTER``), the sink, the simulator, the one-shot init steps, and Airflow's
api-server, scheduler, dag-processor and triggerer. The load:

1. one backfilled day of the compose fleet (``SIMULATOR_METERS`` meters every
   ``SIMULATOR_INTERVAL``), which the stream catches up in micro-batches;
2. the live simulator at ``SIMULATOR_RATE``;
3. the daily DAG's run for that day, scheduled by the scheduler: its Spark job runs in the
   scheduler's process tree, as in the scheduler's container;
4. then, measured apart, a city's load: the compose simulator's command with
   ``LOAD_METERS`` meters every second, capped at ``--load-rate`` (50,000 readings/s), for
   ``--load-seconds``, through the same streaming job and sink. Its peaks (the stream, the
   sink, that simulator) and the rates reached are the results' ``load``.

Each service's process tree is sampled every second. A container's cgroup charges each
page once, so the figure is an estimate of that: the tree's unique memory (USS of every
process) plus the largest shared part of any one process; the plain RSS sum (an upper
bound that counts pages shared by forked workers again) is reported too. The baseline is
each service's ``mem_limit`` in docker-compose.yml: the run fails when a peak leaves less
than ``HEADROOM`` of its limit free. Where natively there is no such process (Kafka,
MongoDB, Metabase, PostgreSQL), the limit follows from the heap or cache size the compose
file gives it; the results list those as ``measured: false``.

Differences from compose: the local broker stands in for Kafka and the nx-27017 stand-in
for MongoDB; the streaming job reads Kafka through the Python source (no connector jar
here); Airflow's metadata database is SQLite.

    python -m bench.memory [--live-seconds 90] [--load-rate 50000] [--load-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.common import local_broker, write_results
from meterflow.clients import kafka
from meterflow.compose_check import active, memory_budget, parse_size
from meterflow.core.config import Settings
from meterflow.core.ledger import Ledger, audit
from meterflow.local.compose import (
    BIN,
    env_example,
    native,
    resolved_compose,
    running,
    service_env,
)
from meterflow.local.mongo import LocalMongo
from meterflow.local.service import free_port

ROOT = Path(__file__).resolve().parents[1]
#: Share of a service's ``mem_limit`` that must stay free at its measured peak.
HEADROOM = 0.2
MIB = 2**20
AIRFLOW = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
#: Services with no native process here, and what sizes them in the compose file.
NOT_MEASURED = {
    "kafka": "KAFKA_HEAP_OPTS heap + JVM overhead",
    "mongodb": "--wiredTigerCacheSizeGB cache + mongod",
    "metabase": "JAVA_OPTS heap + JVM overhead",
    "airflow-postgres": "PostgreSQL shared_buffers (128 MB) + connections",
    "metabase-postgres": "PostgreSQL shared_buffers (128 MB) + connections",
    "metabase-init": "a meterflow command like kafka-init (needs a Metabase to talk to)",
}


def describe(argv: list[str]) -> str:
    """A process in a few words: its program and main class or first arguments."""
    if not argv:
        return "?"
    words = [a for a in argv[1:] if a.startswith("org.") or not a.startswith("-")]
    return " ".join([Path(argv[0]).name, *(Path(w).name for w in words[:2])])[:60]


def tree_memory(root: int) -> tuple[int, int, list[tuple[str, int]]]:
    """(estimated cgroup charge, RSS sum, [(process, USS)]) of a process tree, in bytes."""
    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, []
    unique = shared = rss = 0
    parts = []
    for process in processes:
        try:
            info = process.memory_full_info()
            name = describe(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        unique += info.uss
        shared = max(shared, info.rss - info.uss)
        rss += info.rss
        parts.append((name, info.uss))
    return unique + shared, rss, parts


class Sampler(threading.Thread):
    """Peak memory per service, from the process trees registered with :meth:`watch`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.roots: dict[str, list[int]] = {}
        self.peaks: dict[str, tuple[int, int]] = {}
        self.parts: dict[str, list[tuple[str, int]]] = {}
        self.stopping = threading.Event()

    def watch(self, service: str, pid: int) -> None:
        self.roots.setdefault(service, []).append(pid)

    def sample(self) -> None:
        for service, pids in list(self.roots.items()):
            charge = rss = 0
            parts: list[tuple[str, int]] = []
            for pid in pids:
                tree_charge, tree_rss, tree_parts = tree_memory(pid)
                charge, rss = charge + tree_charge, rss + tree_rss
                parts += tree_parts
            old = self.peaks.get(service, (0, 0))
            if charge > old[0]:
                self.parts[service] = sorted(parts, key=lambda part: -part[1])
            self.peaks[service] = (max(old[0], charge), max(old[1], rss))

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            self.sample()


def _tail(log: Path) -> str:
    """A dead service's story: its error lines (the first names the cause; a JVM's stack
    trace would push it out of a plain tail), then the log's end."""
    text = log.read_text(errors="replace")
    errors = [line[:2000] for line in text.splitlines() if "level=ERROR" in line]
    return "\n".join([*errors[:3], "...", text[-1500:]])


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    logs: Path,
    services: dict[str, subprocess.Popen],
) -> float:
    """Seconds until ``check()`` holds; exits with the logs' tails when a service died."""
    started = time.monotonic()
    while not check():
        dead = [name for name, process in services.items() if process.poll() is not None]
        if dead:
            tails = "\n".join(f"--- {n}\n{_tail(logs / f'{n}.log')}" for n in dead)
            raise SystemExit(f"bench: {', '.join(dead)} exited while waiting for {what}\n{tails}")
        if time.monotonic() - started > timeout:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in logs.glob("*.log"))
            raise SystemExit(f"bench: {what} not ready after {timeout:.0f} s\n{tails}")
        time.sleep(2)
    return time.monotonic() - started


def one_shot(
    name: str, service: dict[str, Any], env: dict[str, str], swap: dict[str, str], logs: Path
) -> tuple[int, int]:
    """Run an init step to its end: its peak (estimated charge, RSS sum) in bytes."""
    log = logs / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            native(service["command"], swap), env=env, cwd=ROOT, stdout=out, stderr=out
        )
        peak = (0, 0)
        while process.poll() is None:
            charge, rss, _ = tree_memory(process.pid)
            peak = (max(peak[0], charge), max(peak[1], rss))
            time.sleep(0.2)
    if process.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"bench: {name} exited with {process.returncode}:\n{tail}")
    return peak


def ledger_offsets(lake: Path) -> int:
    """Offsets the lake's ledger has committed so far."""
    if not (lake / "_ledger").exists():
        return 0
    return sum(partition.committed for partition in audit(Ledger.load(str(lake))))


def readings_end(bootstrap: str, values: dict[str, str]) -> dict[int, int]:
    """End offset of each partition of the readings topic."""
    consumer = kafka.consumer(bootstrap)
    try:
        topic = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}).topic_readings
        ends = kafka.partition_ends(consumer, kafka.topic_partitions(consumer, [topic]))
    finally:
        consumer.close()
    return {partition: end for (_, partition), end in ends.items()}


def dag_run_state(api_port: int, token: str, dag_id: str, day: date) -> str:
    """State of the scheduled run of ``dag_id`` for ``day`` (catch-up also starts today's)."""
    run_id = urllib.parse.quote(f"scheduled__{day.isoformat()}T00:00:00+00:00")
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["state"])
    except OSError:
        return "unknown"


def api_token(api_port: int, user: str, password: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/auth/token",
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["access_token"]


#: The city load's fleet: meters reading every second, so that the simulator's cap is the rate.
LOAD_METERS = 50_000


def city_load(
    rate: int,
    seconds: float,
    started: dict[str, subprocess.Popen],
    simulate: Callable[[tuple[str, ...]], subprocess.Popen],
    bootstrap: str,
    lake: Path,
) -> dict[str, Any]:
    """Phase 4: the compose simulator replaced by one offering ``rate`` readings/s for
    ``seconds``; peaks of the stream, the sink and that simulator, and the rates reached."""
    compose_simulator = started.pop("simulator")
    os.killpg(compose_simulator.pid, signal.SIGTERM)
    compose_simulator.wait(60)
    sampler = Sampler()
    for name in ("streaming-job", "sink"):
        sampler.watch(name, started[name].pid)
    sampler.start()
    produced_before = sum(readings_end(bootstrap, {}).values())
    committed_before = ledger_offsets(lake)
    print(f"bench: the simulator at {rate:,} readings/s for {seconds:.0f} s", flush=True)
    simulator = simulate(("--rate", str(rate), "--meters", str(LOAD_METERS), "--interval", "1s",
                          "--no-registry"))  # fmt: skip
    sampler.watch("simulator", simulator.pid)
    began = time.monotonic()
    time.sleep(seconds)
    produced = sum(readings_end(bootstrap, {}).values()) - produced_before
    committed = ledger_offsets(lake) - committed_before
    elapsed = time.monotonic() - began
    sampler.stopping.set()
    sampler.join()
    return {
        "offered_per_s": rate,
        "seconds": round(elapsed, 1),
        "produced_per_s": round(produced / elapsed),
        "stream_committed_per_s": round(committed / elapsed),
        "peak_mb": {name: round(peak[0] / MIB) for name, peak in sampler.peaks.items()},
        "peak_rss_sum_mb": {name: round(peak[1] / MIB) for name, peak in sampler.peaks.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live-seconds", type=float, default=90)
    parser.add_argument("--load-rate", type=int, default=50_000, help="readings/s offered")
    parser.add_argument("--load-seconds", type=float, default=60)
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every started service is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    compose = resolved_compose()
    # What `docker compose up` starts: the cluster profile's services are not measured here.
    services = {name: s for name, s in compose["services"].items() if active(s)}
    values = env_example()
    day = (datetime.now(UTC) - timedelta(days=1)).date()
    sampler = Sampler()
    one_shots: dict[str, tuple[int, int]] = {}

    with tempfile.TemporaryDirectory(prefix="meterflow-memory-") as scratch, ExitStack() as stack:
        work = Path(scratch)
        logs = work / "logs"
        logs.mkdir()
        bootstrap = stack.enter_context(local_broker(work))
        mongo = stack.enter_context(LocalMongo(free_port(), logs / "mongo.log", work / "mongo"))
        mongo.start()
        driver_ui, api_port, health_port = (free_port() for _ in range(3))
        data = work / "data"
        base = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "METERFLOW_DATA_DIR": str(data),
            "LAKE_PATH": str(data / "lake"),
            "CHECKPOINT_PATH": str(data / "checkpoints"),
            "MONGO_URI": mongo.uri,
            "METERFLOW_KAFKA_SOURCE": "python",  # natively there is no spark-sql-kafka jar
            "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
            # Compose's Kafka requires a SASL login; the local broker takes none.
            "KAFKA_SECURITY_PROTOCOL": "plaintext",
            "KAFKA_SASL_USERNAME": "",
            "KAFKA_SASL_PASSWORD": "",
        }

        started: dict[str, subprocess.Popen] = {}

        def start(
            name: str,
            overrides: dict[str, str],
            swap: dict[str, str],
            *flags: str,
            after: tuple[str, ...] = (),
        ) -> None:
            """A long-running service with the compose command (``flags`` after its
            program, ``after`` at its end), sampled."""
            command = [*native(services[name]["command"], swap), *after]
            command[1:1] = flags
            log = logs / f"{name}.log"
            process = stack.enter_context(
                running(command, service_env(services[name], **overrides), log)
            )
            sampler.watch(name, process.pid)
            started[name] = process

        print("bench: init steps (kafka-init, fleet-registry, mongo-init)", flush=True)
        for name in ("kafka-init", "fleet-registry", "mongo-init"):
            one_shots[name] = one_shot(
                name, services[name], service_env(services[name], **base), {}, logs
            )

        print(f"bench: backfilling {day} for the compose fleet", flush=True)
        backfill = [
            str(BIN / "meterflow"), "simulate", "--mode", "backfill", "--days", "1",
            "--end-date", (day + timedelta(days=1)).isoformat(),
            "--meters", values["SIMULATOR_METERS"], "--seed", values["SIMULATOR_SEED"],
            "--interval", values["SIMULATOR_INTERVAL"], "--no-registry",
        ]  # fmt: skip
        subprocess.run(
            backfill, env={**service_env({}), **base}, cwd=ROOT, check=True, capture_output=True
        )
        produced = sum(readings_end(bootstrap, values).values())

        sampler.start()
        print("bench: streaming-job, sink", flush=True)
        start("streaming-job", base, {}, "--conf", f"spark.ui.port={driver_ui}")
        start("sink", base, {})

        lake = data / "lake"
        caught_up = wait_until(
            lambda: ledger_offsets(lake) >= produced, "catch-up", 1800, logs, started
        )
        print(f"bench: stream caught up {produced:,} readings in {caught_up:.0f} s", flush=True)

        start("simulator", base, {})

        home = work / "airflow"
        admin_password = "memory-bench-password"
        airflow_overrides = {
            **base,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "pw.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__API_AUTH__JWT_SECRET": "memory-bench-jwt-secret-0123456789",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(health_port),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW_ADMIN_PASSWORD": admin_password,
            "AIRFLOW_CONN_KAFKA_DEFAULT": json.dumps(
                {"conn_type": "kafka", "extra": {"bootstrap.servers": bootstrap}}
            ),
            "METERFLOW_DAG_START_DATE": day.isoformat(),
            "PATH": f"{BIN}:{service_env({})['PATH']}",
        }
        airflow_swap = {"8080": str(api_port), "localhost:8974": f"127.0.0.1:{health_port}"}
        print("bench: airflow-init, then Airflow's four services", flush=True)
        one_shots["airflow-init"] = one_shot(
            "airflow-init",
            services["airflow-init"],
            service_env(services["airflow-init"], **airflow_overrides),
            airflow_swap,
            logs,
        )
        for name in AIRFLOW:
            start(name, airflow_overrides, airflow_swap)
        token = ""

        def daily_done() -> bool:
            nonlocal token
            try:
                token = token or api_token(
                    api_port, values["AIRFLOW_ADMIN_USERNAME"], admin_password
                )
            except OSError:
                return False
            return dag_run_state(api_port, token, "meter_daily_averages", day) in {
                "success",
                "failed",
            }

        took = wait_until(daily_done, "the daily DAG run", 1800, logs, started)
        state = dag_run_state(api_port, token, "meter_daily_averages", day)
        print(f"bench: daily DAG run for {day}: {state} after {took:.0f} s", flush=True)
        time.sleep(args.live_seconds)
        sampler.stopping.set()
        sampler.join()

        def simulate(arguments: tuple[str, ...]) -> subprocess.Popen:
            start("simulator", base, {}, after=arguments)
            return started["simulator"]

        load = city_load(args.load_rate, args.load_seconds, started, simulate, bootstrap, lake)

    rows = []
    failures = []
    for name, service in services.items():
        limit = parse_size(str(service.get("mem_limit", "0")))
        if name in sampler.peaks or name in one_shots:
            charge, rss = sampler.peaks.get(name) or one_shots[name]
            measured = True
        else:
            charge = rss = 0
            measured = False
        row = {
            "service": name,
            "mem_limit_mb": round(limit / MIB),
            "measured": measured,
            "peak_mb": round(charge / MIB),
            "peak_rss_sum_mb": round(rss / MIB),
            "sized_by": NOT_MEASURED.get(name, "measured peak"),
            "at_peak_uss_mb": {
                f"{index}:{part}": round(uss / MIB)
                for index, (part, uss) in enumerate(sampler.parts.get(name, [])[:8])
            },
        }
        if measured and charge > limit * (1 - HEADROOM):
            failures.append(
                f"{name}: peak {charge / MIB:.0f} MB against a {limit / MIB:.0f} MB limit"
            )
        rows.append(row)
    budget = round(memory_budget(services) / MIB)
    long_running = sum(
        row["mem_limit_mb"]
        for row, service in zip(rows, services.values(), strict=True)
        if service.get("restart") != "no"
    )
    results = {
        "services": rows,
        "budget_mb": budget,
        "long_running_limit_mb": long_running,
        "headroom": HEADROOM,
        "backfilled_readings": produced,
        "daily_run_state": state,
        "within_limits": not failures,
        "load": load,
    }
    write_results("memory", results)
    if state != "success":
        print(f"bench: the daily DAG run ended {state}", file=sys.stderr)
        return 1
    if failures:
        print("bench: less than 20% headroom: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
