"""What one Spark task of the streaming job does with its slice of Kafka offsets.

For each Arrow batch the source yields, a task drops the offsets the lake's ledger already
holds, classifies the rest (:func:`meterflow.stream.classify.classify_batch`), publishes abnormal
events and dead letters, and appends readings and dead letters to Parquet files in the
micro-batch's staging directory. When its input ends it publishes one status update per
meter, waits until Kafka acknowledged everything, closes its files and yields one summary
row per Kafka partition: the offsets it saw and what they became. The driver commits those
summaries to the ledger (:mod:`meterflow.core.ledger`); nothing a task writes is visible before.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from confluent_kafka import KafkaException

from meterflow.clients import kafka
from meterflow.core import timestamps
from meterflow.core.contract import FaultCode, Status
from meterflow.core.lake import (
    DEADLETTER,
    DEADLETTER_SCHEMA,
    LAKE_COLUMNS,
    PARTITION_COLUMN,
    READINGS,
    filesystem_for,
    is_full,
    os_reason,
)
from meterflow.core.logs import ensure_logging, get_logger
from meterflow.core.messages import DeadLetterMessage
from meterflow.core.thresholds import Rules
from meterflow.stream.classify import (
    DIGEST_COLUMNS,
    BatchResult,
    classify_batch,
    reading_digests,
)
from meterflow.stream.classify import status_updates as make_status_updates

log = get_logger(__name__)

#: What each task returns to the driver, one row per Kafka partition it read.
SUMMARY_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("first", pa.int64()),  # first offset not already in the ledger (-1: none)
        ("last", pa.int64()),
        ("valid", pa.int64()),
        ("abnormal", pa.int64()),
        ("deadletter", pa.int64()),
        ("skipped", pa.int64()),  # offsets the ledger already had
        ("unpublished", pa.int64()),  # events Kafka refused for good (kept in the lake)
        ("max_event_us", pa.int64()),
        ("files", pa.string()),  # JSON list of lake paths, on the task's first row
        # Why the task could not write the lake, its disk being full (its only row then).
        ("lake_full", pa.string()),
    ]
)
#: librdkafka's default ``message.max.bytes``; a dead letter that would not fit is kept in
#: the lake and referenced from ``iot-deadletter`` instead.
PRODUCER_MAX_BYTES = 1_000_000
_HEADROOM = 16_384  # key, headers and record overhead

_STATUS = {s: str(s) for s in Status}
_FUTURE = str(FaultCode.FUTURE_TIMESTAMP)
_READING_COLUMNS = [name for name in LAKE_COLUMNS if name != PARTITION_COLUMN]


@dataclass(frozen=True)
class EventTopics:
    """Where the tasks publish; ``None`` in tests that only look at the lake."""

    #: The cluster (pickled to the tasks with its security: every worker's producer logs in).
    bootstrap: kafka.Cluster
    abnormal: str
    deadletter: str
    status: str
    #: Per-meter reading digests for the stateful stage; empty when detection is off.
    digest: str = ""


@dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs, fixed by the driver for one micro-batch (pickled to tasks)."""

    lake_path: str
    staging: str  # relative to the lake root: _staging/<token>
    generation: str
    rules: Rules
    #: The IANA zone whose local dates partition the lake (METERFLOW_TIMEZONE).
    timezone: str
    #: (topic, partition) -> offset ranges [start, end) the ledger already holds.
    committed: dict[tuple[str, int], tuple[tuple[int, int], ...]] = field(default_factory=dict)
    topics: EventTopics | None = None


_producers: dict[kafka.Cluster, Any] = {}  # one per Python worker process, reused across tasks


