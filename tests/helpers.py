"""Helpers both test trees use: the repository's root, a free port, the ``meterflow``
command, waiting on a condition, sending messages to Kafka, the lake's exactly-once check,
an in-memory message sink.

What the benchmarks need too lives in the package (``meterflow.local.service.free_port``,
``meterflow.clients.kafka.read_to_end``, ``meterflow.local.compose``,
``meterflow.local.stall_proxy``); tests import nothing from ``bench/`` or from each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from meterflow.clients import kafka
from meterflow.local.service import free_port

if TYPE_CHECKING:
    from meterflow.core.config import Settings

__all__ = [  # free_port is the package's: one for tests and benchmarks
    "PROTOTYPE",
    "ROOT",
    "FailingBroker",
    "MemorySink",
    "assert_exactly_once",
    "committed_offsets",
    "free_port",
    "good",
    "kafka_records",
    "lake_offsets",
    "log_records",
    "log_tail",
    "meterflow",
    "reconciled",
    "recreate_topic",
    "send",
    "still_running",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def meterflow(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """``meterflow ARGS`` as a user runs it, from the repository's root; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "meterflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


# -- waiting ----------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    details: Callable[[], str] | None = None,
    interval: float = 0.1,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    After ``timeout`` seconds the test fails naming ``what`` (and ``details()``, say a log's
    tail). A condition may raise to fail at once (see :func:`still_running`).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            more = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{more}")
        time.sleep(interval)


