"""Kafka security settings (meterflow/core/kafka_security.py): parsed and checked once, one
line per mistake, redacted in reprs, and turned into librdkafka's and the JVM client's
options by one function each, which every client, the data sources and Airflow use."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from helpers import meterflow

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError
from meterflow.core.kafka_security import KafkaCluster, KafkaSecurity
from meterflow.local.airflow import kafka_connection
from meterflow.local.broker import kafka_for
from meterflow.spark.session import source_options

PASSWORD = 'pa$$ "w0rd\\'


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A file standing for a PEM (only its existence is checked at start)."""
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return path


def scram(pem: Path, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "scram-sha-256",
        "KAFKA_SASL_USERNAME": "alice",
        "KAFKA_SASL_PASSWORD": PASSWORD,
        "KAFKA_SSL_CA_LOCATION": str(pem),
        **extra,
    }


def test_scram_over_tls_is_parsed_and_mapped_for_librdkafka(pem: Path) -> None:
    settings = Settings.from_env(scram(pem))
    assert settings.kafka.client_config() == {
        "bootstrap.servers": "kafka-1:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(pem),
    }
    assert Settings.from_env({}).kafka.client_config() == {"bootstrap.servers": ""}


def test_the_jvm_source_gets_kafkas_java_client_options(pem: Path, tmp_path: Path) -> None:
    security = Settings.from_env(scram(pem)).kafka_security
    assert security.jvm_options() == {
        "kafka.security.protocol": "SASL_SSL",
        "kafka.sasl.mechanism": "SCRAM-SHA-256",
        "kafka.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            'username="alice" password="pa$$ \\"w0rd\\\\";'
        ),
        "kafka.ssl.truststore.type": "PEM",
        "kafka.ssl.truststore.location": str(pem),
    }
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    mtls = Settings.from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "ssl",
            "KAFKA_SSL_CA_LOCATION": str(pem),
            "KAFKA_SSL_CERTIFICATE_LOCATION": str(pem),
            "KAFKA_SSL_KEY_LOCATION": str(key),
        }
    ).kafka_security
    assert mtls.librdkafka() == {
        "security.protocol": "ssl",
        "ssl.ca.location": str(pem),
        "ssl.certificate.location": str(pem),
        "ssl.key.location": str(key),
    }
    options = mtls.jvm_options()
    assert options["kafka.security.protocol"] == "SSL"
    assert options["kafka.ssl.keystore.type"] == "PEM"
    assert options["kafka.ssl.keystore.certificate.chain"] == pem.read_text()
    assert options["kafka.ssl.keystore.key"] == key.read_text()
    assert "kafka.sasl.jaas.config" not in options
    plain = Settings.from_env(scram(pem, KAFKA_SASL_MECHANISM="PLAIN")).kafka_security
    assert plain.jvm_options()["kafka.sasl.jaas.config"].startswith(
        "org.apache.kafka.common.security.plain.PlainLoginModule required"
    )


def test_each_kafka_source_and_airflow_get_the_same_security(pem: Path) -> None:
    settings = Settings.from_env(scram(pem))
    python = source_options(settings.kafka, "meterflow_kafka")
    assert python == {
        "kafka.bootstrap.servers": "kafka-1:9093",
        **{f"kafka.{k}": v for k, v in settings.kafka_security.librdkafka().items()},
    }
    jvm = source_options(settings.kafka, "kafka")
    assert jvm["kafka.bootstrap.servers"] == "kafka-1:9093"
    assert jvm["kafka.sasl.jaas.config"].endswith('password="pa$$ \\"w0rd\\\\";')
    extra = kafka_connection(settings)["extra"]
    assert extra["sasl.password"] == PASSWORD and extra["security.protocol"] == "sasl_ssl"
    assert extra["bootstrap.servers"] == "kafka-1:9093" and extra["group.id"]
    assert source_options(Settings.from_env({}).kafka, "kafka") == {"kafka.bootstrap.servers": ""}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL"},
            "KAFKA_SECURITY_PROTOCOL='SASL' must be plaintext, ssl, sasl_plaintext or sasl_ssl",
        ),
        (
            {"KAFKA_SASL_MECHANISM": "GSSAPI"},
            "KAFKA_SASL_MECHANISM='GSSAPI' must be SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
        ),
        (
            {"KAFKA_SASL_USERNAME": ""},
            "KAFKA_SECURITY_PROTOCOL=sasl_ssl needs KAFKA_SASL_USERNAME: set it, or choose a "
            "protocol without SASL (ssl, plaintext)",
        ),
        (
            {"KAFKA_SASL_PASSWORD": " "},
            "KAFKA_SECURITY_PROTOCOL=sasl_ssl needs KAFKA_SASL_PASSWORD (or "
            "KAFKA_SASL_PASSWORD_FILE): set it",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "plaintext", "KAFKA_SSL_CA_LOCATION": ""},
            "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but "
            "KAFKA_SECURITY_PROTOCOL=plaintext does not log in: set "
            "KAFKA_SECURITY_PROTOCOL=sasl_ssl",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "sasl_plaintext"},
            "KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL=sasl_plaintext does not "
            "use TLS",
        ),
        (
            {"KAFKA_SSL_CA_LOCATION": "/nowhere/ca.pem"},
            "KAFKA_SSL_CA_LOCATION=/nowhere/ca.pem is not a file: point it at the PEM file",
        ),
        (
            {"KAFKA_SSL_CERTIFICATE_LOCATION": "{pem}"},
            "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together (mTLS): "
            "set both, or neither",
        ),
        (
            {"KAFKA_SASL_PASSWORD": "CHANGE-ME-kafka"},
            "KAFKA_SASL_PASSWORD still holds a CHANGE-ME placeholder",
        ),
    ],
)
def test_a_bad_security_setting_is_one_line_naming_the_variable(
    pem: Path, env: dict[str, str], message: str
) -> None:
    values = scram(pem, **{k: v.format(pem=pem) for k, v in env.items()})
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(values)
    line = str(raised.value)
    assert line.startswith(message), line
    assert "\n" not in line and PASSWORD not in line


