"""Speed layer: classify every reading from Kafka, keep all of them, raise the abnormal ones.

Run by ``spark-submit jobs/streaming_job.py [--available-now] [--accept-data-loss]`` or
``meterflow stream``. One query reads ``iot-meter`` and, per micro-batch
(``foreachBatch``), runs :func:`meterflow.stream.tasks.process_partition` in its tasks:

* every valid and abnormal reading goes to ``LAKE_PATH/readings/date=.../`` and every dead
  letter to ``deadletter/date=.../``, committed through the lake's ledger
  (:mod:`meterflow.core.ledger`): keyed by Kafka offsets, so restarts, retries and a reset
  checkpoint neither lose nor duplicate a reading;
* abnormal readings are published to ``iot-abnormal`` and undecodable input to
  ``iot-deadletter`` (too large for Kafka: a reference to the lake file) before the batch
  commits; a retried batch publishes the same event ids, so sinks upsert idempotently;
* after each commit the low watermark in ``_state/`` advances for the daily DAG.

Offsets gone from Kafka stop the job with one line naming them, unless
``--accept-data-loss`` lets it record the gap in the ledger and go on; a Kafka that is only
unavailable is retried with backoff (``METERFLOW_STREAM_RETRIES``).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import pyarrow.fs as pafs
from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.errors import ConfigError, DataLossError, MeterflowError, StreamUnavailableError
from meterflow.core.ledger import BATCH, GENERATION, LOSS, STAGING_DIR, Ledger, Range
from meterflow.core.logs import get_logger
from meterflow.core.signals import SignalHandler, signals_handled
from meterflow.stream.detection import EpisodePublisher, plan_detection, start_detection
from meterflow.stream.profiles import load_profiles
from meterflow.stream.tasks import (
    SUMMARY_SCHEMA,
    EventTopics,
    Tally,
    TaskPlan,
    process_partition,
)

log = get_logger("meterflow.stream.query")
QUERY_NAME = "meterflow_speed_layer"
ACCEPT = "--accept-data-loss"
_SUMMARY_DDL = lake.spark_ddl(SUMMARY_SCHEMA)
#: Failures worth a retry: Kafka or the network is away, not a bug or a decision.
_TRANSIENT_MARKERS = (
    "KafkaUnavailableError",
    "_TIMED_OUT",
    "Timed out",
    "_TRANSPORT",
    "_ALL_BROKERS_DOWN",
    "does not exist or has no partitions",
    "not available after",
    "Broker transport failure",
)


def event_topics(settings: Settings) -> EventTopics:
    return EventTopics(
        settings.bootstrap_servers,
        settings.topic_abnormal,
        settings.topic_deadletter,
        settings.topic_status,
        settings.topic_digest if settings.detection_on else "",
    )


# -- start-up: paths, generation, checkpoint ------------------------------------------------


def check_writable(settings: Settings) -> None:
    """One line naming the variable when a path the stream writes is not writable."""
    for name, path in (
        ("METERFLOW_DATA_DIR", str(settings.data_dir)),  # the others default to inside it
        ("LAKE_PATH", settings.lake_path),
        ("CHECKPOINT_PATH", settings.checkpoint_path),
    ):
        try:
            lake.ensure_writable(path)
        except OSError as exc:
            raise ConfigError(
                f"{name}={path} is not writable ({lake.os_reason(exc)}): choose another path "
                "or fix its permissions"
            ) from None


def _refuse_legacy_lake(lake_path: str) -> None:
    legacy = posixpath.join(lake.readings_path(lake_path), "_spark_metadata")
    fs, path = lake.filesystem_for(legacy)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        raise ConfigError(
            f"{legacy} exists: this lake was written by meterflow 0.1, whose file-sink log "
            "hides newer files from readers. Start with an empty LAKE_PATH and CHECKPOINT_PATH"
        )


def checkpoint_ends(checkpoint: str) -> dict[int, int] | None:
    """Per partition, where the checkpoint's last committed batch ended (None: no checkpoint).

    Spark's offset log holds, per batch, a version line, a metadata line and one line per
    source with that source's offsets (``{"topic": {"partition": offset}}`` for Kafka).
    """
    fs, root = lake.filesystem_for(checkpoint)
    commits = fs.get_file_info(
        pafs.FileSelector(posixpath.join(root, "commits"), allow_not_found=True)
    )
    done = [int(i.base_name) for i in commits if i.base_name.isdigit()]
    if not done:
        return None
    with fs.open_input_stream(posixpath.join(root, "offsets", str(max(done)))) as stream:
        lines = stream.read().decode().splitlines()
    offsets = json.loads(lines[2])
    return {int(p): int(o) for parts in offsets.values() for p, o in parts.items()}


def _delete(path: str) -> None:
    fs, local = lake.filesystem_for(path)
    if fs.get_file_info(local).type != pafs.FileType.NotFound:
        fs.delete_dir(local)


def _ranges_text(ranges: dict[int, tuple[int, int]], topic: str) -> str:
    return ", ".join(f"{topic}[{p}] {a}..{b - 1}" for p, (a, b) in sorted(ranges.items()))


@dataclass(frozen=True)
class StreamPlan:
    """Where this start reads from: the topic's generation, checkpoint and first offsets."""

    generation: str
    checkpoint: str
    starting_offsets: str


