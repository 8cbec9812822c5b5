"""Thin helpers over confluent-kafka: clients with sane defaults, topics, partition ends,
reading a topic to its end.

:func:`partition_ends` exists because the tansu broker used for native runs reports a
partition's high watermark as the base offset of its last record batch plus one, so a
reader planning from watermarks would miss each partition's tail (docs/architecture.md). It reads
from the reported watermark to the end-of-partition event to find the true end, which
costs one small fetch per partition and is exact on Apache Kafka too.

Every function takes the cluster as a :class:`~meterflow.core.kafka_security.KafkaCluster`
(``settings.kafka``: servers and security) or as a bootstrap string (plaintext, no login).
Every client they make refuses to retry forever when the cluster refuses meterflow:
an authentication failure (a wrong password) or a certificate that does not verify raises
:class:`KafkaRefusedError` from the call that served it (``poll``, ``flush``, ``consume``,
an admin request), one line naming the variable to check, never the password.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from meterflow.core.errors import MeterflowError, TransientError
from meterflow.core.kafka_security import KafkaCluster
from meterflow.core.logs import get_logger, timestamp

log = get_logger(__name__)
#: librdkafka's own messages (connection failures and the like) as meterflow log lines.
#: They are served on ``poll``/``flush``, so a client nobody polls any more (one left in
#: an idle Spark worker after the broker stopped) stays quiet instead of writing raw
#: ``%3|...|FAIL|`` lines to stderr.
client_log = get_logger("meterflow.clients.kafka.client")

#: A line served at most this long after the client's queue was last drained is on time.
_LATE_S = 1.0
#: Lines served this close to each other (the first, to the call) are one queued backlog.
_BURST_S = 0.05


class ClientLog:
    """The ``logger`` of one client: librdkafka's lines, saying when they can have happened.

    librdkafka queues a line without its time and confluent-kafka's log callback (always
    queued when a ``logger`` is set) has no time argument: a line's time is when a poll
    served it. A line that woke a waiting poll/consume/flush happened then; one found
    queued after the client sat unpolled happened since the previous poll returned, which
    it says as ``happened_after=`` (the line's own time being the other bound).
    """

    def __init__(self, target: logging.Logger = client_log) -> None:
        self.target = target
        self.drained = time.time()  # the queue was last known empty then
        self.serving: float | None = None  # in a poll/consume/flush since then
        self.last = 0.0  # the previous line served in this call
        self.backlog = False

    def __enter__(self) -> None:
        self.serving = self.last = time.time()
        self.backlog = True

    def __exit__(self, *_exc: object) -> None:
        self.drained = time.time()
        self.serving = None

    def log(self, level: int, _format: str, facility: str, client: str, text: str) -> None:
        now = time.time()
        after = self.drained
        if self.serving is not None:
            # A pause in the call means the backlog is done: later lines woke the wait.
            self.backlog = self.backlog and now - self.last <= _BURST_S
            self.last = now
            after = after if self.backlog else now
        if now - after <= _LATE_S:
            self.target.log(
                level,
                "kafka=%s client=%s %s",
                facility,
                client,
                text,
                extra={"kafka_happened_after": None},
            )
        else:
            self.target.log(
                level,
                "kafka=%s client=%s happened_after=%s %s",
                facility,
                client,
                timestamp(after),
                text,
                extra={"kafka_happened_after": after},
            )


class _Producer(Producer):
    """A producer that tells its :class:`ClientLog` when it serves its queue."""

    serving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

    def poll(self, *args: Any, **kwargs: Any) -> int:
        with self.serving:
            return super().poll(*args, **kwargs)

    def flush(self, *args: Any, **kwargs: Any) -> int:
        with self.serving:
            return super().flush(*args, **kwargs)


class _Consumer(Consumer):
    """A consumer that tells its :class:`ClientLog` when it serves its queue."""

    serving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        with self.serving:
            return super().poll(*args, **kwargs)

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        with self.serving:
            return super().consume(*args, **kwargs)


class KafkaUnavailableError(TransientError):
    """The cluster cannot be reached or refused a request; the message says which."""


class KafkaRefusedError(MeterflowError):
    """The cluster refused meterflow's credentials or certificate: waiting cannot help, so
    it is no :class:`TransientError`; the line says which variable to check."""


#: A cluster as the functions here take it: its bootstrap string means plaintext.
Cluster = KafkaCluster | str


def cluster_of(where: Cluster) -> KafkaCluster:
    return where if isinstance(where, KafkaCluster) else KafkaCluster(where)


def refusal(error: KafkaError, cluster: KafkaCluster) -> KafkaRefusedError | None:
    """The error meterflow stops on for ``error`` reported by a client of ``cluster``, or
    None for the ones librdkafka retries by itself (the broker away, say)."""
    text = error.str()
    security = cluster.security
    if error.code() == KafkaError._AUTHENTICATION:
        reason = text.split("error: ", 1)[-1].split(" (after ")[0]
        check = (
            "check KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE) and KAFKA_SASL_MECHANISM"
            if security.sasl
            else "check KAFKA_SECURITY_PROTOCOL and the cluster's listener"
        )
        line = (
            f"Kafka at {cluster.bootstrap} refused the credentials of {security.who()} "
            f"({reason}): {check}"
        )
    elif error.code() == KafkaError._SSL and "certificate" in text.lower():
        reason = text.split(": ", 1)[-1].split(" (after ")[0]
        line = (
            f"Kafka at {cluster.bootstrap}: TLS failed ({reason}): check KAFKA_SSL_CA_LOCATION "
            "(the CA that signed the brokers' certificates) and, for mTLS, "
            "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION"
        )
    else:
        return None
    if security.sasl_password:  # never in a message, whatever a broker says
        line = line.replace(security.sasl_password, "***")
    return KafkaRefusedError(line)


class _Refusals:
    """The ``error_cb`` of every client: a refusal raised (confluent-kafka raises it from
    the call serving the callback); librdkafka retries the other errors by itself."""

    def __init__(self, cluster: KafkaCluster) -> None:
        self.cluster = cluster

    def __call__(self, error: KafkaError) -> None:
        refused = refusal(error, self.cluster)
        if refused is not None:
            raise refused


def client_config(where: Cluster, **config: Any) -> dict[str, Any]:
    """A client's configuration: the cluster's servers and security, ``config``, and the
    ``error_cb`` that stops on a refusal."""
    cluster = cluster_of(where)
    return {**cluster.client_config(), "error_cb": _Refusals(cluster), **config}


def _admin(where: Cluster, **config: Any) -> AdminClient:
    return AdminClient(client_config(where, **config))


def _list_topics(admin: AdminClient, timeout: float) -> Any:
    """``admin.list_topics`` that serves the error callback meanwhile (a refusal raises at
    once instead of after ``timeout``); KafkaException after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.05, min(0.5, left)))
        except KafkaException:
            admin.poll(0)
            if time.monotonic() >= deadline:
                raise


