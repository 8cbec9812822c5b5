"""Configuration from environment variables, each declared once on the field it fills.

:class:`Settings` is the platform's configuration; each field's declaration
(:func:`meterflow.core.variables.variable`) holds the variable's name, type, default, bounds
and meaning. ``meterflow config`` and docs/configuration.md list them from the same
declarations. A bad value raises :class:`~meterflow.core.errors.ConfigError` with the
variable's name, never a stack trace from deep inside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Literal

from meterflow.core import lake, timestamps, variables
from meterflow.core.contract import (
    TOPIC_ABNORMAL,
    TOPIC_DEADLETTER,
    TOPIC_DIGEST,
    TOPIC_READINGS,
    TOPIC_STATUS,
)
from meterflow.core.kafka_security import KafkaCluster, KafkaSecurity
from meterflow.core.thresholds import DetectionRules, Rules
from meterflow.core.variables import variable

KafkaSource = Literal["auto", "python", "jvm"]
StartingOffsets = Literal["earliest", "latest"]
OnDataLoss = Literal["exit", "wait"]
DetectionTime = Literal["processing", "event"]


def _time_zone(name: str) -> str:
    """An IANA zone name, checked now: a typo would otherwise cut every day wrong."""
    timestamps.zone(name)
    return name


@dataclass(frozen=True)
class Settings:
    """Where meterflow's services are and how they behave (see docs/configuration.md)."""

    bootstrap_servers: str = variable(
        "KAFKA_BOOTSTRAP_SERVERS",
        "Kafka cluster to use; empty starts a local Kafka-protocol broker (tansu) on demand",
        "",
    )
    #: How clients log in to that cluster: TLS, SASL (docs/operations.md, "A secured Kafka").
    kafka_security: KafkaSecurity = field(
        default_factory=KafkaSecurity, metadata={"label": "Kafka security"}
    )
    local_broker_port: int = variable(
        "METERFLOW_LOCAL_BROKER_PORT",
        "Port of the local broker started on demand",
        19092,
        minimum=1,
    )
    partitions: int = variable(
        "METERFLOW_KAFKA_PARTITIONS", "Partitions of the topics meterflow creates", 4, minimum=1
    )
    topic_readings: str = variable(
        "METERFLOW_TOPIC_READINGS", "Topic the meters write to", TOPIC_READINGS
    )
    topic_abnormal: str = variable(
        "METERFLOW_TOPIC_ABNORMAL", "Topic of abnormal-reading events", TOPIC_ABNORMAL
    )
    topic_deadletter: str = variable(
        "METERFLOW_TOPIC_DEADLETTER", "Topic of undecodable input", TOPIC_DEADLETTER
    )
    topic_status: str = variable(
        "METERFLOW_TOPIC_STATUS", "Topic of per-meter status updates", TOPIC_STATUS
    )
    topic_digest: str = variable(
        "METERFLOW_TOPIC_DIGEST",
        "Topic of per-meter reading digests, read by the stateful stage",
        TOPIC_DIGEST,
    )
    data_dir: Path = variable(
        "METERFLOW_DATA_DIR",
        "Root of local state (lake, checkpoints, logs)",
        Path("data"),
        shown="./data",
    )
    #: Empty until resolved: ``DATA_DIR/lake`` (see ``__post_init__``).
    lake_path: str = variable(
        "LAKE_PATH", "Lake root, local path or Hadoop URI; default DATA_DIR/lake", ""
    )
    checkpoint_path: str = variable(
        "CHECKPOINT_PATH", "Streaming checkpoints; default DATA_DIR/checkpoints", ""
    )
    spark_master: str = variable("SPARK_MASTER", "Spark master URL for the jobs", "local[*]")
    spark_log_level: str = variable("SPARK_LOG_LEVEL", "Log level of Spark's JVM logs", "WARN")
    kafka_source: KafkaSource = variable(
        "METERFLOW_KAFKA_SOURCE",
        "python (PySpark data source), jvm (spark-sql-kafka jar) or auto (jvm if its jar loads)",
        "auto",
    )
    trigger_seconds: float = variable(
        "METERFLOW_TRIGGER_SECONDS", "Micro-batch interval of the streaming job", 5.0, minimum=0
    )
    max_offsets_per_trigger: int = variable(
        "METERFLOW_MAX_OFFSETS_PER_TRIGGER",
        "Cap on readings per micro-batch; 0 = no cap",
        0,
        minimum=0,
    )
    starting_offsets: StartingOffsets = variable(
        "METERFLOW_STARTING_OFFSETS",
        "Where the stream starts on a topic the lake has never read",
        "earliest",
    )
    stream_retries: int = variable(
        "METERFLOW_STREAM_RETRIES",
        "Times the stream restarts (with backoff, up to 30 s apart) while Kafka is "
        "unavailable before it exits",
        10,
        minimum=0,
    )
    on_data_loss: OnDataLoss = variable(
        "METERFLOW_ON_DATA_LOSS",
        "What the spark-submit job does after a data-loss stop: exit (code 3), or wait "
        "without exiting (containers that restart on exit)",
        "exit",
    )
    idle_partition_seconds: float = variable(
        "METERFLOW_IDLE_PARTITION_SECONDS",
        "A Kafka partition that brought nothing for this long is caught up and no longer "
        "holds back the low watermark",
        60.0,
        minimum=0,
    )
    #: The stateless rules' limits, each from its own variable.
    rules: Rules = field(default_factory=Rules, metadata={"label": "stateless rules"})
    mongo_uri: str = variable(
        "MONGO_URI",
        "MongoDB to use (may carry credentials); empty starts a local MongoDB-protocol "
        "stand-in for native demos",
        "",
        secret=True,
    )
    local_mongo_port: int = variable(
        "METERFLOW_LOCAL_MONGO_PORT", "Port of the local MongoDB stand-in", 27018, minimum=1
    )
    mongo_db: str = variable("MONGO_DB", "MongoDB database of the serving layer", "iot")
    sink_group: str = variable(
        "METERFLOW_SINK_GROUP", "Consumer group of meterflow sink", "meterflow-sink"
    )
    sink_batch_size: int = variable(
        "METERFLOW_SINK_BATCH_SIZE", "Most events per MongoDB bulk write", 1000, minimum=1
    )
    sink_flush_seconds: float = variable(
        "METERFLOW_SINK_FLUSH_SECONDS",
        "Longest wait before a partial batch is written",
        1.0,
        minimum=0,
    )
    abnormal_ttl_days: int = variable(
        "METERFLOW_ABNORMAL_TTL_DAYS",
        "Days abnormal readings and closed incidents stay in MongoDB; 0 = forever",
        90,
        minimum=0,
    )
    lake_retention_days: int = variable(
        "METERFLOW_LAKE_RETENTION_DAYS", "Days of lake partitions kept; 0 = forever", 365, minimum=0
    )
    reading_interval_seconds: int = variable(
        "METERFLOW_READING_INTERVAL_SECONDS",
        "Expected interval between a meter's readings (completeness), unless the registry "
        "gives one",
        900,
        minimum=1,
    )
    day_grace_seconds: int = variable(
        "METERFLOW_DAY_GRACE_SECONDS",
        "How long after a day's end its lake partition counts as complete without the "
        "stream's watermark",
        7200,
        minimum=0,
    )
    timezone: str = variable(
        "METERFLOW_TIMEZONE",
        "IANA time zone whose midnights cut the days: lake partitions, daily views, the "
        "daily DAG's schedule, the LEAK rule's night window",
        timestamps.UTC_NAME,
        parse=_time_zone,
    )
    linear_gap_intervals: int = variable(
        "METERFLOW_LINEAR_GAP_INTERVALS",
        "Validation: a gap of at most this many intervals is estimated by linear "
        "interpolation; a longer one from the meter's profile",
        4,
        minimum=0,
    )
    dag_start_date: date = variable(
        "METERFLOW_DAG_START_DATE",
        "First day meter_daily_averages processes (catch-up runs every day since)",
        date(2026, 11, 1),
    )
    incident_threshold: int = variable(
        "METERFLOW_INCIDENT_THRESHOLD",
        "Faulty readings in a row that open an incident for a meter",
        3,
        minimum=1,
    )
    incident_autoclose_hours: float = variable(
        "METERFLOW_INCIDENT_AUTOCLOSE_HOURS",
        "Hours after which an incident still open is closed (and the close logged); 0 = never",
        168.0,
        minimum=0,
    )
    log_level: str = variable(
        "METERFLOW_LOG_LEVEL", "Log level of meterflow's own key=value logs", "INFO"
    )
    detection_on: bool = variable(
        "METERFLOW_DETECTION",
        "on: the stream publishes per-meter reading digests and runs the stateful stage "
        "(compose's .env.example and `meterflow run` turn it on)",
        False,
    )
    detection_time: DetectionTime = variable(
        "METERFLOW_DETECTION_TIME",
        "NO_DATA's clock: processing (live) or event (replays and backfills, against the "
        "watermark)",
        "processing",
    )
    #: The stateful rules' thresholds (docs/architecture.md, "Stateful detection").
    detection: DetectionRules = field(
        default_factory=DetectionRules, metadata={"label": "stateful rules"}
    )

    __repr__ = variables.redacted_repr  # no password in a log or a traceback

    def __post_init__(self) -> None:
        # The data directory is absolute, and the paths that default to inside it follow it
        # (frozen: set once, here).
        object.__setattr__(self, "data_dir", self.data_dir.expanduser().absolute())
        if not self.lake_path:
            object.__setattr__(self, "lake_path", str(self.data_dir / "lake"))
        if not self.checkpoint_path:
            object.__setattr__(self, "checkpoint_path", str(self.data_dir / "checkpoints"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings ``env`` (default: the process environment) gives; a ConfigError
        naming the first variable that is malformed or still a placeholder."""
        return variables.parse(cls, os.environ if env is None else env)

    @property
    def kafka(self) -> KafkaCluster:
        """The Kafka cluster as every client reaches it: servers and security."""
        return KafkaCluster(self.bootstrap_servers, self.kafka_security)

    @property
    def registry_path(self) -> str:
        return lake.registry_path(self.lake_path)

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic meterflow creates: readings, abnormal, dead letters, status, and the
        digests when detection is on."""
        topics = (
            self.topic_readings,
            self.topic_abnormal,
            self.topic_deadletter,
            self.topic_status,
        )
        return (*topics, self.topic_digest) if self.detection_on else topics

    @property
    def views_path(self) -> str:
        return lake.views_path(self.lake_path)

    def with_bootstrap(self, servers: str) -> Settings:
        """A copy pointing at ``servers`` (used once a local broker is up)."""
        return replace(self, bootstrap_servers=servers)

    def with_mongo(self, uri: str) -> Settings:
        """A copy pointing at MongoDB ``uri`` (used once a local stand-in is up)."""
        return replace(self, mongo_uri=uri)


def env_value(name: str, env: Mapping[str, str] | None = None) -> str:
    """One variable of :class:`Settings` as text, or its default: for DAG files, which must
    parse even when other variables are malformed."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    return raw or variables.default_text(Settings, name)
