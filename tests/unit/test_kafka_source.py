"""The Kafka clients the Python Kafka data source reads with, without a broker: their
connection errors are meterflow log lines. The source itself, on Spark against a real
broker, is tested in tests/integration/test_kafka_source_broker.py.
"""

from __future__ import annotations

import pytest
from helpers import FailingBroker, wait_for

from meterflow.clients import kafka


def test_client_errors_are_log_lines_served_on_poll(caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka's connection errors reach meterflow's log (greppable), and only when the
    client is polled: an idle producer left with a failing broker writes nothing."""
    with FailingBroker() as broker:
        producer = kafka.producer(broker.bootstrap, **{"message.timeout.ms": 2000})
        producer.produce("nowhere", b"x")
        # librdkafka failed, queued its line, and is trying again: the line waits unserved.
        wait_for(lambda: broker.connections >= 2, 10, "librdkafka to fail and connect again")
    assert not [r for r in caplog.records if r.name == kafka.client_log.name]

    producer.poll(0.5)

    failed = [r for r in caplog.records if r.name == kafka.client_log.name]
    assert failed and str(broker.port) in failed[0].getMessage()