def plan_start(settings: Settings, ledger: Ledger, accept_data_loss: bool) -> StreamPlan:
    """Reconcile the broker, the ledger and the checkpoint before the query starts.

    * A new topic generation (the topic was recreated, or the broker came back empty) is
      accepted silently only when the ledger holds everything the old one was seen to
      have; otherwise the unread ranges are a :class:`DataLossError` unless accepted.
    * The checkpoint lives per generation. One that is ahead of the ledger (the lake or
      its ledger were replaced) would skip offsets: it is discarded, and the query starts
      where the ledger ends.
    """
    topic = settings.topic_readings
    generation = kafka.topic_ids(settings.bootstrap_servers, [topic])[topic]
    known = ledger.generations.get(topic, [])
    if known and generation not in known:
        previous = known[-1]
        unread = ledger.unread(topic, previous)
        if unread and not accept_data_loss:
            raise DataLossError(
                f"{topic} is a new topic (id {generation}, was {previous}): "
                f"{_ranges_text(unread, topic)} were never read and are gone; {ACCEPT} "
                "records them as lost and reads the new topic from its start"
            )
        if unread:
            ledger.commit(
                LOSS,
                [Range(topic, previous, p, a, b) for p, (a, b) in sorted(unread.items())],
                note="topic replaced before these offsets were read (accepted)",
            )
        ledger.commit(
            GENERATION,
            [Range(topic, generation, -1, 0, 0)],
            note=f"{topic} generation {previous} -> {generation}",
        )
        log.warning(
            "generation=new topic=%s previous=%s id=%s lost=%s",
            topic,
            previous,
            generation,
            _ranges_text(unread, topic) or "none",
        )
    # Topic ids are base64: '/' and '+' would nest or escape in a path.
    safe = generation.replace("/", "_").replace("+", "-")
    checkpoint = f"{settings.checkpoint_path.rstrip('/')}/streaming/{topic}-{safe}"
    ends = ledger.ends(topic, generation)
    read_to = checkpoint_ends(checkpoint)
    if read_to is not None and any(end > ends.get(p, 0) for p, end in read_to.items()):
        log.warning(
            "checkpoint=discarded reason=ahead-of-ledger checkpoint=%s ledger=%s path=%s",
            read_to,
            ends,
            checkpoint,
        )
        _delete(checkpoint)
    if not ends:
        return StreamPlan(generation, checkpoint, settings.starting_offsets)
    client = kafka.consumer(settings.bootstrap_servers)
    try:
        partitions = [p for _, p in kafka.topic_partitions(client, [topic])]
    finally:
        client.close()
    default = -2 if settings.starting_offsets == "earliest" else -1
    starting = {topic: {str(p): ends.get(p, default) for p in partitions}}
    return StreamPlan(generation, checkpoint, json.dumps(starting))


