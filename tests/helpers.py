"""Helpers both test trees use: the repository's root, a free port, the ``meterflow`` command,
an in-memory message sink, a recreated Kafka topic, a logger's messages."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def meterflow(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "meterflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


class MemorySink:
    """Keeps every message in order; everything counts as delivered at once."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.flushes = 0

    def emit(self, key: bytes, value: bytes) -> None:
        self.messages.append((key, value))

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return 0


def kafka_records(values: list[bytes | None], timestamp_us: int, topic: str = "iot-meter"):
    """An Arrow batch shaped as the Kafka source gives it (one partition, offsets from 0)."""
    import pyarrow as pa

    count = len(values)
    return pa.RecordBatch.from_pydict(
        {
            "key": [b"k"] * count,
            "value": values,
            "topic": [topic] * count,
            "partition": [0] * count,
            "offset": list(range(count)),
            "timestamp": pa.array([timestamp_us] * count, pa.timestamp("us", "UTC")),
        }
    )


def recreate_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Delete ``topic`` and create it again, empty: a new topic id, a new generation."""
    from confluent_kafka.admin import AdminClient

    from meterflow.clients import kafka

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([topic], request_timeout=15).values():
        future.result(15)
    kafka.ensure_topics(bootstrap, [topic], partitions)


@contextlib.contextmanager
def logged(name: str, level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages of logger ``name`` and its children meanwhile, whatever handlers the
    process set up (``setup_logging`` stops meterflow's records at its own logger)."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, previous = _Keep(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
