"""The Kafka clients the Python Kafka data source reads with, without a broker: their
connection errors are meterflow log lines. The source itself, on Spark against a real
broker, is tested in tests/integration/test_kafka_source_broker.py.
"""

from __future__ import annotations

import time

import pytest

from meterflow.clients import kafka


def test_client_errors_are_log_lines_served_on_poll(
    free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka's connection errors reach meterflow's log (greppable), and only when the
    client is polled: an idle producer left after the broker stopped writes nothing."""
    producer = kafka.producer(f"127.0.0.1:{free_port}", **{"message.timeout.ms": 2000})
    producer.produce("nowhere", b"x")
    time.sleep(1.0)  # librdkafka tries to connect, fails, queues its log messages
    assert not [r for r in caplog.records if r.name == kafka.client_log.name]

    producer.poll(0.5)

    refused = [r for r in caplog.records if r.name == kafka.client_log.name]
    assert refused and str(free_port) in refused[0].getMessage()