def _result(admin: AdminClient, future: Any, deadline: float) -> Any:
    """An admin future's result, serving the error callback while it waits."""
    while True:
        try:
            return future.result(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            admin.poll(0)
            if time.monotonic() >= deadline:
                raise


@contextlib.contextmanager
def unavailable_as_error(what: str) -> Iterator[None]:
    """librdkafka's "not now" (a time-out, a transport failure, no leader) raised by a client
    call as :class:`KafkaUnavailableError`, so callers decide by type; other errors pass."""
    try:
        yield
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and (
            error.code() in TRANSIENT_ERRORS or error.retriable()
        ):
            raise KafkaUnavailableError(f"{what}: {error.str()}") from None
        raise


def coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a record or partition event (a client error has none)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaUnavailableError(f"consumer error: {message.error()}")
    return topic, partition, offset


def producer(cluster: Cluster, **overrides: Any) -> Producer:
    """A producer tuned for throughput that still waits for full acknowledgement."""
    config: dict[str, Any] = {
        **client_config(cluster),
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "message.timeout.ms": 60_000,
        "log.connection.close": False,
        "logger": ClientLog(),
    }
    config.update(overrides)
    client = _Producer(config)
    if isinstance(config["logger"], ClientLog):
        client.serving = config["logger"]
    return client


def produce(
    client: Producer, topic: str, value: bytes | None, key: bytes | None, **extra: Any
) -> None:
    """``client.produce`` that waits for room when the local queue is full, never drops."""
    while True:
        try:
            client.produce(topic, value, key, **extra)
            return
        except BufferError:  # local queue full: let deliveries drain, then retry
            client.poll(0.05)


class ProducerSink:
    """Where the simulator and replay write: a keyed producer that counts failed deliveries."""

    def __init__(self, cluster: Cluster, topic: str, **overrides: Any) -> None:
        self.topic = topic
        self.failed = 0
        self.last_error: str | None = None
        self._sent = 0
        # Only failures come back: a Python callback per delivered message would halve
        # the simulator's rate.
        self._producer = producer(
            cluster,
            on_delivery=self._delivered,
            **{"delivery.report.only.error": True},
            **overrides,
        )

    def _delivered(self, error: KafkaError | None, _message: object) -> None:
        if error is not None:
            self.failed += 1
            self.last_error = str(error)

    def emit(self, key: bytes | None, value: bytes) -> None:
        produce(self._producer, self.topic, value, key)
        self._sent += 1
        if self._sent % 10_000 == 0:
            self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; return how many messages are still undelivered or failed."""
        return self._producer.flush(timeout) + self.failed

    def close(self, timeout: float = 30.0) -> int:
        """Flush, then release the client (before its broker goes away, to keep logs quiet)."""
        undelivered = self.flush(timeout)
        del self._producer
        return undelivered


def consumer(cluster: Cluster, **overrides: Any) -> Consumer:
    """A consumer for readers that own their offsets (``assign``, no group commits)."""
    config: dict[str, Any] = {
        **client_config(cluster),
        "group.id": f"meterflow-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 50,
        "max.partition.fetch.bytes": 8 * 1024 * 1024,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "queued.min.messages": 200_000,
        "log.connection.close": False,
        "logger": ClientLog(),
    }
    config.update(overrides)
    client = _Consumer(config)
    if isinstance(config["logger"], ClientLog):
        client.serving = config["logger"]
    return client


def check_reachable(cluster: Cluster, timeout: float = 10.0) -> None:
    """Raise :class:`KafkaUnavailableError` unless the cluster answers a metadata request,
    :class:`KafkaRefusedError` at once if it refuses meterflow's credentials.

    librdkafka's own per-retry connection errors are silenced here: the one-line error
    raised after ``timeout`` says the same thing once.
    """
    admin = _admin(cluster, log_level=0)
    try:
        _list_topics(admin, timeout)
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"Kafka at {cluster_of(cluster).bootstrap} did not answer within {timeout:.0f} s "
            f"({exc.args[0]})"
        ) from None


def ensure_topics(
    cluster: Cluster, topics: Iterable[str], partitions: int, timeout: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = _admin(cluster, logger=client_log)
    try:
        existing = set(_list_topics(admin, timeout).topics)
    except KafkaException as exc:
        bootstrap = cluster_of(cluster).bootstrap
        raise KafkaUnavailableError(f"Kafka at {bootstrap} unreachable: {exc.args[0]}") from None
    wanted = [t for t in dict.fromkeys(topics) if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(t, partitions, 1) for t in wanted], request_timeout=timeout
    )
    created = []
    deadline = time.monotonic() + timeout
    for topic, future in futures.items():
        try:
            _result(admin, future, deadline)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaUnavailableError(f"cannot create topic {topic}: {exc.args[0]}") from None
    return created


def topic_partitions(
    client: Consumer, topics: Iterable[str], timeout: float = 10.0
) -> list[tuple[str, int]]:
    """The partitions of existing topics; a missing topic is an error that names it."""
    result: list[tuple[str, int]] = []
    for topic in topics:
        with unavailable_as_error(f"listing the partitions of {topic}"):
            metadata = client.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            reason = metadata.error if metadata is not None else "no metadata"
            raise KafkaUnavailableError(
                f"topic {topic!r} does not exist or has no partitions ({reason})"
            )
        result.extend((topic, p) for p in sorted(metadata.partitions))
    return result


def partition_ends(
    client: Consumer,
    partitions: Iterable[tuple[str, int]],
    known: Mapping[tuple[str, int], int] | None = None,
    timeout: float = 10.0,
    lows: dict[tuple[str, int], int] | None = None,
    exact: bool = True,
) -> dict[tuple[str, int], int]:
    """The offset after each partition's last record, read from the log, not the watermark.

    ``known`` holds ends found earlier; probing resumes there instead of re-reading the last
    record batch. ``client`` must have ``enable.partition.eof`` set; its assignment changes.
    ``lows``, if given, receives each partition's first offset still held by the broker.

    ``exact=False`` stops at the first records past the watermark instead of the
    partition's end: an end no greater than the true one, found in one fetch. On a topic
    that is being written, the end is never reached for long, so waiting for it costs
    seconds; a running stream's next micro-batch reads the rest.
    """
    known = known or {}
    ends: dict[tuple[str, int], int] = {}
    probes = []
    for topic, partition in partitions:
        with unavailable_as_error(f"reading the offsets of {topic}[{partition}]"):
            low, high = client.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
        if lows is not None:
            lows[(topic, partition)] = low
        start = max(high - 1, low, known.get((topic, partition), 0))
        ends[(topic, partition)] = max(high, start)
        probes.append(TopicPartition(topic, partition, start))
    if not probes:
        return ends
    client.assign(probes)
    pending = set(ends)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for message in client.consume(10_000, timeout=0.05):
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise KafkaUnavailableError(
                    f"probing the end of {message.topic()}[{message.partition()}]: {error}"
                )
            topic, partition, offset = coordinates(message)
            key = (topic, partition)
            if error is None:
                ends[key] = max(ends[key], offset + 1)
                if not exact:
                    pending.discard(key)
            else:  # the end of the partition
                ends[key] = max(ends[key], offset)
                pending.discard(key)
    if pending:
        log.warning("partition end probe timed out partitions=%s", sorted(pending))
    client.unassign()
    return ends


def read_to_end(cluster: Cluster, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every record of ``topic`` up to each partition's end as found now (not its
    watermark: see :func:`partition_ends`), for counting what a topic holds.

    Raises :class:`KafkaUnavailableError` if a partition is not read to its end in time.
    """
    client = consumer(cluster)
    try:
        partitions = topic_partitions(client, [topic])
        ends = partition_ends(client, partitions)
        client.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
        pending = {key for key, end in ends.items() if end > 0}
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for message in client.consume(10_000, timeout=0.2):
                if message.error() is not None:
                    continue
                records.append(message)
                topic_name, partition, offset = coordinates(message)
                if offset + 1 >= ends[(topic_name, partition)]:
                    pending.discard((topic_name, partition))
        if pending:
            raise KafkaUnavailableError(
                f"could not read {topic} to its end within {timeout:.0f} s "
                f"(partitions {sorted(p for _, p in pending)} short)"
            )
        return records
    finally:
        client.close()


#: Delivery errors that mean "not now" rather than "never": the batch is retried.
TRANSIENT_ERRORS = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
    }
)