# -- one micro-batch ------------------------------------------------------------------------


class GenerationChangedError(MeterflowError):
    """The topic was recreated under the running query: start again to decide."""


class LakeCommitter:
    """``foreachBatch``: run the batch's tasks, then commit their output through the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        generation: str,
        accept_data_loss: bool,
        publish: bool = True,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.generation = generation
        self.accept_data_loss = accept_data_loss
        self.topics = event_topics(settings) if publish else None
        self.run_id = uuid.uuid4().hex[:12]
        self.totals: Counter[str] = Counter()
        self.batches = 0
        self.timings: list[tuple[int, float]] = []  # (offsets committed, seconds) per batch
        self.failure: BaseException | None = None
        self.query: StreamingQuery | None = None
        self.lock = threading.Lock()

    def __call__(self, frame: DataFrame, batch_id: int) -> None:
        try:
            self.commit(frame, batch_id)
        except BaseException as exc:
            self.failure = exc
            raise

    def commit(self, frame: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        topic = self.settings.topic_readings
        current = kafka.topic_ids(self.settings.bootstrap_servers, [topic])[topic]
        if current != self.generation:
            raise GenerationChangedError(
                f"{topic} was recreated (id {self.generation} -> {current})"
            )
        staging = f"{STAGING_DIR}/{self.run_id}-{batch_id}-{uuid.uuid4().hex[:6]}"
        plan = TaskPlan(
            lake_path=self.settings.lake_path,
            staging=staging,
            generation=self.generation,
            rules=self.settings.rules,
            committed={
                (topic, p): tuple(ranges)
                for p, ranges in self.ledger.committed(topic, self.generation).items()
            },
            topics=self.topics,
        )
        rows = frame.mapInArrow(partial(process_partition, plan=plan), _SUMMARY_DDL).collect()
        merged: dict[int, Tally] = {}
        files: list[str] = []
        unpublished = 0
        for row in rows:
            m = merged.setdefault(row.partition, Tally())
            if row.first >= 0:
                m.first = row.first if m.first < 0 else min(m.first, row.first)
                m.last = max(m.last, row.last)
            m.valid += row.valid
            m.abnormal += row.abnormal
            m.deadletter += row.deadletter
            m.skipped += row.skipped
            if row.max_event_us is not None:
                m.max_event_us = max(m.max_event_us or row.max_event_us, row.max_event_us)
            files.extend(json.loads(row.files))
            unpublished += row.unpublished
        ends = self.ledger.ends(topic, self.generation)
        gaps = {
            p: (ends[p], m.first)
            for p, m in merged.items()
            if m.first >= 0 and p in ends and m.first > ends[p]
        }
        if gaps and not self.accept_data_loss:
            _delete(posixpath.join(self.settings.lake_path, staging))
            raise DataLossError(
                f"{_ranges_text(gaps, topic)} were deleted from Kafka before the stream read "
                f"them (retention, or a broker that lost data); {ACCEPT} records them as "
                "lost in the ledger and continues"
            )
        if gaps:
            self.ledger.commit(
                LOSS,
                [Range(topic, self.generation, p, a, b) for p, (a, b) in sorted(gaps.items())],
                note="deleted from Kafka before read (accepted)",
                run_id=self.run_id,
                batch_id=batch_id,
            )
            log.warning("ledger=loss-recorded ranges=%s", _ranges_text(gaps, topic))
        ranges = [
            Range(
                topic,
                self.generation,
                p,
                m.first,
                m.last + 1,
                m.valid,
                m.abnormal,
                m.deadletter,
                m.max_event_us,
            )
            for p, m in sorted(merged.items())
            if m.first >= 0
        ]
        counts = {
            "read": sum(m.valid + m.abnormal + m.deadletter for m in merged.values()),
            "valid": sum(m.valid for m in merged.values()),
            "abnormal": sum(m.abnormal for m in merged.values()),
            "deadletter": sum(m.deadletter for m in merged.values()),
            "skipped": sum(m.skipped for m in merged.values()),
            "lost": sum(b - a for a, b in gaps.values()),
            "unpublished": unpublished,
        }
        if ranges:
            entry = self.ledger.commit(
                BATCH,
                ranges,
                files,
                staging,
                self.run_id,
                batch_id,
                seen_ends=self._seen_ends(),
            )
            self.ledger.publish_files(entry)
            self.ledger.compact_if_due()
            self._advance_watermark()
        else:
            _delete(posixpath.join(self.settings.lake_path, staging))
        seconds = time.monotonic() - started
        with self.lock:
            self.batches += 1
            self.totals.update(counts)
            self.timings.append((counts["read"] + counts["skipped"], seconds))
            totals = dict(self.totals)
        reconciled = counts["read"] == counts["valid"] + counts["abnormal"] + counts["deadletter"]
        log.log(
            20 if reconciled and not unpublished else 40,
            "batch=%d read=%d valid=%d abnormal=%d deadletter=%d skipped=%d lost=%d "
            "unpublished=%d seconds=%.2f rows_per_s=%.0f total_read=%d total_valid=%d "
            "total_abnormal=%d total_deadletter=%d ledger_seq=%d",
            batch_id,
            counts["read"],
            counts["valid"],
            counts["abnormal"],
            counts["deadletter"],
            counts["skipped"],
            counts["lost"],
            unpublished,
            seconds,
            counts["read"] / seconds if seconds else 0.0,
            totals["read"],
            totals["valid"],
            totals["abnormal"],
            totals["deadletter"],
            self.ledger.seq,
        )

    def _seen_ends(self) -> dict[str, dict[str, int]]:
        """The broker's ends as the source last reported them (a lower bound of the truth)."""
        try:
            progress = self.query.lastProgress if self.query is not None else None
            latest = progress.sources[0].latestOffset if progress else None
            offsets = json.loads(latest) if isinstance(latest, str) else latest
            parts = (offsets or {}).get(self.settings.topic_readings, {})
            return {self.generation: {str(p): int(o) for p, o in parts.items()}}
        except (AttributeError, IndexError, TypeError, ValueError):
            return {}

    def _advance_watermark(self) -> None:
        """Low watermark: the oldest "newest reading" among partitions still bringing data.

        A partition that brought nothing for ``idle_partition_seconds`` is caught up (each
        micro-batch reads every partition's backlog), so it no longer holds the others
        back. The watermark never passes the wall clock and never moves backwards; it is
        written with the generation and offsets it speaks for (:func:`lake.advance_watermark`).
        """
        now = datetime.now(UTC)
        states = self.ledger.states(self.settings.topic_readings, self.generation)
        known = {
            p: (s.max_event_us, s.last_data_at)
            for p, s in states.items()
            if s.max_event_us is not None
        }
        if not known:
            return
        active = [
            max_us
            for max_us, last_data_at in known.values()
            if last_data_at is not None
            and (now - datetime.fromisoformat(last_data_at)).total_seconds()
            <= self.settings.idle_partition_seconds
        ]
        newest_us = min(active) if active else max(max_us for max_us, _ in known.values())
        watermark = min(now, datetime.fromtimestamp(newest_us / 1e6, UTC))
        topic = self.settings.topic_readings
        try:
            lake.advance_watermark(
                self.settings.lake_path,
                topic,
                self.generation,
                watermark,
                {
                    str(p): datetime.fromtimestamp(max_us / 1e6, UTC).isoformat()
                    for p, (max_us, _) in sorted(known.items())
                },
                self.ledger.ends(topic, self.generation),
                {int(p): e for p, e in self.ledger.seen_ends.get(self.generation, {}).items()},
            )
        except OSError as exc:  # bookkeeping must not stop the stream; the DAG waits longer
            log.warning("watermark=unwritten path=%s error=%s", self.settings.lake_path, exc)


