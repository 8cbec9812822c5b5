"""A PySpark Python data source for Kafka with the JVM connector's schema and options.

``spark.readStream.format("meterflow_kafka")`` reads like ``format("kafka")``: same columns
(key, value, topic, partition, offset, timestamp, timestampType) and the options
``kafka.bootstrap.servers``, ``subscribe``, ``startingOffsets``, ``maxOffsetsPerTrigger``,
``minPartitions`` and ``failOnDataLoss``; other ``kafka.*`` options go to the consumer. The
offsets (``{"topic": {"partition": next_offset}}``) live in Spark's checkpoint, so a
restarted query resumes exactly where it stopped. ``read()`` yields Arrow record batches.

It exists because the JVM connector is a Maven artifact that CI cannot download; where
its jar is present, the job can use it instead (``METERFLOW_KAFKA_SOURCE``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from pyspark.sql.datasource import (
    DataSource,
    DataSourceReader,
    DataSourceStreamReader,
    InputPartition,
)
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import StructType

from meterflow.clients import kafka
from meterflow.core.errors import DataLossError
from meterflow.core.logs import ensure_logging

SOURCE_NAME = "meterflow_kafka"
#: The JVM connector's schema, column for column.
KAFKA_SCHEMA_DDL = (
    "key BINARY, value BINARY, topic STRING, partition INT, offset BIGINT, "
    "timestamp TIMESTAMP, timestampType INT"
)
_ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("timestampType", pa.int32()),
    ]
)
_UNSUPPORTED = (
    "assign",
    "subscribepattern",
    "endingoffsetsbytimestamp",
    "startingoffsetsbytimestamp",
)

Offsets = dict[str, dict[str, int]]  # {"topic": {"partition": next offset to read}}


class KafkaSourceError(ValueError):
    """Bad options; the message names the option. Offsets gone from the broker are a
    :class:`~meterflow.core.errors.DataLossError`, Kafka away a
    :class:`~meterflow.clients.kafka.KafkaUnavailableError`: callers decide by type."""


@dataclass(frozen=True)
class KafkaInputPartition(InputPartition):
    """Offsets ``[start, end)`` of one Kafka partition, read by one Spark task."""

    topic: str
    partition: int
    start: int
    end: int


@dataclass(frozen=True)
class _Options:
    bootstrap: str
    topics: tuple[str, ...]
    starting: str
    ending: str
    max_offsets: int | None
    min_partitions: int
    fail_on_data_loss: bool
    consumer_config: dict[str, str]
    poll_timeout_s: float

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> _Options:
        opts = {k.lower(): v for k, v in options.items()}
        for name in _UNSUPPORTED:
            if name in opts:
                raise KafkaSourceError(
                    f"option {name!r} is not supported by {SOURCE_NAME}; use subscribe"
                )
        bootstrap = opts.get("kafka.bootstrap.servers", "").strip()
        if not bootstrap:
            raise KafkaSourceError("option 'kafka.bootstrap.servers' is required")
        topics = tuple(t.strip() for t in opts.get("subscribe", "").split(",") if t.strip())
        if not topics:
            raise KafkaSourceError("option 'subscribe' (comma-separated topics) is required")
        consumer_config = {
            key[len("kafka.") :]: value
            for key, value in options.items()
            if key.lower().startswith("kafka.") and key.lower() != "kafka.bootstrap.servers"
        }
        try:
            max_offsets = (
                int(opts["maxoffsetspertrigger"]) if "maxoffsetspertrigger" in opts else None
            )
            min_partitions = int(opts.get("minpartitions", "0"))
            poll_timeout_s = float(opts.get("polltimeoutms", "120000")) / 1000
        except ValueError as exc:
            raise KafkaSourceError(f"numeric option is malformed: {exc}") from None
        if max_offsets is not None and max_offsets <= 0:
            raise KafkaSourceError("option 'maxOffsetsPerTrigger' must be positive")
        return cls(
            bootstrap=bootstrap,
            topics=topics,
            starting=opts.get("startingoffsets", "latest").strip(),
            ending=opts.get("endingoffsets", "latest").strip(),
            max_offsets=max_offsets,
            min_partitions=min_partitions,
            fail_on_data_loss=opts.get("failondataloss", "true").lower() != "false",
            consumer_config=consumer_config,
            poll_timeout_s=poll_timeout_s,
        )


class KafkaDataSource(DataSource):
    """Register with ``spark.dataSource.register(KafkaDataSource)``."""

    @classmethod
    def name(cls) -> str:
        return SOURCE_NAME

    def schema(self) -> str:
        return KAFKA_SCHEMA_DDL

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return KafkaStreamReader(_Options.parse(self.options))

    def reader(self, schema: StructType) -> DataSourceReader:
        return KafkaBatchReader(_Options.parse(self.options))


class _Planner:
    """Driver-side offset planning shared by the batch and the streaming reader."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self._client: Consumer | None = None
        self._known_ends: dict[tuple[str, int], int] = {}
        self._lows: dict[tuple[str, int], int] = {}

    def __getstate__(self) -> dict[str, Any]:  # the consumer never leaves the driver
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Consumer:
        if self._client is None:
            self._client = kafka.consumer(self.options.bootstrap, **self.options.consumer_config)
        return self._client

    def partitions(self) -> list[tuple[str, int]]:
        return kafka.topic_partitions(self.client, self.options.topics)

    def ends(self, exact: bool = True) -> Offsets:
        found = kafka.partition_ends(
            self.client, self.partitions(), self._known_ends, lows=self._lows, exact=exact
        )
        self._known_ends = found
        return _to_offsets(found)

    def earliest(self) -> Offsets:
        result: Offsets = {}
        for topic, partition in self.partitions():
            with kafka.unavailable_as_error(f"reading the first offset of {topic}[{partition}]"):
                low, _ = self.client.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
            result.setdefault(topic, {})[str(partition)] = low
        return result

    def resolve(self, spec: str) -> Offsets:
        """``earliest``, ``latest`` or a JSON object of offsets (-2 earliest, -1 latest)."""
        if spec == "earliest":
            return self.earliest()
        if spec == "latest":
            return self.ends()
        try:
            given = json.loads(spec)
        except ValueError:
            raise KafkaSourceError(f"offsets {spec!r} are not earliest, latest or JSON") from None
        earliest, latest = self.earliest(), self.ends()
        result: Offsets = {}
        for topic, parts in latest.items():
            for partition, end in parts.items():
                wanted = given.get(topic, {}).get(partition, -2)
                base = (
                    earliest[topic][partition] if wanted == -2 else end if wanted == -1 else wanted
                )
                result.setdefault(topic, {})[partition] = base
        return result

    def skip_deleted(self, start: Offsets, end: Offsets) -> Offsets:
        """``start`` checked against the offsets the broker still holds.

        With ``failOnDataLoss`` (the default) offsets deleted before they were read stop the
        query with one line naming them; without it the range starts at the first offset
        still there, and the gap is for the reader to record (the streaming job's ledger).
        """
        if not self._lows:
            self.ends()
        result: Offsets = {}
        for topic, parts in end.items():
            for p, _stop in parts.items():
                first = start.get(topic, {}).get(p, 0)
                low = self._lows.get((topic, int(p)), 0)
                if first < low:
                    if self.options.fail_on_data_loss:
                        raise DataLossError(
                            f"{topic}[{p}] offsets {first}..{low - 1} were deleted "
                            "from the broker before they were read"
                        )
                    first = low
                result.setdefault(topic, {})[p] = first
        return result

    def split(self, start: Offsets, end: Offsets) -> list[KafkaInputPartition]:
        """One task per partition range, split further to reach ``minPartitions``."""
        start = self.skip_deleted(start, end)
        ranges = [
            (topic, int(p), start.get(topic, {}).get(p, 0), stop)
            for topic, parts in end.items()
            for p, stop in parts.items()
            if stop > start.get(topic, {}).get(p, 0)
        ]
        total = sum(stop - first for _, _, first, stop in ranges)
        result: list[KafkaInputPartition] = []
        for topic, partition, first, stop in ranges:
            pieces = 1
            if self.options.min_partitions > len(ranges) and total:
                pieces = max(1, round(self.options.min_partitions * (stop - first) / total))
            bounds = np.linspace(first, stop, pieces + 1).round().astype(int)
            result.extend(
                KafkaInputPartition(topic, partition, int(a), int(b))
                for a, b in itertools.pairwise(bounds.tolist())
                if b > a
            )
        return result

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _to_offsets(ends: dict[tuple[str, int], int]) -> Offsets:
    result: Offsets = {}
    for (topic, partition), end in sorted(ends.items()):
        result.setdefault(topic, {})[str(partition)] = end
    return result


