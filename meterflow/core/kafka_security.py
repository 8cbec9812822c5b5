"""How meterflow logs in to Kafka: the security settings, and the client options they become.

:class:`KafkaSecurity` holds the ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*`` and
``KAFKA_SSL_*`` variables, checked together at start (one :class:`ConfigError` line naming
the variable and the remedy). It is the one home of their translation: :meth:`librdkafka`
for every confluent-kafka client (producers, consumers, admin clients, the Python data
source's consumers on the executors, the Airflow Kafka provider's connection) and
:meth:`jvm_options` for Spark's JVM Kafka source. :class:`KafkaCluster` is what clients are
given: the bootstrap servers and the security, small and picklable, so it travels to Spark
tasks. Neither shows the password in its ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meterflow.core import variables
from meterflow.core.errors import ConfigError
from meterflow.core.variables import variable

SecurityProtocol = Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _mechanism(raw: str) -> str:
    value = raw.upper()
    if value not in MECHANISMS:
        raise ValueError(f"must be {', '.join(MECHANISMS[:-1])} or {MECHANISMS[-1]}")
    return value


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL of every Kafka client meterflow makes (docs/operations.md, "A secured
    Kafka"); all empty: plaintext, no login, as a local broker needs."""

    protocol: SecurityProtocol = variable(
        "KAFKA_SECURITY_PROTOCOL",
        "How clients talk to Kafka: sasl_ssl (SASL login over TLS), ssl (TLS; with a "
        "client certificate: mTLS), sasl_plaintext, or plaintext",
        "plaintext",
    )
    sasl_mechanism: str = variable(
        "KAFKA_SASL_MECHANISM",
        "SASL mechanism of the sasl_* protocols: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
        "SCRAM-SHA-512",
        parse=_mechanism,
    )
    sasl_username: str = variable(
        "KAFKA_SASL_USERNAME", "User meterflow logs in to Kafka as (sasl_* protocols)", ""
    )
    sasl_password: str = variable(
        "KAFKA_SASL_PASSWORD", "Password of that user (sasl_* protocols)", "", secret=True
    )
    ssl_ca_location: str = variable(
        "KAFKA_SSL_CA_LOCATION",
        "PEM file of the CA(s) that signed the brokers' certificates (ssl, sasl_ssl); empty: "
        "the system's CAs",
        "",
    )
    ssl_certificate_location: str = variable(
        "KAFKA_SSL_CERTIFICATE_LOCATION",
        "PEM file of the client certificate, for mTLS (with KAFKA_SSL_KEY_LOCATION)",
        "",
    )
    ssl_key_location: str = variable(
        "KAFKA_SSL_KEY_LOCATION",
        "PEM file of the client certificate's private key (unencrypted), for mTLS",
        "",
    )

    __repr__ = variables.redacted_repr

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("sasl_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("ssl")

    def __post_init__(self) -> None:
        protocol = f"KAFKA_SECURITY_PROTOCOL={self.protocol}"
        if self.sasl:
            for name, value in (
                ("KAFKA_SASL_USERNAME", self.sasl_username),
                ("KAFKA_SASL_PASSWORD", self.sasl_password),
            ):
                if not value:
                    also = " (or KAFKA_SASL_PASSWORD_FILE)" if "PASSWORD" in name else ""
                    raise ConfigError(
                        f"{protocol} needs {name}{also}: set it, or choose a protocol "
                        "without SASL (ssl, plaintext)"
                    )
        elif self.sasl_username or self.sasl_password:
            raise ConfigError(
                f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but {protocol} does not log "
                "in: set KAFKA_SECURITY_PROTOCOL=sasl_ssl (or sasl_plaintext)"
            )
        files = (
            ("KAFKA_SSL_CA_LOCATION", self.ssl_ca_location),
            ("KAFKA_SSL_CERTIFICATE_LOCATION", self.ssl_certificate_location),
            ("KAFKA_SSL_KEY_LOCATION", self.ssl_key_location),
        )
        for name, value in files:
            if value and not self.tls:
                raise ConfigError(
                    f"{name} is set but {protocol} does not use TLS: set "
                    "KAFKA_SECURITY_PROTOCOL=sasl_ssl (or ssl), or unset it"
                )
            if value and not Path(value).is_file():
                raise ConfigError(
                    f"{name}={value} is not a file: point it at the PEM file, or unset it"
                )
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ConfigError(
                "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together (mTLS): "
                "set both, or neither"
            )

    def librdkafka(self) -> dict[str, str]:
        """The options of a confluent-kafka (librdkafka) client; none when plaintext."""
        if self.protocol == "plaintext":
            return {}
        config: dict[str, str] = {"security.protocol": self.protocol}
        if self.sasl:
            config.update(
                {
                    "sasl.mechanism": self.sasl_mechanism,
                    "sasl.username": self.sasl_username,
                    "sasl.password": self.sasl_password,
                }
            )
        for key, value in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if value:
                config[key] = value
        return config

    def jvm_options(self) -> dict[str, str]:
        """The ``kafka.*`` options of Spark's JVM Kafka source (Kafka's Java client names).

        The CA goes in as a PEM truststore file; a client certificate and key as PEM text
        (``ssl.keystore.certificate.chain``, ``ssl.keystore.key``), since the Java client
        takes a PEM keystore as one file holding both.
        """
        if self.protocol == "plaintext":
            return {}
        options = {"kafka.security.protocol": self.protocol.upper()}
        if self.sasl:
            module = _LOGIN_MODULES[self.sasl_mechanism]
            options.update(
                {
                    "kafka.sasl.mechanism": self.sasl_mechanism,
                    "kafka.sasl.jaas.config": (
                        f'{module} required username="{_jaas(self.sasl_username)}" '
                        f'password="{_jaas(self.sasl_password)}";'
                    ),
                }
            )
        if self.ssl_ca_location:
            options.update(
                {
                    "kafka.ssl.truststore.type": "PEM",
                    "kafka.ssl.truststore.location": self.ssl_ca_location,
                }
            )
        if self.ssl_certificate_location:
            options.update(
                {
                    "kafka.ssl.keystore.type": "PEM",
                    "kafka.ssl.keystore.certificate.chain": Path(
                        self.ssl_certificate_location
                    ).read_text(),
                    "kafka.ssl.keystore.key": Path(self.ssl_key_location).read_text(),
                }
            )
        return options

    def who(self) -> str:
        """Who meterflow logs in as, for messages: never the password."""
        if self.sasl:
            return f"KAFKA_SASL_USERNAME={self.sasl_username} ({self.sasl_mechanism})"
        if self.ssl_certificate_location:
            return f"KAFKA_SSL_CERTIFICATE_LOCATION={self.ssl_certificate_location}"
        return "no login"


def _jaas(value: str) -> str:
    """A value inside a JAAS quoted string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True)
class KafkaCluster:
    """A Kafka cluster as clients reach it: bootstrap servers and security (picklable)."""

    bootstrap: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def client_config(self) -> dict[str, Any]:
        """``bootstrap.servers`` and the security options of a confluent-kafka client."""
        return {"bootstrap.servers": self.bootstrap, **self.security.librdkafka()}