class _Publisher:
    """Publishes a task's events; a retriable failure fails the task (the batch is redone).

    Kafka refusing one message for good (it is too large, say) is not retriable: the
    message is counted as unpublished and stays in the lake, so the stream goes on.
    """

    def __init__(self, topics: EventTopics) -> None:
        self.topics = topics
        if topics.bootstrap not in _producers:
            _producers[topics.bootstrap] = kafka.producer(
                topics.bootstrap, **{"message.max.bytes": PRODUCER_MAX_BYTES}
            )
        self.producer = _producers[topics.bootstrap]
        self.retriable: list[str] = []
        self.unpublished = 0
        self.seen: list[pa.RecordBatch] = []

    def _delivered(self, error: Any, message: Any) -> None:
        if error is None:
            return
        if error.retriable() or error.code() in kafka.TRANSIENT_ERRORS:
            self.retriable.append(f"{message.topic()}: {error}")
            return
        self.unpublished += 1
        log.error(
            "publish=refused topic=%s key=%r error=%s (the message stays in the lake)",
            message.topic(),
            message.key(),
            error,
        )

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        try:
            kafka.produce(
                self.producer, topic, value, key, headers=headers, on_delivery=self._delivered
            )
        except KafkaException as exc:  # refused before sending: too large, say
            self.unpublished += 1
            log.error("publish=refused topic=%s key=%r error=%s", topic, key, exc.args[0])

    def publish(self, result: BatchResult, references: dict[int, bytes]) -> None:
        for key, value in result.abnormal_events:
            self._produce(self.topics.abnormal, key, value)
        for letter in result.dead_letters:
            reference = references.get(letter.offset)
            if reference is None:
                self._produce(self.topics.deadletter, letter.key, letter.value, letter.headers())
            else:
                stored = msgspec.structs.replace(letter, stored="lake")
                self._produce(self.topics.deadletter, letter.key, reference, stored.headers())
        self.seen.append(result.classified.select(list(DIGEST_COLUMNS)))
        self.producer.poll(0)

    def finish(self) -> None:
        if self.seen:
            seen = pa.Table.from_batches(self.seen)
            for key, value in make_status_updates(seen):
                self._produce(self.topics.status, key, value)
            if self.topics.digest:
                for key, value in reading_digests(seen):
                    self._produce(self.topics.digest, key, value)
            self.seen.clear()
        remaining = self.producer.flush(120)
        if remaining or self.retriable:
            raise kafka.KafkaUnavailableError(
                f"{remaining} events undelivered, {len(self.retriable)} failed "
                f"(first: {self.retriable[:1]}); the batch will be retried"
            )


class _StagedFiles:
    """One Parquet file per dataset and day, written in the batch's staging directory."""

    def __init__(self, plan: TaskPlan) -> None:
        self.fs, root = filesystem_for(plan.lake_path)
        self.staging = posixpath.join(root, plan.staging)
        self.name = f"part-{uuid.uuid4().hex}.parquet"
        self.writers: dict[str, pq.ParquetWriter] = {}

    def path(self, dataset: str, day: str) -> str:
        """The file's final place, relative to the lake root."""
        return f"{dataset}/{PARTITION_COLUMN}={day}/{self.name}"

    def write(self, dataset: str, table: pa.Table) -> None:
        days = table.column(PARTITION_COLUMN)
        for day in pc.unique(days).to_pylist():
            part = table.filter(pc.equal(days, pa.scalar(day, days.type)))
            relative = self.path(dataset, str(day))
            writer = self.writers.get(relative)
            part = part.drop_columns([PARTITION_COLUMN])
            if writer is None:
                target = posixpath.join(self.staging, relative)
                self.fs.create_dir(posixpath.dirname(target), recursive=True)
                writer = pq.ParquetWriter(target, part.schema, filesystem=self.fs)
                self.writers[relative] = writer
            writer.write_table(part)

    def close(self) -> list[str]:
        for writer in self.writers.values():
            writer.close()
        return sorted(self.writers)

    def abandon(self) -> None:
        """Close what can be closed; the driver deletes the staging directory."""
        for writer in self.writers.values():
            with contextlib.suppress(OSError):
                writer.close()


@dataclass
class Tally:
    """What one Kafka partition's offsets became, in a task and, merged, in a batch."""

    first: int = -1
    last: int = -1
    valid: int = 0
    abnormal: int = 0
    deadletter: int = 0
    skipped: int = 0
    max_event_us: int | None = None


