"""The stateful stage as a query of its own: reading digests in, episode events out.

``meterflow stream`` (and the streaming job) start it beside the lake query when
``METERFLOW_DETECTION=on``. It reads ``iot-meter-digest`` (which the lake query's tasks
fill), runs :func:`~meterflow.stream.detection.processor.detect_faults` on the RocksDB
state store, and publishes every episode change as an
:class:`~meterflow.core.messages.AbnormalEvent` with its
:class:`~meterflow.core.messages.Episode` on ``iot-abnormal``, keyed by meter, before the
micro-batch commits. A batch retried after a crash recomputes the same changes
from the same state version, and the event ids (``device|code|start|action``) make the
sink store them once (docs/architecture.md, "Stateful detection").

Its checkpoint lives per digest-topic generation (a recreated topic's offsets restart) and
per NO_DATA clock. A new checkpoint of the same clock starts from the state of the newest
one before it (Spark's state reader, ``initialState``), so a broker restart or a topic
migration keeps each meter's baselines and runs; a clock change starts afresh, which the
log says.
"""

from __future__ import annotations

import posixpath
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow.fs as pafs
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql.streaming import StreamingQuery

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.contract import FaultCode
from meterflow.core.kafka_security import KafkaCluster
from meterflow.core.logs import get_logger
from meterflow.core.messages import AbnormalEvent, Episode, encode
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import format_timestamp_us
from meterflow.spark.session import source_options, start_stream
from meterflow.stream.detection.processor import (
    EVENT_TIME,
    PROCESSING_TIME,
    count_state,
    detect_faults,
    digest_rows,
    read_state,
)
from meterflow.stream.detection.profiles import MeterProfile
from meterflow.stream.detection.rules import episode_id
from meterflow.stream.foreach_batch import ForeachBatch
from meterflow.stream.startup import generation_dir

log = get_logger(__name__)
QUERY_NAME = "meterflow_detector"
#: Digests a micro-batch reads at most: a catch-up then moves the watermark in steps (a
#: meter on a partition that is behind is not taken for silent) and bounds the pandas
#: frames the state store's workers hold. One digest is a meter's readings of one batch.
DIGESTS_PER_TRIGGER = 50_000
#: ``METERFLOW_DETECTION_TIME`` to the operator's time mode.
TIME_MODES = {"processing": PROCESSING_TIME, "event": EVENT_TIME}


@dataclass(frozen=True)
class DetectionPlan:
    """Where the detector reads from: the digest topic's generation and the checkpoint,
    and, for a fresh checkpoint, the previous one whose state it starts from."""

    generation: str
    checkpoint: str
    previous: str | None = None


def plan_detection(
    bootstrap_servers: kafka.Cluster, topic: str, checkpoint_path: str, clock: str
) -> DetectionPlan:
    """The checkpoint of the digest topic's current generation under this ``clock``.

    A fresh one (no committed batch) carries the meters' state over from the newest
    committed checkpoint of the same clock: a digest topic recreated (a broker that came
    back empty, a migration) keeps the meters' history. A checkpoint of the other clock
    is not carried over: its timers run on the other clock, so the state starts afresh,
    and the log says so.
    """
    generation = kafka.topic_ids(bootstrap_servers, [topic])[topic]
    base = posixpath.join(checkpoint_path.rstrip("/"), "detector")
    checkpoint = posixpath.join(base, clock, generation_dir(topic, generation))
    if _committed_at(checkpoint) is not None:
        return DetectionPlan(generation, checkpoint)  # a restart: its own state
    committed = {
        path: at
        for known in TIME_MODES
        for path in lake.subdirectories(posixpath.join(base, known))
        if path != checkpoint and (at := _committed_at(path)) is not None
    }
    same_clock = [path for path in committed if path.startswith(f"{base}/{clock}/")]
    if same_clock:
        return DetectionPlan(generation, checkpoint, max(same_clock, key=committed.__getitem__))
    if committed:
        log.warning(
            "detector=fresh-state reason=clock-changed topic=%s generation=%s clock=%s "
            "previous=%s (timers of another clock do not carry over)",
            topic,
            generation,
            clock,
            ",".join(sorted(committed)),
        )
    return DetectionPlan(generation, checkpoint)


def _committed_at(checkpoint: str) -> float | None:
    """When the checkpoint's last batch committed (epoch seconds), None if none did."""
    fs, root = lake.filesystem_for(checkpoint)
    commits = fs.get_file_info(
        pafs.FileSelector(posixpath.join(root, "commits"), allow_not_found=True)
    )
    times = [i.mtime.timestamp() for i in commits if i.base_name.isdigit() and i.mtime]
    return max(times, default=None)


