"""meterflow against a Kafka that requires SCRAM over TLS (and one that requires mTLS): the
simulator, the stream and the sink log in with the KAFKA_SECURITY_* / KAFKA_SASL_* /
KAFKA_SSL_* settings, every reading lands once; a wrong password or CA stops each command
within seconds with one line, and no password in it (tests/secure_broker_helpers.py says
why the broker is tansu behind a TLS and SCRAM front)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_exactly_once, meterflow, wait_for
from secure_broker_helpers import SecureKafka, make_tls_files, secure_kafka

from meterflow.clients import kafka, mongo
from meterflow.core.config import Settings
from meterflow.serving.sink import Sink


@pytest.fixture(scope="module")
def scram_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    with secure_kafka(tmp_path_factory.mktemp("scram-tls")) as broker:
        yield broker


def env_for(broker: SecureKafka, data: Path, **extra: str) -> dict[str, str]:
    """A test's variables: the broker's security, fresh topics, its own data directory."""
    suffix = uuid.uuid4().hex[:8]
    return broker.env(
        METERFLOW_DATA_DIR=str(data),
        METERFLOW_KAFKA_SOURCE="python",
        METERFLOW_KAFKA_PARTITIONS="2",
        METERFLOW_TRIGGER_SECONDS="1",
        METERFLOW_TOPIC_READINGS=f"meter-{suffix}",
        METERFLOW_TOPIC_ABNORMAL=f"abnormal-{suffix}",
        METERFLOW_TOPIC_DEADLETTER=f"deadletter-{suffix}",
        METERFLOW_TOPIC_STATUS=f"status-{suffix}",
        METERFLOW_TOPIC_DIGEST=f"digest-{suffix}",
        PYSPARK_PYTHON=sys.executable,
        **extra,
    )


def records(settings: Settings, topic: str) -> int:
    client = kafka.consumer(settings.kafka)
    try:
        ends = kafka.partition_ends(client, kafka.topic_partitions(client, [topic]))
    finally:
        client.close()
    return sum(ends.values())


def test_simulator_stream_and_sink_run_over_scram_and_tls(
    scram_tls: SecureKafka, tmp_path: Path, db: Any
) -> None:
    env = env_for(scram_tls, tmp_path / "data")
    settings = Settings.from_env(env)
    kafka.ensure_topics(settings.kafka, settings.topics, settings.partitions)

    simulated = meterflow(
        "simulate", "--mode", "backfill", "--days", "1", "--meters", "25", "--seed", "7", env=env
    )
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    produced = records(settings, settings.topic_readings)
    assert produced >= 25 * 96

    streamed = meterflow("stream", "--available-now", env=env, timeout=240)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert_exactly_once(settings, produced)  # the lake, and the ledger against the topic

    abnormal = kafka.read_to_end(settings.kafka, settings.topic_abnormal)
    assert abnormal, "the simulated faults published no abnormal event"
    stop = threading.Event()
    sink = Sink(settings, db)
    worker = threading.Thread(target=sink.run, args=(stop.is_set,), daemon=True)
    worker.start()
    try:
        wait_for(
            lambda: db[mongo.ABNORMAL_READINGS].count_documents({}) >= len(abnormal),
            60,
            "the sink to store every abnormal event",
        )
    finally:
        stop.set()
        worker.join(30)
    ids = {record.key() for record in abnormal}  # keyed by device: at least one per key
    stored = list(db[mongo.ABNORMAL_READINGS].find({}, {"device_id": 1}))
    assert len(stored) == len(abnormal) == sink.stats.events_written
    assert {doc["device_id"].encode() for doc in stored} == ids
    assert sink.stats.reconciled and sink.stats.dead_lettered == 0


@pytest.mark.parametrize(
    "command",
    [
        ("simulate", "--mode", "backfill", "--days", "1", "--meters", "5"),
        ("sink",),
        ("stream", "--available-now"),
    ],
)
def test_a_wrong_password_stops_each_command_at_once_with_one_line(
    scram_tls: SecureKafka, tmp_path: Path, command: tuple[str, ...]
) -> None:
    wrong = "not-the-password-" + uuid.uuid4().hex[:6]
    env = env_for(scram_tls, tmp_path / "data", KAFKA_SASL_PASSWORD=wrong)
    started = time.monotonic()
    result = meterflow(*command, env=env, timeout=60)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert seconds < 15, f"took {seconds:.1f} s"
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"meterflow {command[0]}: Kafka at {scram_tls.bootstrap} refused the credentials of "
        "KAFKA_SASL_USERNAME=meterflow (SCRAM-SHA-512) (Authentication failed during "
        "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512): check "
        "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE) and KAFKA_SASL_MECHANISM"
    ], result.stderr[-2000:]
    for secret in (wrong, scram_tls.password):
        assert secret not in result.stdout + result.stderr


def test_mtls_and_a_password_file_work_and_a_foreign_ca_is_one_line(tmp_path: Path) -> None:
    with secure_kafka(tmp_path / "mtls", require_client_cert=True) as broker:
        password_file = tmp_path / "kafka_password"
        password_file.write_text(broker.password + "\n")
        env = env_for(broker, tmp_path / "data", KAFKA_SASL_PASSWORD="")
        env["KAFKA_SASL_PASSWORD_FILE"] = str(password_file)
        settings = Settings.from_env(env)
        kafka.ensure_topics(settings.kafka, [settings.topic_readings], 2)
        sent = meterflow(
            "simulate", "--mode", "backfill", "--meters", "20", "--count", "500", env=env
        )
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert records(settings, settings.topic_readings) == 500

        foreign = make_tls_files(tmp_path / "other-ca")  # the same names, another CA
        refused = meterflow("topics", env={**env, "KAFKA_SSL_CA_LOCATION": str(foreign.ca)})
        assert refused.returncode == 2
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"meterflow topics: Kafka at {broker.bootstrap}: TLS failed (")
        assert "check KAFKA_SSL_CA_LOCATION" in line and broker.password not in line