def _drop_committed(
    batch: pa.RecordBatch, committed: dict[tuple[str, int], tuple[tuple[int, int], ...]]
) -> tuple[pa.RecordBatch, dict[tuple[str, int], int]]:
    """The batch without offsets the ledger already holds, and how many were dropped."""
    if not committed:
        return batch, {}
    topics = batch.column("topic").to_numpy(zero_copy_only=False)
    partitions = batch.column("partition").to_numpy()
    offsets = batch.column("offset").to_numpy()
    done = np.zeros(batch.num_rows, dtype=bool)
    dropped: dict[tuple[str, int], int] = {}
    for (topic, partition), ranges in committed.items():
        mine = (partitions == partition) & (topics == topic)
        if not mine.any():
            continue
        hit = np.zeros(batch.num_rows, dtype=bool)
        for start, end in ranges:
            hit |= (offsets >= start) & (offsets < end)
        hit &= mine
        if hit.any():
            dropped[(topic, partition)] = int(hit.sum())
            done |= hit
    if not done.any():
        return batch, {}
    return batch.filter(pa.array(~done)), dropped


def _tally(result: BatchResult, tallies: dict[tuple[str, int], Tally]) -> None:
    rows = result.classified
    topics = rows.column("source_topic").to_numpy(zero_copy_only=False)
    partitions = rows.column("source_partition").to_numpy()
    offsets = rows.column("source_offset").to_numpy()
    status = rows.column("status").to_numpy(zero_copy_only=False)
    faults = rows.column("fault_code").to_numpy(zero_copy_only=False)
    event = rows.column("event_time").cast(pa.int64()).fill_null(-1).to_numpy()
    ingest = rows.column("ingest_time").cast(pa.int64()).fill_null(np.iinfo(np.int64).max)
    seen = np.where(
        (status != _STATUS[Status.DEADLETTER]) & (faults != _FUTURE),
        np.minimum(event, ingest.to_numpy()),
        -1,
    )
    for topic, partition in set(zip(topics.tolist(), partitions.tolist(), strict=True)):
        mine = (partitions == partition) & (topics == topic)
        tally = tallies.setdefault((topic, partition), Tally())
        mine_offsets = offsets[mine]
        low, high = int(mine_offsets.min()), int(mine_offsets.max())
        tally.first = low if tally.first < 0 else min(tally.first, low)
        tally.last = max(tally.last, high)
        mine_status = status[mine]
        tally.valid += int((mine_status == _STATUS[Status.VALID]).sum())
        tally.abnormal += int((mine_status == _STATUS[Status.ABNORMAL]).sum())
        tally.deadletter += int((mine_status == _STATUS[Status.DEADLETTER]).sum())
        newest = int(seen[mine].max())
        if newest >= 0:
            tally.max_event_us = max(tally.max_event_us or newest, newest)


def _dead_letter_table(result: BatchResult, now_us: int, zone_name: str) -> pa.Table:
    """The dead letters as lake rows, filed by the local day they arrived."""
    rows = result.classified
    ingest = rows.filter(pc.equal(rows.column("status"), _STATUS[Status.DEADLETTER])).column(
        "ingest_time"
    )
    ingest_us = ingest.cast(pa.int64()).fill_null(now_us).to_numpy()
    letters = result.dead_letters
    return pa.table(
        {
            "source_topic": pa.array([d.topic for d in letters], pa.string()),
            "source_partition": pa.array([d.partition for d in letters], pa.int32()),
            "source_offset": pa.array([d.offset for d in letters], pa.int64()),
            "source_generation": pa.array([d.generation for d in letters], pa.string()),
            "key": pa.array([d.key for d in letters], pa.binary()),
            "value": pa.array([d.value for d in letters], pa.binary()),
            "reason": pa.array([d.reason for d in letters], pa.string()),
            "detail": pa.array([d.detail for d in letters], pa.string()),
            "ingest_time": pa.array(ingest_us, DEADLETTER_SCHEMA.field("ingest_time").type),
            "date": pa.array(timestamps.local_days(ingest_us, zone_name), pa.int32()).cast(
                pa.date32()
            ),
        },
        schema=DEADLETTER_SCHEMA,
    )