# -- the query and its lifecycle ------------------------------------------------------------


def start_query(
    spark: SparkSession,
    settings: Settings,
    source_format: str,
    plan: StreamPlan,
    committer: LakeCommitter,
    available_now: bool = False,
) -> StreamingQuery:
    """Wire the source and the committer; return the running query."""
    reader = (
        spark.readStream.format(source_format)
        .option("kafka.bootstrap.servers", settings.bootstrap_servers)
        .option("subscribe", settings.topic_readings)
        .option("startingOffsets", plan.starting_offsets)
        # Deleted offsets are skipped by the source and decided on by the committer, which
        # sees the gap against the ledger (one rule for the Python and the JVM source).
        .option("failOnDataLoss", "false")
    )
    if not settings.detection_on:
        # More tasks than partitions use every core, but would split a meter's readings
        # over tasks, each publishing a digest: the detector would skip the older one if
        # it came second (docs/architecture.md, "Stateful detection").
        parallelism = max(2, spark.sparkContext.defaultParallelism)
        reader = reader.option("minPartitions", str(parallelism))
    if settings.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    writer = (
        reader.load()
        .writeStream.queryName(QUERY_NAME)
        .foreachBatch(committer)
        .option("checkpointLocation", plan.checkpoint)
    )
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{settings.trigger_seconds:g} seconds")
    query = writer.start()
    committer.query = query
    return query


