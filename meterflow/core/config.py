"""Configuration from environment variables, each with a documented default.

:data:`VARIABLES` is the single table of every variable; the README's configuration
section is generated from the same entries (``meterflow config``). A bad value raises
:class:`ConfigError` with the variable's name, never a stack trace from deep inside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from meterflow.core import lake
from meterflow.core.contract import (
    METER_SPECS,
    TOPIC_ABNORMAL,
    TOPIC_DEADLETTER,
    TOPIC_DIGEST,
    TOPIC_READINGS,
    TOPIC_STATUS,
    MeterType,
)
from meterflow.core.errors import MeterflowError
from meterflow.core.thresholds import DetectionRules, Rules


class ConfigError(MeterflowError, ValueError):
    """A configuration value is missing or malformed (exit code 2)."""


#: What .env.example puts where a secret must go; refused wherever it is read.
PLACEHOLDER = "CHANGE-ME"


def refuse_placeholders(env: Mapping[str, str], names: tuple[str, ...]) -> None:
    """One line naming the first variable that still holds the placeholder."""
    for name in names:
        if PLACEHOLDER in (env.get(name) or ""):
            raise ConfigError(
                f"{name} still holds a {PLACEHOLDER} placeholder: set it (see .env.example; "
                "meterflow doctor checks them all)"
            )


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str


_DETECTION = DetectionRules()

VARIABLES: tuple[Variable, ...] = (
    Variable(
        "KAFKA_BOOTSTRAP_SERVERS",
        "",
        "Kafka cluster to use; empty starts a local Kafka-protocol broker (tansu) on demand",
    ),
    Variable("METERFLOW_LOCAL_BROKER_PORT", "19092", "Port of the local broker started on demand"),
    Variable("METERFLOW_KAFKA_PARTITIONS", "4", "Partitions of the topics meterflow creates"),
    Variable("METERFLOW_TOPIC_READINGS", TOPIC_READINGS, "Topic the meters write to"),
    Variable("METERFLOW_TOPIC_ABNORMAL", TOPIC_ABNORMAL, "Topic of abnormal-reading events"),
    Variable("METERFLOW_TOPIC_DEADLETTER", TOPIC_DEADLETTER, "Topic of undecodable input"),
    Variable("METERFLOW_TOPIC_STATUS", TOPIC_STATUS, "Topic of per-meter status updates"),
    Variable(
        "METERFLOW_TOPIC_DIGEST",
        TOPIC_DIGEST,
        "Topic of per-meter reading digests, read by the stateful stage",
    ),
    Variable("METERFLOW_DATA_DIR", "./data", "Root of local state (lake, checkpoints, logs)"),
    Variable("LAKE_PATH", "", "Lake root, local path or Hadoop URI; default DATA_DIR/lake"),
    Variable("CHECKPOINT_PATH", "", "Streaming checkpoints; default DATA_DIR/checkpoints"),
    Variable("SPARK_MASTER", "local[*]", "Spark master URL for the jobs"),
    Variable(
        "METERFLOW_KAFKA_SOURCE",
        "auto",
        "python (PySpark data source), jvm (spark-sql-kafka jar) or auto (jvm if its jar loads)",
    ),
    Variable("METERFLOW_TRIGGER_SECONDS", "5", "Micro-batch interval of the streaming job"),
    Variable(
        "METERFLOW_MAX_OFFSETS_PER_TRIGGER", "0", "Cap on readings per micro-batch; 0 = no cap"
    ),
    Variable(
        "METERFLOW_STARTING_OFFSETS",
        "earliest",
        "earliest or latest: where the stream starts on a topic the lake has never read",
    ),
    Variable(
        "METERFLOW_STREAM_RETRIES",
        "10",
        "Times the stream restarts (with backoff, up to 30 s apart) while Kafka is "
        "unavailable before it exits",
    ),
    Variable(
        "METERFLOW_ON_DATA_LOSS",
        "exit",
        "What the spark-submit job does after a data-loss stop: exit (code 3), or wait "
        "without exiting (containers that restart on exit)",
    ),
    Variable(
        "METERFLOW_IDLE_PARTITION_SECONDS",
        "60",
        "A Kafka partition that brought nothing for this long is caught up and no longer "
        "holds back the low watermark",
    ),
    Variable("METERFLOW_MAX_MESSAGE_BYTES", "16384", "Larger messages are dead-lettered"),
    Variable(
        "METERFLOW_FUTURE_TOLERANCE_SECONDS",
        "300",
        "How far past ingestion time a timestamp may be before FUTURE_TIMESTAMP",
    ),
    Variable(
        "MONGO_URI",
        "",
        "MongoDB to use (may carry credentials); empty starts a local MongoDB-protocol "
        "stand-in for native demos",
    ),
    Variable("METERFLOW_LOCAL_MONGO_PORT", "27018", "Port of the local MongoDB stand-in"),
    Variable("MONGO_DB", "iot", "MongoDB database of the serving layer"),
    Variable("METERFLOW_SINK_GROUP", "meterflow-sink", "Consumer group of meterflow sink"),
    Variable("METERFLOW_SINK_BATCH_SIZE", "1000", "Most events per MongoDB bulk write"),
    Variable("METERFLOW_SINK_FLUSH_SECONDS", "1", "Longest wait before a partial batch is written"),
    Variable(
        "METERFLOW_ABNORMAL_TTL_DAYS",
        "90",
        "Days abnormal readings and closed incidents stay in MongoDB; 0 = forever",
    ),
    Variable("METERFLOW_LAKE_RETENTION_DAYS", "365", "Days of lake partitions kept; 0 = forever"),
    Variable(
        "METERFLOW_READING_INTERVAL_SECONDS",
        "900",
        "Expected interval between a meter's readings (completeness), unless the registry "
        "gives one",
    ),
    Variable(
        "METERFLOW_DAY_GRACE_SECONDS",
        "7200",
        "How long after a day's end its lake partition counts as complete without the "
        "stream's watermark",
    ),
    Variable(
        "METERFLOW_DAG_START_DATE",
        "2026-11-01",
        "First day meter_daily_averages processes (catch-up runs every day since)",
    ),
    Variable(
        "METERFLOW_INCIDENT_THRESHOLD",
        "3",
        "Faulty readings in a row that open an incident for a meter",
    ),
    Variable(
        "METERFLOW_INCIDENT_AUTOCLOSE_HOURS",
        "168",
        "Hours after which an incident still open is closed (and the close logged); 0 = never",
    ),
    Variable("METABASE_URL", "http://localhost:3000", "Metabase that provision-metabase sets up"),
    Variable("METABASE_ADMIN_EMAIL", "", "Metabase admin created on first start (required)"),
    Variable("METABASE_ADMIN_PASSWORD", "", "Password of that admin (required, no default)"),
    Variable("METABASE_ADMIN_FIRST_NAME", "Meterflow", "First name of that admin"),
    Variable("METABASE_ADMIN_LAST_NAME", "Admin", "Last name of that admin"),
    Variable("METABASE_SITE_NAME", "meterflow", "Site name shown by Metabase"),
    Variable("METABASE_DATABASE_NAME", "meterflow MongoDB", "Name of the database in Metabase"),
    Variable(
        "METABASE_MONGO_URI",
        "",
        "MongoDB as Metabase reaches it (may carry credentials); empty = MONGO_URI",
    ),
    Variable("METABASE_WAIT_SECONDS", "600", "How long provision-metabase waits for Metabase"),
    Variable("METERFLOW_LOG_LEVEL", "INFO", "Log level of meterflow's own key=value logs"),
    Variable("SPARK_LOG_LEVEL", "WARN", "Log level of Spark's JVM logs"),
    *(
        Variable(
            f"METERFLOW_MAX_{name.upper()}",
            f"{bound:g}",
            f"Upper physical bound of {name} per reading ({spec.meter_type})",
        )
        for spec in METER_SPECS.values()
        for name, bound in spec.default_bounds.items()
    ),
    # The stateful rules (thresholds.DetectionRules; docs/architecture.md, "Stateful detection").
    Variable(
        "METERFLOW_DETECTION",
        "off",
        "on: the stream publishes per-meter reading digests and runs the stateful stage "
        "(compose's .env.example and `meterflow run` turn it on)",
    ),
    Variable(
        "METERFLOW_DETECTION_TIME",
        "processing",
        "NO_DATA's clock: processing (live) or event (replays and backfills, against the "
        "watermark)",
    ),
    Variable(
        "METERFLOW_STUCK_READINGS",
        str(_DETECTION.stuck_readings),
        "STUCK: readings in a row (and intervals of time) with the same value",
    ),
    *(
        Variable(
            f"METERFLOW_STUCK_MIN_{kind.name}",
            f"{_DETECTION.stuck_min[kind]:g}",
            f"STUCK: only a value above this counts ({kind}, per reading)",
        )
        for kind in MeterType
    ),
    Variable(
        "METERFLOW_SPIKE_FACTOR",
        f"{_DETECTION.spike_factor:g}",
        "SPIKE: a reading above this many times the meter's baseline (median of its recent "
        "good readings, per hour of day)",
    ),
    *(
        Variable(
            f"METERFLOW_SPIKE_MIN_{kind.name}",
            f"{_DETECTION.spike_min[kind]:g}",
            f"SPIKE: and above this level ({kind}, per reading)",
        )
        for kind in MeterType
    ),
    Variable(
        "METERFLOW_BASELINE_HISTORY_SECONDS",
        f"{_DETECTION.baseline_history_s:g}",
        "SPIKE: history a meter needs before it has a baseline",
    ),
    Variable(
        "METERFLOW_LEAK_NIGHT_HOURS",
        f"{_DETECTION.leak_night_start_hour}-{_DETECTION.leak_night_end_hour}",
        "LEAK: the night window, hours of the day (UTC), start-end",
    ),
    Variable(
        "METERFLOW_LEAK_MIN_NIGHT_FLOW",
        f"{_DETECTION.leak_min_night_flow:g}",
        "LEAK: a night's minimum flow above this (L/h) is a leak",
    ),
    Variable(
        "METERFLOW_LEAK_DRY_SECONDS",
        f"{_DETECTION.leak_dry_window_s:g}",
        "LEAK: no zero-usage interval for this long is continuous flow",
    ),
    Variable(
        "METERFLOW_NODATA_INTERVALS",
        str(_DETECTION.nodata_intervals),
        "NO_DATA: no reading for this many of the meter's intervals",
    ),
)
_DEFAULTS = {v.name: v.default for v in VARIABLES}


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    return _DEFAULTS[name] if value is None or value.strip() == "" else value.strip()


def env_value(name: str, env: Mapping[str, str] | None = None) -> str:
    """One variable of :data:`VARIABLES`, or its default (for DAG files, which must parse
    even when other variables are malformed)."""
    return _get(os.environ if env is None else env, name)


def _number(
    env: Mapping[str, str], name: str, kind: type[float] | type[int], minimum: float
) -> float | int:
    raw = _get(env, name)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = _get(env, name).lower()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} must be {' or '.join(allowed)}")
    return value


def _detection_rules(env: Mapping[str, str]) -> DetectionRules:
    """:class:`DetectionRules` from the environment; an inconsistent set is a ConfigError."""
    night = _get(env, "METERFLOW_LEAK_NIGHT_HOURS")
    start, _, end = night.partition("-")
    try:
        night_hours = (int(start), int(end))
    except ValueError:
        raise ConfigError(
            f"METERFLOW_LEAK_NIGHT_HOURS={night!r} must be two hours, start-end (e.g. 2-4)"
        ) from None
    try:
        return DetectionRules(
            stuck_readings=int(_number(env, "METERFLOW_STUCK_READINGS", int, 2)),
            stuck_min={
                kind: float(_number(env, f"METERFLOW_STUCK_MIN_{kind.name}", float, 0))
                for kind in MeterType
            },
            spike_factor=float(_number(env, "METERFLOW_SPIKE_FACTOR", float, 1)),
            spike_min={
                kind: float(_number(env, f"METERFLOW_SPIKE_MIN_{kind.name}", float, 0))
                for kind in MeterType
            },
            baseline_history_s=float(_number(env, "METERFLOW_BASELINE_HISTORY_SECONDS", float, 0)),
            leak_night_start_hour=night_hours[0],
            leak_night_end_hour=night_hours[1],
            leak_min_night_flow=float(_number(env, "METERFLOW_LEAK_MIN_NIGHT_FLOW", float, 0)),
            leak_dry_window_s=float(_number(env, "METERFLOW_LEAK_DRY_SECONDS", float, 1)),
            nodata_intervals=int(_number(env, "METERFLOW_NODATA_INTERVALS", int, 1)),
        )
    except ValueError as exc:  # DetectionRules refuses what no rule could work with
        raise ConfigError(f"stateful rules: {exc}") from None


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str
    local_broker_port: int
    partitions: int
    topic_readings: str
    topic_abnormal: str
    topic_deadletter: str
    topic_status: str
    topic_digest: str
    data_dir: Path
    lake_path: str
    checkpoint_path: str
    spark_master: str
    kafka_source: str
    trigger_seconds: float
    max_offsets_per_trigger: int
    starting_offsets: str
    stream_retries: int
    on_data_loss: str
    idle_partition_seconds: float
    rules: Rules
    mongo_uri: str
    local_mongo_port: int
    mongo_db: str
    sink_group: str
    sink_batch_size: int
    sink_flush_seconds: float
    abnormal_ttl_days: int
    lake_retention_days: int
    reading_interval_seconds: int
    day_grace_seconds: int
    incident_threshold: int
    incident_autoclose_hours: float
    detection: DetectionRules
    detection_on: bool
    detection_time: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        refuse_placeholders(env, ("MONGO_URI",))
        data_dir = Path(_get(env, "METERFLOW_DATA_DIR")).expanduser().absolute()
        source = _get(env, "METERFLOW_KAFKA_SOURCE").lower()
        if source not in ("auto", "python", "jvm"):
            raise ConfigError(f"METERFLOW_KAFKA_SOURCE={source!r} must be auto, python or jvm")
        starting = _get(env, "METERFLOW_STARTING_OFFSETS").lower()
        if starting not in ("earliest", "latest"):
            raise ConfigError(f"METERFLOW_STARTING_OFFSETS={starting!r} must be earliest or latest")
        bounds = {
            name: float(_number(env, f"METERFLOW_MAX_{name.upper()}", float, 0))
            for spec in METER_SPECS.values()
            for name in spec.default_bounds
        }
        rules = Rules(
            max_message_bytes=int(_number(env, "METERFLOW_MAX_MESSAGE_BYTES", int, 64)),
            future_tolerance_s=float(_number(env, "METERFLOW_FUTURE_TOLERANCE_SECONDS", float, 0)),
            bounds=bounds,
        )
        return cls(
            bootstrap_servers=_get(env, "KAFKA_BOOTSTRAP_SERVERS"),
            local_broker_port=int(_number(env, "METERFLOW_LOCAL_BROKER_PORT", int, 1)),
            partitions=int(_number(env, "METERFLOW_KAFKA_PARTITIONS", int, 1)),
            topic_readings=_get(env, "METERFLOW_TOPIC_READINGS"),
            topic_abnormal=_get(env, "METERFLOW_TOPIC_ABNORMAL"),
            topic_deadletter=_get(env, "METERFLOW_TOPIC_DEADLETTER"),
            topic_status=_get(env, "METERFLOW_TOPIC_STATUS"),
            topic_digest=_get(env, "METERFLOW_TOPIC_DIGEST"),
            data_dir=data_dir,
            lake_path=_get(env, "LAKE_PATH") or str(data_dir / "lake"),
            checkpoint_path=_get(env, "CHECKPOINT_PATH") or str(data_dir / "checkpoints"),
            spark_master=_get(env, "SPARK_MASTER"),
            kafka_source=source,
            trigger_seconds=float(_number(env, "METERFLOW_TRIGGER_SECONDS", float, 0)),
            max_offsets_per_trigger=int(_number(env, "METERFLOW_MAX_OFFSETS_PER_TRIGGER", int, 0)),
            starting_offsets=starting,
            stream_retries=int(_number(env, "METERFLOW_STREAM_RETRIES", int, 0)),
            on_data_loss=_choice(env, "METERFLOW_ON_DATA_LOSS", ("exit", "wait")),
            idle_partition_seconds=float(
                _number(env, "METERFLOW_IDLE_PARTITION_SECONDS", float, 0)
            ),
            rules=rules,
            mongo_uri=_get(env, "MONGO_URI"),
            local_mongo_port=int(_number(env, "METERFLOW_LOCAL_MONGO_PORT", int, 1)),
            mongo_db=_get(env, "MONGO_DB"),
            sink_group=_get(env, "METERFLOW_SINK_GROUP"),
            sink_batch_size=int(_number(env, "METERFLOW_SINK_BATCH_SIZE", int, 1)),
            sink_flush_seconds=float(_number(env, "METERFLOW_SINK_FLUSH_SECONDS", float, 0)),
            abnormal_ttl_days=int(_number(env, "METERFLOW_ABNORMAL_TTL_DAYS", int, 0)),
            lake_retention_days=int(_number(env, "METERFLOW_LAKE_RETENTION_DAYS", int, 0)),
            reading_interval_seconds=int(
                _number(env, "METERFLOW_READING_INTERVAL_SECONDS", int, 1)
            ),
            day_grace_seconds=int(_number(env, "METERFLOW_DAY_GRACE_SECONDS", int, 0)),
            incident_threshold=int(_number(env, "METERFLOW_INCIDENT_THRESHOLD", int, 1)),
            incident_autoclose_hours=float(
                _number(env, "METERFLOW_INCIDENT_AUTOCLOSE_HOURS", float, 0)
            ),
            detection=_detection_rules(env),
            detection_on=_choice(env, "METERFLOW_DETECTION", ("on", "off")) == "on",
            detection_time=_choice(env, "METERFLOW_DETECTION_TIME", ("processing", "event")),
        )

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