def carried_state(spark: SparkSession, previous: str) -> DataFrame | None:
    """The buckets of the ``previous`` checkpoint for a fresh one to start from; None (a
    fresh start, said in one warning) if they cannot be read: never a crash."""
    try:
        state = read_state(spark, previous)
        buckets, meters = count_state(state)
    except Exception as exc:  # whatever the reader raises: the history is not worth a stop
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        log.warning(
            "detector=fresh-state reason=previous-state-unreadable from=%s error=%s",
            previous,
            reason[:300],
        )
        return None
    log.info("detector=state-carried-over from=%s buckets=%d meters=%d", previous, buckets, meters)
    return state


def episode_event(row: Row, detected_at: str) -> AbnormalEvent:
    """One change row (:data:`~meterflow.stream.detection.processor.CHANGE_SCHEMA`) as a
    wire event."""
    code = FaultCode(row.fault_code)
    episode = Episode(
        id=episode_id(row.device_id, code, row.start_us),
        action=row.action,
        start=format_timestamp_us(row.start_us),
    )
    return AbnormalEvent(
        event_id=f"{episode.id}|{row.action}",
        device_id=row.device_id,
        meter_type=row.meter_type,
        timestamp=format_timestamp_us(row.at_us),
        fault_code=str(code),
        reason=row.reason,
        reading=None if row.value is None else {"value": row.value},
        detected_at=detected_at,
        episode=episode,
    )


class EpisodePublisher(ForeachBatch):
    """``foreachBatch``: publish a micro-batch's episode changes, then let it commit.

    The frame is computed once (``collect``): that is what commits the state store's
    version for the batch. Undelivered events fail the batch, so it is retried rather than
    committed without them.
    """

    def __init__(self, bootstrap_servers: kafka.Cluster, topic: str) -> None:
        super().__init__()
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic

    def process(self, frame: DataFrame, batch_id: int) -> None:
        """Publish one micro-batch's episode changes, all acknowledged, or fail it."""
        started = time.monotonic()
        rows = frame.collect()
        counts: Counter[str] = Counter(f"{row.action}_{row.fault_code}" for row in rows)
        if rows:
            detected_at = format_timestamp_us(int(datetime.now(UTC).timestamp() * 1e6))
            producer = kafka.producer(self.bootstrap_servers)
            failed: list[str] = []

            def delivered(error: object, _message: object) -> None:
                if error is not None:
                    failed.append(str(error))

            for row in rows:
                event = episode_event(row, detected_at)
                kafka.produce(
                    producer,
                    self.topic,
                    encode(event),
                    event.device_id.encode(),
                    on_delivery=delivered,
                )
            remaining = producer.flush(120)
            if remaining or failed:
                raise kafka.KafkaUnavailableError(
                    f"{remaining} episode events undelivered, {len(failed)} failed (first: "
                    f"{failed[:1]}); the detector's batch {batch_id} will be retried"
                )
        self.batches += 1
        self.totals.update(counts)
        log.info(
            "detector_batch=%d changes=%d %s seconds=%.2f",
            batch_id,
            len(rows),
            " ".join(f"{name.lower()}={n}" for name, n in sorted(counts.items())) or "none=0",
            time.monotonic() - started,
        )


@dataclass(frozen=True)
class DetectorSpec:
    """What the detector's query needs: where its digests come from, how it decides, and
    how often it runs."""

    source_format: str  # the Kafka source: "kafka" (JVM) or the Python one
    kafka: KafkaCluster
    digest_topic: str
    plan: DetectionPlan
    clock: str  # METERFLOW_DETECTION_TIME: "processing" or "event"
    rules: DetectionRules
    profiles: Mapping[str, MeterProfile]
    default_interval_s: int
    trigger_seconds: float
    zone_name: str
    available_now: bool = False


def start_detection(
    spark: SparkSession, spec: DetectorSpec, publisher: EpisodePublisher
) -> StreamingQuery:
    """Wire the digest source, the stateful stage and the publisher; the running query.

    A fresh checkpoint starts from the previous one's state (:func:`plan_detection`) and
    reads the digest topic from its start: the digests Kafka still holds rebuild or extend
    the meters' recent history (baselines, runs) before live data; those the carried state
    already saw are not newer than it, so the rules skip them.
    """
    digests = (
        spark.readStream.format(spec.source_format)
        .options(**source_options(spec.kafka, spec.source_format))
        .option("subscribe", spec.digest_topic)
        .option("startingOffsets", "earliest")
        .option("failOnDataLoss", "false")
        .option("maxOffsetsPerTrigger", str(DIGESTS_PER_TRIGGER))
        .load()
    )
    previous = spec.plan.previous
    changes = detect_faults(
        digest_rows(digests),
        spec.rules,
        spec.profiles,
        spec.default_interval_s,
        TIME_MODES[spec.clock],
        initial_state=carried_state(spark, previous) if previous else None,
        zone_name=spec.zone_name,
    )
    writer = (
        changes.writeStream.queryName(QUERY_NAME)
        .foreachBatch(publisher)
        .option("checkpointLocation", spec.plan.checkpoint)
    )
    return start_stream(writer, spec.available_now, spec.trigger_seconds)