def _await(queries: list[StreamingQuery], stop: threading.Event, grace_s: float = 60.0) -> None:
    """Wait while every query runs (one that ends or fails ends the wait); once ``stop`` is
    set let each running micro-batch commit, then stop them."""
    while all(q.isActive for q in queries) and not stop.is_set():
        try:
            queries[0].awaitTermination(1)
        except StreamingQueryException:  # read again by the caller from query.exception()
            break
    if stop.is_set() and any(q.isActive for q in queries):
        log.info("streaming=stopping reason=signal")
        deadline = time.monotonic() + grace_s
        while any(q.isActive and q.status["isTriggerActive"] for q in queries):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    for query in queries:
        if query.isActive:
            query.stop()


def _generation_changed(bootstrap_servers: str, topic: str, generation: str) -> bool:
    """Whether ``topic`` now has another id than ``generation`` (recreated under the query)."""
    try:
        return kafka.topic_ids(bootstrap_servers, [topic], timeout=5)[topic] != generation
    except kafka.KafkaUnavailableError:
        return False


_RAISED = re.compile(r"^\s*([\w.]+(?:Error|Exception)): (.+)$")


def _first_line(error: BaseException) -> str:
    """The line that says what went wrong: the innermost ``SomeError: ...`` of a Spark
    failure (whose message embeds Python tracebacks), else the first line."""
    text = str(getattr(error, "desc", None) or error)
    raised = [m for m in map(_RAISED.match, text.splitlines()) if m]
    if raised:
        name, message = raised[-1].groups()
        return f"{name.rsplit('.', 1)[-1]}: {message.strip()}"[:400]
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            return line[:400]
    return type(error).__name__


def _source_error(error: BaseException) -> BaseException:
    """A data-loss message from the source becomes a :class:`DataLossError`."""
    text = str(getattr(error, "desc", None) or error)
    if "DATA_LOSS " in text:
        detail = text.split("DATA_LOSS ", 1)[1].splitlines()[0]
        return DataLossError(f"{detail}; {ACCEPT} records what is gone in the ledger and continues")
    return error


