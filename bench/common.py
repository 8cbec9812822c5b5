"""Helpers shared by the benchmarks: a private broker, timing, and result files."""

from __future__ import annotations

import json
import platform
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from bench.report import table_markdown
from meterflow.clients import kafka
from meterflow.local.broker import LocalBroker

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_broker(workdir: Path) -> Iterator[str]:
    """A tansu broker of the benchmark's own, on a free loopback port."""
    broker = LocalBroker(free_port(), workdir / "broker.log").start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def machine() -> dict[str, str | int | float]:
    import os

    return {
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def write_results(name: str, results: dict) -> Path:
    """Write ``results/<name>.json`` and print its table (the one docs/benchmarks.md shows:
    ``python -m bench.report`` rewrites the page from the json files)."""
    RESULTS.mkdir(exist_ok=True)
    stamped = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **results,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    print(table_markdown(name, stamped))
    return RESULTS / f"{name}.json"


def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every message of a topic, up to its current end: what the benchmarks and tests count."""
    client = kafka.consumer(bootstrap)
    try:
        partitions = kafka.topic_partitions(client, [topic])
        ends = kafka.partition_ends(client, partitions)
        client.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
        pending = {tp for tp, end in ends.items() if end > 0}
        messages = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for message in client.consume(10_000, timeout=0.2):
                if message.error() is not None:
                    continue
                messages.append(message)
                topic_name, partition, offset = kafka.coordinates(message)
                key = (topic_name, partition)
                if offset + 1 >= ends[key]:
                    pending.discard(key)
        if pending:
            raise kafka.KafkaUnavailableError(
                f"could not read {topic} to its end within {timeout:.0f} s"
            )
        return messages
    finally:
        client.close()
