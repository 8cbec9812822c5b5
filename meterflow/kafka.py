"""Thin helpers over confluent-kafka: clients with sane defaults, topics, partition ends.

:func:`partition_ends` exists because the tansu broker used for native runs reports a
partition's high watermark as the base offset of its last record batch plus one, so a
reader planning from watermarks would miss each partition's tail (DESIGN.md). It reads
from the reported watermark to the end-of-partition event to find the true end, which
costs one small fetch per partition and is exact on Apache Kafka too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from meterflow.logs import get_logger

log = get_logger(__name__)
#: librdkafka's own messages (connection failures and the like) as meterflow log lines.
#: They are served on ``poll``/``flush``, so a client nobody polls any more (one left in
#: an idle Spark worker after the broker stopped) stays quiet instead of writing raw
#: ``%3|...|FAIL|`` lines to stderr.
client_log = get_logger("meterflow.kafka.client")


class KafkaUnavailableError(RuntimeError):
    """The cluster cannot be reached or refused a request; the message says which."""


def producer(bootstrap: str, **overrides: Any) -> Producer:
    """A producer tuned for throughput that still waits for full acknowledgement."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "message.timeout.ms": 60_000,
        "log.connection.close": False,
        "logger": client_log,
    }
    config.update(overrides)
    return Producer(config)


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

    def __init__(self, bootstrap: str, topic: str, **overrides: Any) -> None:
        self.topic = topic
        self.failed = 0
        self.last_error: str | None = None
        self._sent = 0
        # Only failures come back: a Python callback per delivered message would halve
        # the simulator's rate.
        self._producer = producer(
            bootstrap,
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


def consumer(bootstrap: str, **overrides: Any) -> Consumer:
    """A consumer for readers that own their offsets (``assign``, no group commits)."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": f"meterflow-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 50,
        "max.partition.fetch.bytes": 8 * 1024 * 1024,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "queued.min.messages": 200_000,
        "log.connection.close": False,
        "logger": client_log,
    }
    config.update(overrides)
    return Consumer(config)


def check_reachable(bootstrap: str, timeout: float = 10.0) -> None:
    """Raise :class:`KafkaUnavailableError` unless the cluster answers a metadata request.

    librdkafka's own per-retry connection errors are silenced here: the one-line error
    raised after ``timeout`` says the same thing once.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"Kafka at {bootstrap} did not answer within {timeout:.0f} s ({exc.args[0]})"
        ) from None


def ensure_topics(
    bootstrap: str, topics: Iterable[str], partitions: int, timeout: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": client_log})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaUnavailableError(f"Kafka at {bootstrap} unreachable: {exc.args[0]}") from None
    wanted = [t for t in dict.fromkeys(topics) if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(t, partitions, 1) for t in wanted], request_timeout=timeout
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result(timeout=timeout)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaUnavailableError(f"cannot create topic {topic}: {exc.args[0]}") from None
    return created


def topic_partitions(
    client: Consumer, topics: Iterable[str], timeout: float = 10.0
) -> list[tuple[str, int]]:
    """The partitions of existing topics; a missing topic is an error that names it."""
    result = []
    for topic in topics:
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
) -> dict[tuple[str, int], int]:
    """The offset after each partition's last record, read from the log, not the watermark.

    ``known`` holds ends found earlier; probing resumes there instead of re-reading the last
    record batch. ``client`` must have ``enable.partition.eof`` set; its assignment changes.
    """
    known = known or {}
    ends: dict[tuple[str, int], int] = {}
    probes = []
    for topic, partition in partitions:
        low, high = client.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
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
            key = (message.topic(), message.partition())
            error = message.error()
            if error is None:
                ends[key] = max(ends[key], message.offset() + 1)
            elif error.code() == KafkaError._PARTITION_EOF:
                ends[key] = max(ends[key], message.offset())
                pending.discard(key)
            else:
                raise KafkaUnavailableError(f"probing the end of {key[0]}[{key[1]}]: {error}")
    if pending:
        log.warning("partition end probe timed out partitions=%s", sorted(pending))
    client.unassign()
    return ends


def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list:
    """Every message of a topic, up to its current end (for checks and reconciliation)."""
    client = consumer(bootstrap)
    try:
        partitions = topic_partitions(client, [topic])
        ends = partition_ends(client, partitions)
        client.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
        pending = {tp for tp, end in ends.items() if end > 0}
        messages = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for message in client.consume(10_000, timeout=0.2):
                if message.error() is not None:
                    continue
                messages.append(message)
                key = (message.topic(), message.partition())
                if message.offset() + 1 >= ends[key]:
                    pending.discard(key)
        if pending:
            raise KafkaUnavailableError(f"could not read {topic} to its end within {timeout:.0f} s")
        return messages
    finally:
        client.close()