def _cap(start: Offsets, latest: Offsets, max_rows: int) -> Offsets:
    """Advance at most ``max_rows`` offsets in all, shared in proportion to each backlog."""
    backlog = {
        (t, p): max(0, end - start.get(t, {}).get(p, 0))
        for t, parts in latest.items()
        for p, end in parts.items()
    }
    total = sum(backlog.values())
    if total <= max_rows:
        return latest
    result: Offsets = {}
    granted = 0
    for (topic, partition), lag in sorted(backlog.items()):
        share = lag * max_rows // total
        granted += share
        result.setdefault(topic, {})[partition] = start.get(topic, {}).get(partition, 0) + share
    # Hand the rounding remainder to the largest backlog so progress is never zero.
    (topic, partition), _ = max(backlog.items(), key=lambda item: item[1])
    result[topic][partition] += max_rows - granted
    return result


def _check_not_behind(start: Offsets, latest: Offsets, fail: bool) -> Offsets:
    """Refuse to go on when a partition now ends before the checkpoint (topic recreated)."""
    merged: Offsets = {}
    for topic, parts in latest.items():
        for partition, end in parts.items():
            done = start.get(topic, {}).get(partition, 0)
            if end < done and fail:
                raise DataLossError(
                    f"{topic}[{partition}] ends at offset {end} but the checkpoint "
                    f"already read up to {done}: the topic was recreated or the broker lost its "
                    "data"
                )
            merged.setdefault(topic, {})[partition] = max(end, done) if fail else end
    return merged


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    def __init__(self, options: _Options) -> None:
        self.options = options
        self.planner = _Planner(options)
        self._target: Offsets | None = None  # set for Trigger.AvailableNow

    def initialOffset(self) -> Offsets:
        return self.planner.resolve(self.options.starting)

    def getDefaultReadLimit(self) -> ReadLimit:
        if self.options.max_offsets is None:
            return ReadAllAvailable()
        return ReadMaxRows(self.options.max_offsets)

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self.planner.ends()

    def latestOffset(self, start: Offsets, limit: ReadLimit) -> Offsets:
        # A running query needs no exact end (the next batch reads on from where this one
        # stops); Trigger.AvailableNow's target, all there is at its start, does.
        latest = self._target if self._target is not None else self.planner.ends(exact=False)
        merged = _check_not_behind(start, latest, self.options.fail_on_data_loss)
        if isinstance(limit, ReadMaxRows):
            return _cap(start, merged, limit.max_rows)
        return merged

    def reportLatestOffset(self) -> Offsets | None:
        return _to_offsets(self.planner._known_ends) or None

    def partitions(self, start: Offsets, end: Offsets) -> Sequence[InputPartition]:
        return self.planner.split(start, end)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        return read_range(cast(KafkaInputPartition, partition), self.options)

    def stop(self) -> None:
        self.planner.close()