def test_the_password_may_come_from_a_file_and_is_never_shown(pem: Path, tmp_path: Path) -> None:
    secret = tmp_path / "kafka_password"
    secret.write_text(PASSWORD + "\n")
    env = scram(pem, KAFKA_SASL_PASSWORD="", KAFKA_SASL_PASSWORD_FILE=str(secret))
    settings = Settings.from_env(env)
    assert settings.kafka_security.sasl_password == PASSWORD
    for shown in (repr(settings), repr(settings.kafka), str(settings)):
        assert PASSWORD not in shown and "sasl_password=***" in shown
    listed = meterflow("config", env={**env, "KAFKA_SASL_PASSWORD": PASSWORD})
    assert listed.returncode == 2  # both the variable and its file: refused, not shown
    assert PASSWORD not in listed.stdout + listed.stderr
    listed = meterflow("config", env=env)
    assert listed.returncode == 0, listed.stderr
    assert PASSWORD not in listed.stdout + listed.stderr
    assert "KAFKA_SASL_PASSWORD_FILE" in listed.stdout


def test_a_refusal_is_one_line_without_the_password(pem: Path) -> None:
    cluster = Settings.from_env(scram(pem)).kafka
    error = KafkaError(
        KafkaError._AUTHENTICATION,
        "sasl_ssl://kafka-1:9093/bootstrap: SASL authentication error: Authentication failed "
        f"during authentication due to invalid credentials {PASSWORD} (after 21ms in state "
        "AUTH_REQ)",
    )
    refused = kafka.refusal(error, cluster)
    assert refused is not None and refused.exit_code == 2
    assert str(refused) == (
        "Kafka at kafka-1:9093 refused the credentials of KAFKA_SASL_USERNAME=alice "
        "(SCRAM-SHA-256) (Authentication failed during authentication due to invalid "
        "credentials ***): check KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE) and "
        "KAFKA_SASL_MECHANISM"
    )
    tls = KafkaError(
        KafkaError._SSL,
        "ssl://kafka-1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
        "certificate verify failed (after 5ms in state SSL_HANDSHAKE)",
    )
    assert "check KAFKA_SSL_CA_LOCATION" in str(kafka.refusal(tls, cluster))
    for transient in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
        assert kafka.refusal(KafkaError(transient, "down"), cluster) is None
    assert isinstance(kafka.cluster_of("h:1"), KafkaCluster)


def test_a_secured_protocol_needs_a_cluster_not_the_local_broker(pem: Path) -> None:
    settings = Settings.from_env({**scram(pem), "KAFKA_BOOTSTRAP_SERVERS": ""})
    with (
        pytest.raises(ConfigError, match="the local broker \\(tansu\\) speaks plaintext only"),
        kafka_for(settings),
    ):
        pass


def test_security_defaults_to_plaintext_without_login() -> None:
    assert KafkaSecurity().librdkafka() == {} and KafkaSecurity().jvm_options() == {}
    assert KafkaSecurity().who() == "no login"
