"""A Spark standalone cluster from the pyspark wheel: a master and workers, each its own JVM.

The wheel carries a whole Spark, so the topology a growing city runs (a master, workers,
jobs submitted with ``SPARK_MASTER=spark://host:7077``) runs natively too, and docker
compose's ``cluster`` profile runs the very same command (``meterflow spark-cluster``) in
its ``spark-master`` and ``spark-worker`` containers. Jobs keep their driver where they are
submitted (client mode); their executors run in the workers. docs/architecture.md, "Where
Spark runs", says when to use a cluster rather than ``local[N]``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterflow.core.errors import MeterflowError
from meterflow.local.service import LOOPBACK, LocalService

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
MASTER_PORT = 7077
MASTER_UI_PORT = 8090
#: A JVM's first start on a busy 2-core machine takes 5-15 s.
START_TIMEOUT_S = 90.0


class SparkClusterError(MeterflowError):
    """A master or worker could not start, or stopped."""


def spark_class() -> str:
    """Spark's launcher from the pyspark wheel of this interpreter's environment."""
    beside = Path(sys.executable).with_name("spark-class")
    found = str(beside) if beside.exists() else shutil.which("spark-class")
    if found is None:
        raise SparkClusterError("spark-class not found: pip install -r requirements.txt (pyspark)")
    return found


def spark_environment() -> dict[str, str]:
    """This process's environment for a master or worker JVM: ``SPARK_HOME`` set to the
    wheel's Spark (left to itself, ``spark-class`` looks for pyspark with whatever ``python3``
    is first on PATH), and a port in use an error rather than the next port quietly taken,
    so the URLs printed are the ones in use."""
    import pyspark

    options = f"{os.environ.get('SPARK_DAEMON_JAVA_OPTS', '')} -Dspark.port.maxRetries=0"
    return {
        **os.environ,
        "SPARK_HOME": str(Path(pyspark.__file__).parent),
        "SPARK_DAEMON_JAVA_OPTS": options.strip(),
    }


def status(ui_url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """What a master's or worker's web UI reports at ``/json/``, or None if it does not
    answer (yet)."""
    try:
        with urllib.request.urlopen(f"{ui_url}/json/", timeout=timeout) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except (urllib.error.URLError, OSError, ValueError):
        return None


def local_ui(port: int) -> str:
    """A master's or worker's web UI as this machine reaches it: it listens on every
    interface, whatever ``--host`` the JVM's RPC binds to."""
    return f"http://{LOOPBACK}:{port}"


@dataclass
class SparkMaster(LocalService):
    """The master: ``rpc_port`` takes applications and workers, ``port`` serves its web UI
    (on every interface, so it is also how this process asks whether the master is up)."""

    rpc_port: int = MASTER_PORT
    host: str = LOOPBACK
    error: type[Exception] = field(default=SparkClusterError, init=False, repr=False)
    name: str = field(default="Spark master", init=False, repr=False)

    @property
    def url(self) -> str:
        return f"spark://{self.host}:{self.rpc_port}"

    def command(self) -> list[str]:
        return [spark_class(), MASTER_CLASS, "--host", self.host, "--port", str(self.rpc_port),
                "--webui-port", str(self.port)]  # fmt: skip

    def answers(self) -> bool:
        return status(local_ui(self.port)) is not None

    def environment(self) -> dict[str, str]:
        return spark_environment()

    def alive_workers(self) -> int:
        answer = status(local_ui(self.port))
        return int(answer.get("aliveworkers", 0)) if answer else 0


@dataclass
class SparkWorker(LocalService):
    """A worker offering ``cores`` and ``memory`` to executors; ``port`` is its web UI's."""

    master_url: str = f"spark://{LOOPBACK}:{MASTER_PORT}"
    cores: int = 1
    memory: str = "2g"
    work_dir: Path = Path("work")
    host: str = LOOPBACK
    error: type[Exception] = field(default=SparkClusterError, init=False, repr=False)
    name: str = field(default="Spark worker", init=False, repr=False)

    def command(self) -> list[str]:
        return [spark_class(), WORKER_CLASS, "--host", self.host, "--cores", str(self.cores),
                "--memory", self.memory, "--webui-port", str(self.port), "--work-dir",
                str(self.work_dir), self.master_url]  # fmt: skip

    def answers(self) -> bool:
        answer = status(local_ui(self.port))
        return answer is not None and answer.get("masterurl") == self.master_url

    def environment(self) -> dict[str, str]:
        return spark_environment()


@dataclass(frozen=True)
class ClusterPlan:
    """What ``meterflow spark-cluster`` starts: a master unless it ``join``s one, and
    ``workers`` workers of ``cores`` and ``memory`` each."""

    state_dir: Path
    workers: int = 2
    cores: int = 1
    memory: str = "2g"
    host: str = LOOPBACK
    port: int = MASTER_PORT
    ui_port: int = MASTER_UI_PORT
    join: str | None = None

    @property
    def master_url(self) -> str:
        return self.join or f"spark://{self.host}:{self.port}"


@dataclass
class RunningCluster:
    master_url: str
    master: SparkMaster | None
    workers: list[SparkWorker]

    @property
    def services(self) -> list[LocalService]:
        return [*([self.master] if self.master else []), *self.workers]

    def stopped(self) -> LocalService | None:
        """The first of its JVMs that is no longer running, if any."""
        for service in self.services:
            if service.process is None or service.process.poll() is not None:
                return service
        return None


@contextmanager
def spark_cluster(plan: ClusterPlan) -> Iterator[RunningCluster]:
    """Start the plan's master and workers, wait until the master counts every worker
    alive, and stop them all (workers first) when the block ends."""
    logs = plan.state_dir / "logs"
    with ExitStack() as stack:
        master = None
        if plan.join is None:
            master = SparkMaster(plan.ui_port, logs / "spark-master.log", plan.port, plan.host)
            stack.enter_context(_started(master))
        workers = []
        for number in range(1, plan.workers + 1):
            worker = SparkWorker(
                plan.ui_port + number,
                logs / f"spark-worker-{number}.log",
                plan.master_url,
                plan.cores,
                plan.memory,
                plan.state_dir / f"worker-{number}",
                plan.host,
            )
            stack.enter_context(_started(worker))
            workers.append(worker)
        if master is not None:
            _wait_for_workers(master, plan.workers)
        yield RunningCluster(plan.master_url, master, workers)


def _started(service: LocalService) -> LocalService:
    """``service`` started, or the reason it could not be in one line."""
    written = service.log_path.stat().st_size if service.log_path.exists() else 0
    try:
        return service.start(START_TIMEOUT_S)
    except SparkClusterError:
        with service.log_path.open("rb") as log:  # this start's lines, not an earlier one's
            log.seek(written)
            lines = log.read().decode(errors="replace")
        if "Address already in use" in lines:
            raise SparkClusterError(
                f"{service.name}: a port it needs is in use (its RPC or web UI port); choose "
                f"others with --port / --ui-port, see {service.log_path}"
            ) from None
        raise


def _wait_for_workers(master: SparkMaster, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while master.alive_workers() < count:
        if time.monotonic() > deadline:
            raise SparkClusterError(
                f"{master.url} counts {master.alive_workers()} of {count} workers alive after "
                f"{START_TIMEOUT_S:.0f} s; see the worker logs beside {master.log_path}"
            )
        time.sleep(0.2)