def topic_ids(cluster: Cluster, topics: Iterable[str], timeout: float = 10.0) -> dict[str, str]:
    """Each topic's Kafka topic id: it changes when a topic is recreated, offsets restart.

    Raises :class:`KafkaUnavailableError` if the cluster does not answer or a topic is
    missing, and when the broker reports no ids (Kafka before 2.8).
    """
    admin = _admin(cluster, logger=client_log)
    bootstrap = cluster_of(cluster).bootstrap
    names = list(dict.fromkeys(topics))
    try:
        futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
        deadline = time.monotonic() + timeout
        described = {
            name: _result(admin, future, deadline + 0.1) for name, future in futures.items()
        }
    except (KafkaException, TimeoutError) as exc:
        reason = exc.args[0] if exc.args else f"no answer within {timeout:.0f} s"
        raise KafkaUnavailableError(
            f"Kafka at {bootstrap} could not describe {', '.join(names)}: {reason}"
        ) from None
    result = {}
    for name, description in described.items():
        topic_id = str(description.topic_id or "")
        if not topic_id or set(topic_id) <= {"A", "0", "-"}:
            raise KafkaUnavailableError(
                f"Kafka at {bootstrap} reports no topic id for {name} (Kafka 2.8+ is required)"
            )
        result[name] = topic_id
    return result


def group_caught_up(
    cluster: Cluster, group: str, ends: Mapping[str, Mapping[int, int]], timeout: float = 10.0
) -> bool:
    """Whether consumer group ``group`` has committed every offset up to ``ends``."""
    client = consumer(cluster, **{"group.id": group})
    try:
        wanted = [TopicPartition(t, p) for t, parts in ends.items() for p, e in parts.items() if e]
        if not wanted:
            return True
        committed = client.committed(wanted, timeout=timeout)
    except KafkaException:
        return False
    finally:
        client.close()
    return all(tp.offset >= ends[tp.topic][tp.partition] for tp in committed)