class KafkaBatchReader(DataSourceReader):
    """``spark.read.format("meterflow_kafka")``: a bounded read, earliest to latest by default."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        planner = _Planner(options)
        try:
            starting = "earliest" if options.starting == "latest" else options.starting
            self._ranges = planner.split(planner.resolve(starting), planner.resolve(options.ending))
        finally:
            planner.close()

    def partitions(self) -> Sequence[InputPartition]:
        return self._ranges

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        return read_range(cast(KafkaInputPartition, partition), self.options)


def read_range(
    part: KafkaInputPartition, options: _Options, batch_size: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Yield offsets ``[start, end)`` of one partition as Arrow batches.

    Ends early only when the partition ends first (compaction, transaction markers) and
    otherwise waits up to ``pollTimeoutMs`` for data that planning saw, then fails loudly.
    """
    if part.end <= part.start:
        return
    ensure_logging()  # a Python worker: librdkafka's messages as meterflow log lines
    # An offset the broker no longer has is an error at once, not a silent jump to the end.
    client = kafka.consumer(
        options.bootstrap, **{"auto.offset.reset": "error", **options.consumer_config}
    )
    try:
        client.assign([TopicPartition(part.topic, part.partition, part.start)])
        position = part.start
        last_progress = time.monotonic()
        while position < part.end:
            # Asking for no more than the range holds returns as soon as it arrived:
            # asking for more waits out the timeout on every call, each task of each batch.
            messages = client.consume(min(batch_size, part.end - position), timeout=0.5)
            records: list[Message] = []
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    if error.code() == KafkaError._AUTO_OFFSET_RESET:
                        raise DataLossError(
                            f"{part.topic}[{part.partition}] offsets from {position} "
                            f"are gone from the broker ({error.str()})"
                        )
                    raise kafka.KafkaUnavailableError(
                        f"reading {part.topic}[{part.partition}]: {error}"
                    )
                offset = message.offset()
                assert offset is not None  # every record has one
                if offset >= part.end:
                    position = part.end
                    break
                records.append(message)
            if records:
                position = kafka.coordinates(records[-1])[2] + 1
                last_progress = time.monotonic()
                yield records_to_batch(records, part)
            elif time.monotonic() - last_progress > options.poll_timeout_s:
                detail = (
                    f"{part.topic}[{part.partition}] offsets {position}..{part.end - 1} not "
                    f"available after {options.poll_timeout_s:.0f} s "
                    "(broker restarted or data deleted?)"
                )
                if options.fail_on_data_loss:
                    raise kafka.KafkaUnavailableError(detail)
                return
    finally:
        client.close()


def records_to_batch(records: list[Message], part: KafkaInputPartition) -> pa.RecordBatch:
    """confluent-kafka messages of one partition as an Arrow batch in the source schema."""
    count = len(records)
    stamps = np.array([m.timestamp() for m in records], dtype=np.int64).reshape(count, 2)
    # confluent-kafka types: 0 none, 1 create, 2 log-append; the JVM connector: -1, 0, 1.
    kinds = stamps[:, 0] - 1
    micros = stamps[:, 1] * 1000
    return pa.RecordBatch.from_arrays(
        [
            pa.array([m.key() for m in records], pa.binary()),
            pa.array([m.value() for m in records], pa.binary()),
            pa.array([part.topic] * count, pa.string()),
            pa.array(np.full(count, part.partition, dtype=np.int32)),
            pa.array([m.offset() for m in records], pa.int64()),
            pa.array(micros, _ARROW_SCHEMA.field("timestamp").type, mask=kinds < 0),
            pa.array(kinds.astype(np.int32)),
        ],
        schema=_ARROW_SCHEMA,
    )
