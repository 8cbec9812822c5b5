"""Speed layer: classify every reading from Kafka, keep all of them, raise the abnormal ones.

Run by ``spark-submit jobs/streaming_job.py [--available-now] [--accept-data-loss]`` or
``meterflow stream``; :func:`run` is the entry point. Each start of the stream plans where
to read (:mod:`meterflow.stream.startup`), starts the lake query, whose micro-batches
:class:`~meterflow.stream.commit.LakeCommitter` commits through the lake's ledger, and,
with detection on, the stateful stage's query (:mod:`meterflow.stream.detection.query`). The
supervisor waits for them and decides on how a start ended:

* stopped, or caught up with ``available_now``: done;
* the readings topic was recreated under the query: plan again at once;
* Kafka away (a transient failure): start again after a backoff, up to
  ``METERFLOW_STREAM_RETRIES`` failures in a row;
* a decision (offsets gone from Kafka: :mod:`meterflow.stream.dataloss`) or a bad
  configuration: its own one-line :class:`MeterflowError`;
* anything else: the whole story in the log, one line out.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.errors import StreamingQueryException
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.backoff import Backoff
from meterflow.core.config import Settings
from meterflow.core.errors import MeterflowError, StreamUnavailableError
from meterflow.core.ledger import Ledger
from meterflow.core.logs import get_logger
from meterflow.core.signals import SignalHandler, signals_handled
from meterflow.spark.session import (
    checkpoint_conf,
    get_spark,
    kafka_format,
    set_log_levels,
    source_options,
    start_stream,
)
from meterflow.stream.commit import LakeCommitter
from meterflow.stream.detection.profiles import MeterProfile, load_profiles
from meterflow.stream.detection.query import (
    DetectorSpec,
    EpisodePublisher,
    plan_detection,
    start_detection,
)
from meterflow.stream.detection.reload import RegistryWatcher
from meterflow.stream.failures import Verdict, classify, story
from meterflow.stream.startup import StreamPlan, check_writable, plan_start, refuse_legacy_lake

log = get_logger(__name__)
QUERY_NAME = "meterflow_speed_layer"
#: The Spark application, as a cluster's master lists it.
APP_NAME = "meterflow-streaming"
#: The running streaming job's JVM compiles with C1 only. Every micro-batch is planned and
#: its code generated again, and the C2 compiler kept re-optimising it: about 40% of the
#: JVM's CPU, on the cores the tasks need (docs/architecture.md, "Where a micro-batch's
#: time goes").
STREAM_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"


def stream_spark_conf(checkpoint_path: str, available_now: bool = False) -> dict[str, str]:
    """What a session of the streaming job is started with (spark-submit takes the JVM's
    options on its command line: docker-compose.yml's streaming-job). A catch-up's few
    large batches keep C2, which runs them faster."""
    java = {} if available_now else {"spark.driver.extraJavaOptions": STREAM_JAVA_OPTIONS}
    return {**java, **checkpoint_conf(checkpoint_path)}


#: Spark's lines that tell a user of the stream nothing to act on, or repeat what the
#: supervisor says itself in one line.
QUIET_SPARK_LOGGERS = {
    # "Current batch is falling behind" while the first batches start Spark's workers;
    # each batch's own line has its seconds.
    "org.apache.spark.sql.execution.streaming.runtime.ProcessingTimeExecutor": "ERROR",
    # "Failed to cancel job group ...": stopping a query between batches cancels its job
    # group, which has no job then, twice.
    "org.apache.spark.scheduler.DAGScheduler": "ERROR",
    # "No more data to read from the socket": the detector's state server as a batch ends.
    "org.apache.spark.sql.execution.python.streaming.TransformWithStateInPySparkStateServer": (
        "ERROR"
    ),
    # "Query ... terminated with error" and its trace: the supervisor decides on every
    # failure and says it in one line, or logs the whole story of a bug.
    "org.apache.spark.sql.execution.streaming.runtime.MicroBatchExecution": "OFF",
}


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
    ``on_committer`` sees each start's committer (``meterflow run`` drains with it).
    ``on_signal`` handles Ctrl-C and SIGTERM; it is installed once the Spark session exists
    (PySpark puts its own SIGINT handler in place when it starts), and removed at the end.
    """
    check_writable(settings)
    refuse_legacy_lake(settings.lake_path)
    spark = spark or get_spark(
        APP_NAME,
        settings.spark_master,
        **stream_spark_conf(settings.checkpoint_path, available_now),
    )
    with signals_handled(on_signal) if on_signal else contextlib.nullcontext():
        set_log_levels(spark, QUIET_SPARK_LOGGERS)
        supervisor = Supervisor(
            settings,
            spark,
            kafka_format(spark, settings.kafka_source),
            available_now=available_now,
            accept_data_loss=accept_data_loss,
            publish=publish,
            stop=stop or threading.Event(),
            on_committer=on_committer,
        )
        return supervisor.run()


@dataclass
class _Start:
    """One start of the queries: what committed, and the failure it ended with, if any."""

    committer: LakeCommitter | None = None
    publisher: EpisodePublisher | None = None
    error: BaseException | None = None
    #: What the detectors before a reload of the registry published.
    earlier: Counter[str] = field(default_factory=Counter)

    @property
    def totals(self) -> Counter[str]:
        totals: Counter[str] = Counter(self.earlier)
        for part in (self.committer, self.publisher):
            if part is not None:
                totals.update(part.totals)
        return totals

    @property
    def progressed(self) -> bool:
        return self.committer is not None and self.committer.batches > 0


@dataclass
class Supervisor:
    """Starts the queries, waits for them, and decides what each failure means."""

    settings: Settings
    spark: SparkSession
    source_format: str
    available_now: bool = False
    accept_data_loss: bool = False
    publish: bool = True
    stop: threading.Event = field(default_factory=threading.Event)
    on_committer: Callable[[LakeCommitter], None] | None = None

    def run(self) -> dict[str, int]:
        """Start, wait, decide, until stopped, caught up or a failure ends the run."""
        totals: Counter[str] = Counter()
        backoff = Backoff.until(self.stop, retries=self.settings.stream_retries)
        started = time.monotonic()
        while True:
            start = self._start_once()
            totals.update(start.totals)
            if start.error is None:
                break
            failure = classify(start.error)
            if failure.verdict is Verdict.RESTART or self._generation_changed(start):
                log.warning("streaming=restart reason=generation-changed detail=%s", failure.line)
                backoff.reset()
                continue
            if failure.verdict is Verdict.STOP:
                raise failure.error  # a decision or a bad configuration: its own one line
            if failure.verdict is Verdict.FAIL:
                log.error("streaming=failed error=%s", story(start.error))  # whole, once
                raise MeterflowError(
                    f"the stream failed: {failure.line} (details in the log above); the "
                    "next start resumes where the lake's ledger ends"
                )
            if start.progressed:
                backoff.reset()  # it made progress: a new outage starts a new count
            if not self._back_off(backoff, failure.line):
                break
        return self._stopped(totals, time.monotonic() - started)

    def _start_once(self) -> _Start:
        """Plan, start the queries and wait until they end (or ``stop``)."""
        ledger = Ledger.load(self.settings.lake_path)
        ledger.recover()
        try:
            plan = plan_start(self.settings, ledger, self.accept_data_loss)
        except kafka.KafkaUnavailableError as exc:
            return _Start(error=exc)
        committer = LakeCommitter(
            self.settings, ledger, plan.generation, self.accept_data_loss, self.publish
        )
        if self.on_committer is not None:
            self.on_committer(committer)
        self._log_start(plan, ledger.seq)
        # A start says the stream is alive: the daily DAG waits for it (docs/architecture.md).
        lake_path = self.settings.lake_path
        with lake.full_as_error("LAKE_PATH", lake_path):
            lake.watermark_started(lake_path, self.settings.topic_readings, plan.generation)
        query = start_query(
            self.spark, self.settings, self.source_format, plan, committer, self.available_now
        )
        start = _Start(committer)
        queries = [query]
        try:
            every: Callable[[], None] | None = None
            if self.settings.detection_on and not self.available_now:  # live: side by side
                watcher, profiles = RegistryWatcher.start(
                    self.settings.registry_path, self.settings.detection
                )
                start.publisher, detector = self._start_detector(profiles)
                queries.append(detector)
                every = functools.partial(self._follow_registry, watcher, start, queries)
            await_queries(queries, self.stop, every)
            if self.settings.detection_on and self.available_now and _ended_well(query, committer):
                # A catch-up: the digests are all published once the lake query is done.
                profiles = load_profiles(self.settings.registry_path, self.settings.detection)
                start.publisher, detector = self._start_detector(profiles)
                queries.append(detector)
                await_queries([detector], self.stop)
        except kafka.KafkaUnavailableError as exc:  # the digest topic's id, before any query
            start.error = exc
        finally:
            for function in (committer, start.publisher):
                if function is not None:
                    function.stopping = True  # what fails from now on was cut short
            stopped = stop_queries(queries, self.stop.is_set())

        def failure_of(query: StreamingQuery) -> BaseException | None:
            """A query stopped here ends as the stop left it: no failure of its own."""
            return None if id(query) in stopped else query.exception()

        start.error = (
            committer.failure
            or failure_of(query)
            or start.error
            or (start.publisher.failure if start.publisher is not None else None)
            or (failure_of(queries[1]) if len(queries) > 1 else None)
        )
        return start

    def _log_start(self, plan: StreamPlan, ledger_seq: int) -> None:
        settings = self.settings
        log.info(
            "streaming source=%s bootstrap=%s topic=%s generation=%s lake=%s start=%s "
            "trigger=%s ledger_seq=%d",
            self.source_format,
            settings.bootstrap_servers,
            settings.topic_readings,
            plan.generation,
            settings.lake_path,
            plan.starting_offsets,
            "availableNow" if self.available_now else f"{settings.trigger_seconds:g}s",
            ledger_seq,
        )

    def _follow_registry(
        self, watcher: RegistryWatcher, start: _Start, queries: list[StreamingQuery]
    ) -> None:
        """A changed registry that loads restarts the detection query alone with its
        profiles, between two of its batches; the lake query runs on."""
        profiles = watcher.reload()
        if profiles is None or start.publisher is None:
            return
        start.publisher.stopping = True
        if id(queries[1]) not in stop_queries([queries[1]], signalled=False):
            return  # it had ended already: the start ends with it, as without a reload
        start.earlier.update(start.publisher.totals)
        start.publisher, queries[1] = self._start_detector(profiles)

    def _start_detector(
        self, profiles: dict[str, MeterProfile]
    ) -> tuple[EpisodePublisher, StreamingQuery]:
        """The stateful stage's query (:mod:`meterflow.stream.detection.query`) and its publisher.

        A catch-up (``available_now``) runs in event time whatever ``METERFLOW_DETECTION_TIME``
        says: processing-time timers are always pending, so Spark would never call it done.
        """
        settings = self.settings
        clock = "event" if self.available_now else settings.detection_time
        plan = plan_detection(
            settings.kafka, settings.topic_digest, settings.checkpoint_path, clock
        )
        publisher = EpisodePublisher(settings.kafka, settings.topic_abnormal)
        log.info(
            "detector source=%s topic=%s generation=%s clock=%s checkpoint=%s",
            self.source_format,
            settings.topic_digest,
            plan.generation,
            clock,
            plan.checkpoint,
        )
        spec = DetectorSpec(
            source_format=self.source_format,
            kafka=settings.kafka,
            digest_topic=settings.topic_digest,
            plan=plan,
            clock=clock,
            rules=settings.detection,
            profiles=profiles,
            default_interval_s=settings.reading_interval_seconds,
            trigger_seconds=settings.trigger_seconds,
            zone_name=settings.timezone,
            available_now=self.available_now,
        )
        query = start_detection(self.spark, spec, publisher)
        return publisher, query

    def _generation_changed(self, start: _Start) -> bool:
        """Whether the readings topic now has another id (recreated under the query)."""
        if start.committer is None:
            return False
        topic = self.settings.topic_readings
        try:
            ids = kafka.topic_ids(self.settings.kafka, [topic], timeout=5)
        except kafka.KafkaUnavailableError:
            return False
        return ids[topic] != start.committer.generation

    def _back_off(self, backoff: Backoff, reason: str) -> bool:
        """Wait before the next start (False: stopped meanwhile); raise once the retries
        are spent. A broker that came back empty gets its topics again before the start."""
        settings = self.settings
        if not backoff.failed():
            retries = settings.stream_retries
            raise StreamUnavailableError(
                f"Kafka at {settings.bootstrap_servers} still unavailable after {retries} "
                f"{'retry' if retries == 1 else 'retries'} ({reason}); check the "
                "broker, then start the stream again: it resumes where the lake's ledger ends"
            )
        log.warning(
            "streaming=retry attempt=%d of=%d retry_in_s=%.0f error=%s",
            backoff.attempt,
            settings.stream_retries,
            backoff.delay,
            reason,
        )
        if not backoff.wait():
            return False
        with contextlib.suppress(kafka.KafkaUnavailableError):
            kafka.check_reachable(settings.kafka, timeout=5)
            kafka.ensure_topics(settings.kafka, settings.topics, settings.partitions)
        return True

    def _stopped(self, totals: Counter[str], seconds: float) -> dict[str, int]:
        """The run's totals as :func:`run` returns them, logged once."""
        result = {name: totals[name] for name in ("read", "valid", "abnormal", "deadletter")}
        result.update(skipped=totals["skipped"], lost=totals["lost"])
        result.update({n: c for n, c in totals.items() if n.startswith(("open_", "clear_"))})
        log.info(
            "streaming=stopped seconds=%.1f read=%d valid=%d abnormal=%d deadletter=%d "
            "skipped=%d lost=%d",
            seconds,
            *(result[k] for k in ("read", "valid", "abnormal", "deadletter", "skipped", "lost")),
        )
        return result


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
        .options(**source_options(settings.kafka, source_format))
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
    query = start_stream(writer, available_now, settings.trigger_seconds)
    committer.query = query
    return query


def await_queries(
    queries: list[StreamingQuery],
    stop: threading.Event,
    every: Callable[[], None] | None = None,
) -> None:
    """Wait while every query runs: until one ends or fails, or ``stop`` is set.

    ``every`` runs about once a second meanwhile (the registry's check: keep it cheap); it
    may replace a query in ``queries``."""
    while all(q.isActive for q in queries) and not stop.is_set():
        try:
            queries[0].awaitTermination(1)
        except StreamingQueryException:  # read again by the caller from query.exception()
            break
        if every is not None and all(q.isActive for q in queries) and not stop.is_set():
            every()


#: How long a stop waits for the detector query to be between two batches. Its batches
#: may run back to back (processing-time timers), so it may never be; a batch cut short is
#: run again at the next start and publishes the same event ids (docs/architecture.md).
DETECTOR_STOP_GRACE_S = 2.0


def stop_queries(queries: list[StreamingQuery], signalled: bool, grace_s: float = 60.0) -> set[int]:
    """Stop the queries still running, each between two of its micro-batches if it can:
    the lake query's batch commits first if it ends within ``grace_s`` (one still running
    then is cancelled, and redone at the next start), the detector's within
    :data:`DETECTOR_STOP_GRACE_S`. The ``id`` of each query stopped."""
    if signalled and any(q.isActive for q in queries):
        log.info("streaming=stopping reason=signal")
    stopped = set()
    for query in queries:
        grace = grace_s if query.name == QUERY_NAME else min(grace_s, DETECTOR_STOP_GRACE_S)
        deadline = time.monotonic() + grace
        while query.isActive and query.status["isTriggerActive"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if query.isActive:
            query.stop()
            stopped.add(id(query))
    return stopped


def _ended_well(query: StreamingQuery, committer: LakeCommitter) -> bool:
    return not query.isActive and committer.failure is None and query.exception() is None
