"""librdkafka's lines as meterflow log lines, each honest about when it happened.

librdkafka queues a line without its time, and confluent-kafka's log callback has no time
argument: a line's own time is when a poll served it. These tests pin what a line can
still say: on time when it woke a waiting poll, ``happened_after=`` when found queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import log_records, wait_for

from meterflow.clients import kafka
from meterflow.core import logs
from meterflow.core.config import Settings
from meterflow.serving.sink import Sink

#: How long the first test leaves a client unpolled: well past ``kafka._LATE_S``.
QUIET_S = 3.0


@pytest.fixture
def client_lines() -> Iterator[list[logging.LogRecord]]:
    """Every line librdkafka's clients log during the test (whatever the logging set-up)."""
    with log_records(kafka.client_log.name) as records:
        yield records


def unreachable_producer(port: int, timeout_ms: int = 10_000) -> Any:
    """A producer whose broker refuses connections: librdkafka logs FAIL, again and again;
    its one message is given up after ``timeout_ms``."""
    producer = kafka.producer(f"127.0.0.1:{port}", **{"message.timeout.ms": timeout_ms})
    producer.produce("nowhere", b"x")
    return producer


def test_a_line_found_queued_says_since_when_it_can_have_happened(
    free_port: int, client_lines: list[logging.LogRecord]
) -> None:
    producer = unreachable_producer(free_port)
    try:
        producer.poll(0)
        drained = time.time()
        # The subject is this span itself: nobody polls for QUIET_S while librdkafka's lines
        # wait in its queue, and a line served after it must say how stale it can be.
        time.sleep(QUIET_S)
        served = time.time()
        producer.poll(0)
    finally:
        producer.purge()
    late = [r for r in client_lines if r.created >= served]
    assert late, "librdkafka logged nothing while the broker refused connections"
    formatter = logging.Formatter("%(message)s")
    for record in late:
        # Its time is when it was served; it happened after the previous poll drained the
        # queue (the best librdkafka tells), not some QUIET_S seconds later.
        assert drained - 0.05 <= record.kafka_happened_after <= drained
        assert record.created - record.kafka_happened_after >= QUIET_S
        line = formatter.format(record)
        assert line.startswith("kafka=FAIL client=rdkafka#producer-")
        assert f"happened_after={logs.timestamp(record.kafka_happened_after)} " in line
        assert str(free_port) in line


def test_a_line_that_wakes_a_waiting_poll_is_on_time(
    free_port: int, client_lines: list[logging.LogRecord]
) -> None:
    producer = unreachable_producer(free_port, timeout_ms=2000)
    try:
        producer.poll(0)
        started = time.time()
        # Waits until the undeliverable message is given up, serving lines as they come.
        assert producer.flush(30) == 0
    finally:
        producer.purge()
    live = [r for r in client_lines if r.created > started + 0.1]
    assert live
    for record in live:
        assert record.kafka_happened_after is None  # its own time is when it happened
        assert "happened_after" not in record.getMessage()


def test_the_sinks_producer_lines_are_served_while_it_consumes(
    free_port: int, tmp_path: Path, db: Any, client_lines: list[logging.LogRecord]
) -> None:
    """The sink's dead-letter producer is flushed only for dead letters: unless the sink
    serves its queue as it polls, its lines come out at the next dead letter, or never."""
    settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port}", "METERFLOW_DATA_DIR": str(tmp_path)}
    )
    sink = Sink(settings, db)

    def producer_lines() -> list[logging.LogRecord]:
        sink.poll_once(0.2)
        return [r for r in client_lines if "client=rdkafka#producer-" in r.getMessage()]

    try:
        # The sink's producer is idempotent: it connects at once, and fails.
        produced = wait_for(producer_lines, 10, "a line of the sink's producer", interval=0)
    finally:
        sink.close()
    assert all(r.kafka_happened_after is None for r in produced)
