"""Speed layer: classify every reading from Kafka, keep all of them, raise the abnormal ones.

Submit with ``spark-submit jobs/streaming_job.py [--available-now]`` or run ``meterflow
stream``. One query reads ``iot-meter`` once and:

* writes every valid and abnormal reading to ``LAKE_PATH/readings/date=.../`` with Spark's
  file sink and a checkpoint (exactly-once across restarts);
* publishes abnormal readings to ``iot-abnormal`` and undecodable input to ``iot-deadletter``
  from the classifying tasks themselves. A task succeeds only after Kafka acknowledged its
  events; a retried batch publishes them again with the same ids (``topic-partition-offset``),
  so downstream sinks upsert idempotently (at-least-once, never lost);
* counts read / valid / abnormal / dead-lettered per micro-batch with ``observe`` and logs
  them with running totals, which must reconcile.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery, StreamingQueryListener

from meterflow import kafka, lake
from meterflow.config import ConfigError, Settings
from meterflow.contract import Rules, Status
from meterflow.lake import (
    CLASSIFIED_SCHEMA,
    LAKE_COLUMNS,
    PARTITION_COLUMN,
    readings_path,
    spark_ddl,
)
from meterflow.logs import ensure_logging, get_logger, setup_logging
from meterflow.pipeline import STATUS_COLUMNS, BatchResult, classify_batches, status_updates

log = get_logger("jobs.streaming")
QUERY_NAME = "meterflow_speed_layer"
METRICS_NAME = "meterflow_counts"


@dataclass(frozen=True)
class EventTopics:
    """Where the classifying tasks publish; ``None`` in tests that only look at the lake."""

    bootstrap: str
    abnormal: str
    deadletter: str
    status: str

    @classmethod
    def of(cls, settings: Settings) -> EventTopics:
        return cls(
            settings.bootstrap_servers,
            settings.topic_abnormal,
            settings.topic_deadletter,
            settings.topic_status,
        )


_producers: dict[str, object] = {}  # one per Python worker process, reused across tasks


class _Publisher:
    """Publishes a task's events and fails the task if any delivery fails.

    Abnormal events and dead letters go out batch by batch; one status update per meter
    goes out when the task's input is exhausted (its latest reading in the task).
    """

    def __init__(self, topics: EventTopics) -> None:
        self.topics = topics
        if topics.bootstrap not in _producers:
            ensure_logging()  # a Python worker: librdkafka's messages as meterflow log lines
            _producers[topics.bootstrap] = kafka.producer(topics.bootstrap)
        self.producer = _producers[topics.bootstrap]
        self.failures: list[str] = []
        self.seen: list[pa.RecordBatch] = []

    def _delivered(self, error, message) -> None:
        if error is not None:
            self.failures.append(f"{message.topic()}: {error}")

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers=None) -> None:
        kafka.produce(
            self.producer, topic, value, key, headers=headers, on_delivery=self._delivered
        )

    def publish(self, result: BatchResult) -> None:
        for key, value in result.abnormal_events:
            self._produce(self.topics.abnormal, key, value)
        for letter in result.dead_letters:
            self._produce(self.topics.deadletter, letter.key, letter.value, letter.headers())
        self.seen.append(result.classified.select(list(STATUS_COLUMNS)))
        self.producer.poll(0)

    def finish(self) -> None:
        if self.seen:
            for key, value in status_updates(pa.Table.from_batches(self.seen)):
                self._produce(self.topics.status, key, value)
            self.seen.clear()
        remaining = self.producer.flush(120)
        if remaining or self.failures:
            raise RuntimeError(
                f"{remaining} events undelivered, {len(self.failures)} failed "
                f"(first: {self.failures[:1]}); the batch will be retried"
            )


def _classify_partition(
    batches: Iterator[pa.RecordBatch], rules: Rules, topics: EventTopics | None
) -> Iterator[pa.RecordBatch]:
    if topics is None:
        yield from classify_batches(batches, rules)
        return
    publisher = _Publisher(topics)
    yield from classify_batches(batches, rules, publisher.publish, publisher.finish)


def classify_readings(raw: DataFrame, rules: Rules, topics: EventTopics | None) -> DataFrame:
    """Kafka records (the connector's schema) to classified rows, publishing as a side effect."""
    return raw.mapInArrow(
        partial(_classify_partition, rules=rules, topics=topics), spark_ddl(CLASSIFIED_SCHEMA)
    )


def _is(status: Status) -> Column:
    return F.sum((F.col("status") == str(status)).cast("long"))


def with_outcome_counts(classified: DataFrame) -> DataFrame:
    """Attach per-batch counts that the listener logs (``observe`` costs no extra pass)."""
    return classified.observe(
        METRICS_NAME,
        F.count(F.lit(1)).alias("read"),
        _is(Status.VALID).alias("valid"),
        _is(Status.ABNORMAL).alias("abnormal"),
        _is(Status.DEADLETTER).alias("deadletter"),
        # Event-time progress for the daily DAG; clamped to ingestion so that a reading
        # stamped in the future cannot declare days complete that have not happened.
        F.max(
            F.when(
                F.col("status") != str(Status.DEADLETTER),
                F.least(F.col("event_time"), F.col("ingest_time")),
            )
        ).alias("max_event_time"),
    )


def lake_rows(classified: DataFrame) -> DataFrame:
    """What the lake keeps: valid and abnormal readings, without the in-flight status."""
    return classified.filter(F.col("status") != str(Status.DEADLETTER)).select(*LAKE_COLUMNS)


class CountsListener(StreamingQueryListener):
    """Logs each micro-batch's counts and running totals, and checks they reconcile.

    With a ``lake_path`` it also advances the stream's event-time watermark file
    (:func:`meterflow.lake.advance_watermark`) once each batch has committed.
    """

    def __init__(self, lake_path: str | None = None) -> None:
        self.lake_path = lake_path
        self.totals = {"read": 0, "valid": 0, "abnormal": 0, "deadletter": 0}
        self.batches = 0
        self.timings: list[tuple[int, float]] = []  # (rows read, seconds) per micro-batch
        self.lock = threading.Lock()

    def onQueryStarted(self, event) -> None:
        log.info("query=started id=%s name=%s", event.id, event.name)

    def onQueryProgress(self, event) -> None:
        progress = event.progress
        row = progress.observedMetrics.get(METRICS_NAME)
        if row is None:
            return
        counts = {name: int(row[name] or 0) for name in self.totals}
        with self.lock:
            self.batches += 1
            self.timings.append(
                (counts["read"], progress.durationMs.get("triggerExecution", 0) / 1000)
            )
            for name, value in counts.items():
                self.totals[name] += value
            totals = dict(self.totals)
        batch_ok = counts["read"] == counts["valid"] + counts["abnormal"] + counts["deadletter"]
        total_ok = totals["read"] == totals["valid"] + totals["abnormal"] + totals["deadletter"]
        log.log(
            20 if batch_ok and total_ok else 40,
            "batch=%d read=%d valid=%d abnormal=%d deadletter=%d rows_per_s=%.0f "
            "total_read=%d total_valid=%d total_abnormal=%d total_deadletter=%d reconciled=%s",
            progress.batchId,
            counts["read"],
            counts["valid"],
            counts["abnormal"],
            counts["deadletter"],
            progress.processedRowsPerSecond or 0.0,
            totals["read"],
            totals["valid"],
            totals["abnormal"],
            totals["deadletter"],
            str(batch_ok and total_ok).lower(),
        )
        if self.lake_path and row["max_event_time"] is not None:
            self._advance(row["max_event_time"], progress.batchId)

    def _advance(self, event_time: datetime, batch_id: int) -> None:
        if event_time.tzinfo is None:  # Spark hands back session-local naive datetimes
            event_time = event_time.astimezone(UTC)
        try:
            watermark = lake.advance_watermark(self.lake_path, event_time, batch_id)
        except OSError as exc:  # never let bookkeeping stop the stream; the DAG has a grace
            log.warning("watermark=unwritten path=%s error=%s", self.lake_path, exc)
            return
        log.debug("watermark=%s batch=%d", watermark.isoformat(), batch_id)

    def onQueryIdle(self, event) -> None:
        pass

    def onQueryTerminated(self, event) -> None:
        log.info(
            "query=terminated id=%s exception=%s totals=%s", event.id, event.exception, self.totals
        )


def start_query(
    spark: SparkSession,
    settings: Settings,
    source_format: str,
    available_now: bool = False,
    publish: bool = True,
) -> StreamingQuery:
    """Wire source, classification and sinks; return the running query."""
    reader = (
        spark.readStream.format(source_format)
        .option("kafka.bootstrap.servers", settings.bootstrap_servers)
        .option("subscribe", settings.topic_readings)
        .option("startingOffsets", settings.starting_offsets)
        .option("minPartitions", str(max(2, spark.sparkContext.defaultParallelism)))
    )
    if settings.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    topics = EventTopics.of(settings) if publish else None
    classified = with_outcome_counts(classify_readings(reader.load(), settings.rules, topics))
    writer = (
        lake_rows(classified)
        .writeStream.queryName(QUERY_NAME)
        .format("parquet")
        .partitionBy(PARTITION_COLUMN)
        .option("path", readings_path(settings.lake_path))
        .option("checkpointLocation", f"{settings.checkpoint_path.rstrip('/')}/streaming")
    )
    if settings.lake_retention_days:
        # Let the sink's metadata log forget files as old as those retention deletes.
        writer = writer.option("retention", f"{settings.lake_retention_days}d")
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{settings.trigger_seconds:g} seconds")
    return writer.start()


def _await_or_stop(query: StreamingQuery, grace_s: float = 60.0) -> None:
    """Wait for the query; on Ctrl-C or SIGTERM let the running micro-batch commit, then stop.

    Signals only set a flag: raising inside a py4j call would break the gateway connection,
    and ``query.stop()`` in the middle of a batch aborts it (it is redone on restart, so
    nothing is lost, but the work is wasted and Spark logs errors).
    """
    requested = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: requested.set())
    try:
        while query.isActive and not requested.is_set():
            query.awaitTermination(1.0)
        if requested.is_set() and query.isActive:
            log.info("streaming=stopping reason=signal")
            deadline = time.monotonic() + grace_s
            while query.isActive and query.status["isTriggerActive"]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            query.stop()
        elif query.exception() is not None:
            raise query.exception()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _drain(listener: CountsListener, query: StreamingQuery, timeout: float = 10.0) -> None:
    """Wait until the listener, which Spark calls asynchronously, has seen the last batches."""
    seen = sum(1 for p in query.recentProgress if METRICS_NAME in p.observedMetrics)
    deadline = time.monotonic() + timeout
    while listener.batches < seen and time.monotonic() < deadline:
        time.sleep(0.05)