def run(
    settings: Settings,
    available_now: bool = False,
    spark: SparkSession | None = None,
    accept_data_loss: bool = False,
    stop: threading.Event | None = None,
    publish: bool = True,
    on_committer: Callable[[LakeCommitter], None] | None = None,
    on_signal: SignalHandler | None = None,
) -> dict[str, int]:
    """Run the speed layer until ``stop`` (or, with ``available_now``, until caught up).

    A transient failure (Kafka away) restarts the query after a backoff, up to
    ``settings.stream_retries`` times in a row; a new topic generation is re-planned; data
    loss and bad configuration end the run with a one-line :class:`MeterflowError`.
    ``on_signal`` handles Ctrl-C and SIGTERM; it is installed once the Spark session exists
    (PySpark puts its own SIGINT handler in place when it starts), and removed at the end.
    """
    from meterflow.spark.session import get_spark

    check_writable(settings)
    _refuse_legacy_lake(settings.lake_path)
    spark = spark or get_spark("meterflow-streaming", settings.spark_master)
    stop = stop or threading.Event()
    with signals_handled(on_signal) if on_signal else contextlib.nullcontext():
        return _run(settings, available_now, spark, accept_data_loss, stop, publish, on_committer)


def _run(
    settings: Settings,
    available_now: bool,
    spark: SparkSession,
    accept_data_loss: bool,
    stop: threading.Event,
    publish: bool,
    on_committer: Callable[[LakeCommitter], None] | None,
) -> dict[str, int]:
    from meterflow.spark.session import kafka_format

    source_format = kafka_format(spark, settings.kafka_source)
    totals: Counter[str] = Counter()
    attempt = 0
    started = time.monotonic()
    while True:
        ledger = Ledger.load(settings.lake_path)
        ledger.recover()
        try:
            plan = plan_start(settings, ledger, accept_data_loss)
        except kafka.KafkaUnavailableError as exc:
            attempt = _backoff(settings, attempt, exc, stop)
            if stop.is_set():
                break
            continue
        committer = LakeCommitter(settings, ledger, plan.generation, accept_data_loss, publish)
        if on_committer is not None:
            on_committer(committer)
        log.info(
            "streaming source=%s bootstrap=%s topic=%s generation=%s lake=%s start=%s "
            "trigger=%s ledger_seq=%d",
            source_format,
            settings.bootstrap_servers,
            settings.topic_readings,
            plan.generation,
            settings.lake_path,
            plan.starting_offsets,
            "availableNow" if available_now else f"{settings.trigger_seconds:g}s",
            ledger.seq,
        )
        lake.watermark_started(settings.lake_path, settings.topic_readings, plan.generation)
        query = start_query(spark, settings, source_format, plan, committer, available_now)
        queries: list[StreamingQuery] = [query]
        publisher: EpisodePublisher | None = None
        unstarted: BaseException | None = None
        try:
            if settings.detection_on and not available_now:  # live: both run side by side
                publisher, detector = _start_detector(spark, settings, source_format, False)
                queries.append(detector)
            _await(queries, stop)
            if settings.detection_on and available_now and _ended_well(query, committer):
                # A catch-up: the digests are all published once the lake query is done.
                publisher, detector = _start_detector(spark, settings, source_format, True)
                queries.append(detector)
                _await([detector], stop)
        except kafka.KafkaUnavailableError as exc:  # the digest topic's id, before any query
            unstarted = exc
        finally:
            for running in queries:
                if running.isActive:
                    running.stop()
            totals.update(committer.totals)
            if publisher is not None:
                totals.update(publisher.totals)
        error = (
            committer.failure
            or query.exception()
            or unstarted
            or (publisher.failure if publisher is not None else None)
            or (queries[1].exception() if len(queries) > 1 else None)
        )
        if error is None:
            break
        if isinstance(error, GenerationChangedError) or _generation_changed(
            settings.bootstrap_servers, settings.topic_readings, plan.generation
        ):
            log.warning("streaming=restart reason=generation-changed detail=%s", _first_line(error))
            attempt = 0
            continue
        error = _source_error(error)
        if isinstance(error, MeterflowError) and not isinstance(error, kafka.KafkaUnavailableError):
            raise error  # a decision or a bad configuration; Kafka away is retried below
        if not any(marker in str(error) for marker in _TRANSIENT_MARKERS):
            log.error("streaming=failed error=%s", error)  # the whole story, once, in the log
            raise MeterflowError(
                f"the stream failed: {_first_line(error)} (details in the log above); the "
                "next start resumes where the lake's ledger ends"
            )
        if committer.batches:
            attempt = 0  # it made progress: a new outage starts a new count
        attempt = _backoff(settings, attempt, error, stop)
        if stop.is_set():
            break
    result = {name: totals[name] for name in ("read", "valid", "abnormal", "deadletter")}
    result.update(skipped=totals["skipped"], lost=totals["lost"])
    result.update({name: n for name, n in totals.items() if name.startswith(("open_", "clear_"))})
    log.info(
        "streaming=stopped seconds=%.1f read=%d valid=%d abnormal=%d deadletter=%d skipped=%d "
        "lost=%d",
        time.monotonic() - started,
        *(result[k] for k in ("read", "valid", "abnormal", "deadletter", "skipped", "lost")),
    )
    return result