@contextlib.contextmanager
def log_records(name: str = "meterflow") -> Iterator[list[logging.LogRecord]]:
    """Every record logger ``name`` and its children log meanwhile, whatever the logging
    set-up (the logger's level is opened to INFO meanwhile): what a test waits on when a
    log line is the observable (a retry, a stop, a carried-over state)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def recreate_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Delete ``topic`` and create it again, empty: a new topic id, a new generation."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([topic], request_timeout=15).values():
        future.result(15)
    kafka.ensure_topics(bootstrap, [topic], partitions)


def log_tail(*logs: Path, chars: int = 3000) -> str:
    """The end of each log, under its name: what a failed wait shows."""
    return "\n".join(
        f"--- {log.name}\n{log.read_text()[-chars:] if log.exists() else '(none)'}" for log in logs
    )


def still_running(process: subprocess.Popen, *logs: Path) -> bool:
    """True while ``process`` runs; once it exited, an assertion error with its exit code
    and its output (the ``logs``' tails, or what it wrote to its stderr pipe)."""
    code = process.poll()
    if code is None:
        return True
    if logs:
        output = log_tail(*logs)
    elif process.stderr is not None:
        output = str(process.communicate()[1])[-3000:]
    else:
        output = ""
    raise AssertionError(f"the process exited with code {code}:\n{output}")


# -- Kafka ------------------------------------------------------------------------------

#: The prototype's four messages: two good readings, a sentinel, a dead letter.
PROTOTYPE = [
    b'{"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 9}',
    b'{"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 18, "flow_rate": 5}',
    b'{"device_id": "em2", "timestamp": "2024-05-27T15:57:54Z", "usage_kwh": -1}',
    b"garbage",
]

Message = bytes | None | Mapping[str, Any] | tuple[bytes | None, bytes | None]


def send(
    target: Settings | str,
    messages: Iterable[Message],
    *,
    topic: str | None = None,
    key: bytes | None = None,
    partition: int | None = None,
    **config: Any,
) -> int:
    """Produce ``messages`` and wait until Kafka acknowledged every one; how many were sent.

    ``target`` is a test's settings (their broker, and their readings topic unless ``topic``
    names another) or a bootstrap address (then ``topic`` is needed). A message is bytes
    (or ``None``), a reading as a dict (sent as JSON, keyed by its ``device_id``), or a
    ``(key, value)`` pair. Bytes are keyed ``key`` if given, else ``em0`` .. ``em4`` in
    turn, so each partition of a topic gets some. ``partition`` sends all to one
    partition; ``config`` tunes the producer (it takes messages up to 4 MB, oversize ones
    included, for the stream to refuse).
    """
    if isinstance(target, str):
        bootstrap = target
        assert topic, "send(bootstrap, ...) needs topic="
    else:
        bootstrap, topic = target.kafka, topic or target.topic_readings
    producer = kafka.producer(bootstrap, **{"message.max.bytes": 4_000_000, **config})
    extra = {} if partition is None else {"partition": partition}
    count = 0
    for i, message in enumerate(messages):
        if isinstance(message, tuple):
            message_key, value = message
        elif isinstance(message, Mapping):
            value = json.dumps(message).encode()
            message_key = key or str(message["device_id"]).encode()
        else:
            value = message
            message_key = key if key is not None else f"em{i % 5}".encode()
        kafka.produce(producer, topic, value, message_key, **extra)
        count += 1
    undelivered = producer.flush(30)
    assert undelivered == 0, f"{undelivered} of {count} messages undelivered to {topic}"
    return count


class FailingBroker:
    """A listener on 127.0.0.1 that answers a Kafka client's first request with a frame too
    large to read: librdkafka logs one FAIL line and closes the connection, every time.

    ``connections`` counts the clients' connections. A client handles one connection at a
    time, so its second connection means the first one's failure (and log line) is done:
    what a test waits for instead of sleeping "long enough for librdkafka to fail".
    """

    #: A response frame claiming 2 GiB, and a correlation id.
    TOO_LARGE = b"\x7f\xff\xff\xff\x00\x00\x00\x00"

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            with client, contextlib.suppress(OSError):
                client.recv(65536)
                client.sendall(self.TOO_LARGE)
                client.recv(1)  # until the client closes it

    def __enter__(self) -> FailingBroker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.close()


# -- the lake ---------------------------------------------------------------------------


def good(i: int, device: str = "em1", value: float = 1.5) -> bytes:
    """A valid reading, minute ``i`` of 2024-05-27 (wrapping at 24 h)."""
    stamp = f"2024-05-27T{(i // 60) % 24:02d}:{i % 60:02d}:00Z"
    return json.dumps({"device_id": device, "timestamp": stamp, "usage_kwh": value}).encode()


def lake_offsets(settings: Settings) -> Counter[tuple[str, int, int]]:
    """(generation, partition, offset) of every row in the lake's readings and dead letters."""
    import pyarrow.dataset as ds

    from meterflow.core import lake

    found: Counter[tuple[str, int, int]] = Counter()
    for root in (lake.readings_path(settings.lake_path), lake.deadletter_path(settings.lake_path)):
        if not Path(root).exists():
            continue
        table = ds.dataset(root, format="parquet", partitioning="hive").to_table(
            columns=["source_generation", "source_partition", "source_offset"]
        )
        found.update(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))
    return found


def assert_exactly_once(settings: Settings, expected: int) -> None:
    """The lake holds ``expected`` source offsets, each once, and ``reconcile`` says so from
    the ledger and the files (docs/architecture.md, "Exactly once into the lake")."""
    offsets = lake_offsets(settings)
    assert sum(offsets.values()) == expected and max(offsets.values(), default=1) == 1
    assert reconciled(settings).lines[-1].startswith("reconciled:")


def reconciled(settings: Settings) -> Any:
    """``meterflow reconcile --scan-lake``'s report on the test's lake, asserted clean."""
    from meterflow.stream.reconcile import reconcile

    report = reconcile(
        settings.lake_path, settings.topic_readings, settings.kafka, scan_lake_files=True
    )
    assert report.ok, report.problems
    return report


def committed_offsets(lake_path: str | Path) -> int:
    """How many source offsets the lake's ledger holds: what a running stream has committed
    (read from outside its process)."""
    from meterflow.core.ledger import Ledger

    for _ in range(3):
        try:
            ledger = Ledger.load(str(lake_path))
            break
        except FileNotFoundError:  # compacted while listed: the next look is whole
            continue
    else:
        raise AssertionError(f"the ledger of {lake_path} kept changing under the reader")
    segments = (s for state in ledger.partitions.values() for s in state.segments)
    return sum(s.end - s.start for s in segments if not s.lost)


# -- in memory --------------------------------------------------------------------------


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