def run(
    settings: Settings,
    available_now: bool = False,
    spark: SparkSession | None = None,
    listener: CountsListener | None = None,
) -> dict[str, int]:
    """Run the speed layer until stopped (or, with ``available_now``, until caught up)."""
    from meterflow.spark.session import get_spark, kafka_format

    spark = spark or get_spark("meterflow-streaming", settings.spark_master)
    listener = listener or CountsListener(settings.lake_path)
    spark.streams.addListener(listener)
    source_format = kafka_format(spark, settings)
    log.info(
        "streaming source=%s bootstrap=%s topic=%s lake=%s trigger=%s",
        source_format,
        settings.bootstrap_servers,
        settings.topic_readings,
        readings_path(settings.lake_path),
        "availableNow" if available_now else f"{settings.trigger_seconds:g}s",
    )
    query = start_query(spark, settings, source_format, available_now)
    started = time.monotonic()
    try:
        _await_or_stop(query)
    finally:
        if query.isActive:
            query.stop()
        _drain(listener, query)
        spark.streams.removeListener(listener)
    log.info(
        "streaming=stopped seconds=%.1f totals=%s", time.monotonic() - started, listener.totals
    )
    return dict(listener.totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--available-now", action="store_true", help="process what is in Kafka now, then exit"
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        parser.error(str(exc))
    if not settings.bootstrap_servers:
        parser.error(
            "KAFKA_BOOTSTRAP_SERVERS must be set under spark-submit "
            "(meterflow stream starts a local broker itself)"
        )
    run(settings, available_now=args.available_now)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