def _references(
    letters: list[DeadLetterMessage], table: pa.Table, files: _StagedFiles
) -> dict[int, bytes]:
    """JSON references, by offset, for dead letters too large to publish as they are."""
    references: dict[int, bytes] = {}
    days = table.column(PARTITION_COLUMN).to_pylist()
    for letter, day in zip(letters, days, strict=True):
        size = len(letter.value or b"") + len(letter.key or b"")
        if size > PRODUCER_MAX_BYTES - _HEADROOM:
            references[letter.offset] = json.dumps(
                {
                    "stored": "lake",
                    "path": files.path(DEADLETTER, str(day)),
                    "bytes": size,
                    "source": {
                        "topic": letter.topic,
                        "generation": letter.generation,
                        "partition": letter.partition,
                        "offset": letter.offset,
                    },
                }
            ).encode()
    return references


def process_partition(
    batches: Iterator[pa.RecordBatch], plan: TaskPlan
) -> Iterator[pa.RecordBatch]:
    """The task body (``mapInArrow``): classify, publish, stage files, summarise.

    A full disk under the lake ends the task with one summary row that says so, rather than
    a failed task: Spark would print the writer's traceback, and the driver says it in one
    line (:class:`~meterflow.core.errors.DiskFullError`).
    """
    ensure_logging()  # a Python worker: meterflow's log lines and librdkafka's
    publisher = _Publisher(plan.topics) if plan.topics is not None else None
    files = _StagedFiles(plan)
    tallies: dict[tuple[str, int], Tally] = {}
    try:
        for raw in batches:
            _process_batch(raw, plan, files, publisher, tallies)
        if publisher is not None:
            publisher.finish()
        written = files.close()
    except OSError as exc:
        if not is_full(exc):
            raise
        files.abandon()
        full = summary_row(lake_full=os_reason(exc))  # the task's only row
        yield pa.RecordBatch.from_pylist([full], schema=SUMMARY_SCHEMA)
        return
    rows = []
    for index, ((topic, partition), t) in enumerate(sorted(tallies.items())):
        rows.append(
            summary_row(
                topic=topic,
                partition=partition,
                first=t.first,
                last=t.last,
                valid=t.valid,
                abnormal=t.abnormal,
                deadletter=t.deadletter,
                skipped=t.skipped,
                unpublished=publisher.unpublished if publisher and index == 0 else 0,
                max_event_us=t.max_event_us,
                files=json.dumps(written if index == 0 else []),
            )
        )
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _process_batch(
    raw: pa.RecordBatch,
    plan: TaskPlan,
    files: _StagedFiles,
    publisher: _Publisher | None,
    tallies: dict[tuple[str, int], Tally],
) -> None:
    """One Arrow batch of the source: drop what the ledger has, classify, stage, publish."""
    if raw.num_rows == 0:
        return
    batch, dropped = _drop_committed(raw, plan.committed)
    for key, count in dropped.items():
        tallies.setdefault(key, Tally()).skipped += count
    if batch.num_rows == 0:
        return
    result = classify_batch(batch, plan.rules, plan.generation, zone_name=plan.timezone)
    rows = pa.Table.from_batches([result.classified])
    keep = pc.not_equal(rows.column("status"), _STATUS[Status.DEADLETTER])
    files.write(READINGS, rows.filter(keep).select([*_READING_COLUMNS, PARTITION_COLUMN]))
    references: dict[int, bytes] = {}
    if result.dead_letters:
        now_us = int(np.datetime64("now", "us").astype(np.int64))
        letters = _dead_letter_table(result, now_us, plan.timezone)
        files.write(DEADLETTER, letters)
        references = _references(result.dead_letters, letters, files)
    if publisher is not None:
        publisher.publish(result, references)
    _tally(result, tallies)


def summary_row(**values: Any) -> dict[str, Any]:
    """One row of :data:`SUMMARY_SCHEMA`; the columns not given are empty."""
    return {
        "topic": "",
        "partition": -1,
        "first": -1,
        "last": -1,
        "valid": 0,
        "abnormal": 0,
        "deadletter": 0,
        "skipped": 0,
        "unpublished": 0,
        "max_event_us": None,
        "files": "[]",
        "lake_full": None,
        **values,
    }