def _ended_well(query: StreamingQuery, committer: LakeCommitter) -> bool:
    return not query.isActive and committer.failure is None and query.exception() is None


def _start_detector(
    spark: SparkSession, settings: Settings, source_format: str, available_now: bool
) -> tuple[EpisodePublisher, StreamingQuery]:
    """The stateful stage's query (:mod:`meterflow.stream.detection`) and its publisher.

    A catch-up (``available_now``) runs in event time whatever ``METERFLOW_DETECTION_TIME``
    says: processing-time timers are always pending, so Spark would never call it done.
    """
    clock = "event" if available_now else settings.detection_time
    plan = plan_detection(
        settings.bootstrap_servers, settings.topic_digest, settings.checkpoint_path, clock
    )
    profiles = load_profiles(settings.registry_path, settings.detection)
    publisher = EpisodePublisher(settings.bootstrap_servers, settings.topic_abnormal)
    log.info(
        "detector source=%s topic=%s generation=%s clock=%s checkpoint=%s",
        source_format,
        settings.topic_digest,
        plan.generation,
        clock,
        plan.checkpoint,
    )
    query = start_detection(
        spark,
        source_format,
        settings.bootstrap_servers,
        plan,
        publisher,
        settings.topic_digest,
        settings.detection,
        profiles,
        settings.reading_interval_seconds,
        clock,
        settings.trigger_seconds,
        available_now,
    )
    return publisher, query


def _backoff(settings: Settings, attempt: int, error: BaseException, stop: threading.Event) -> int:
    """Wait before the next attempt; raise once ``stream_retries`` attempts failed."""
    attempt += 1
    if attempt > settings.stream_retries:
        retries = settings.stream_retries
        raise StreamUnavailableError(
            f"Kafka at {settings.bootstrap_servers} still unavailable after {retries} "
            f"{'retry' if retries == 1 else 'retries'} ({_first_line(error)}); check the "
            "broker, then start the stream again: it resumes where the lake's ledger ends"
        )
    delay = min(30.0, 2.0 ** (attempt - 1))
    log.warning(
        "streaming=retry attempt=%d of=%d retry_in_s=%.0f error=%s",
        attempt,
        settings.stream_retries,
        delay,
        _first_line(error),
    )
    stop.wait(delay)
    if not stop.is_set():
        # A broker that came back empty: recreate the topics, then re-plan.
        with contextlib.suppress(kafka.KafkaUnavailableError):
            kafka.check_reachable(settings.bootstrap_servers, timeout=5)
            kafka.ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)
    return attempt
