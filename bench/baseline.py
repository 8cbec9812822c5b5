"""The streaming benchmark's baseline: a plain confluent-kafka loop, the same rules, no Spark.

It does the speed layer's work in one Python process (consume, classify with
:func:`meterflow.stream.classify.classify_batch`, publish events and dead letters, write the lake
as Parquet partitioned by date) so the benchmark can say what Spark costs or buys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
from confluent_kafka import TopicPartition

from meterflow.clients import kafka
from meterflow.core.config import Settings
from meterflow.core.contract import Status
from meterflow.core.lake import LAKE_COLUMNS, PARTITION_COLUMN
from meterflow.spark.kafka_source import KafkaInputPartition, records_to_batch
from meterflow.stream.classify import classify_batch


@dataclass(frozen=True)
class BaselineResult:
    read: int
    valid: int
    abnormal: int
    deadletter: int


def run_baseline(settings: Settings, lake_path: str, flush_rows: int = 500_000) -> BaselineResult:
    """Consume the readings topic to its current end and process it like the streaming job."""
    client = kafka.consumer(settings.bootstrap_servers)
    producer = kafka.producer(settings.bootstrap_servers)
    counts: Counter[str] = Counter()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        partitions = kafka.topic_partitions(client, [settings.topic_readings])
        ends = kafka.partition_ends(client, partitions)
        client.assign([TopicPartition(t, p, 0) for t, p in partitions])
        remaining = {tp for tp, end in ends.items() if end > 0}
        while remaining:
            by_partition: dict[tuple[str, int], list] = {}
            for message in client.consume(10_000, timeout=1.0):
                if message.error() is not None:
                    continue
                key = (message.topic() or "", message.partition() or 0)
                offset = message.offset() or 0
                if offset < ends[key]:
                    by_partition.setdefault(key, []).append(message)
                if offset + 1 >= ends[key]:
                    remaining.discard(key)
            for (topic, partition), records in by_partition.items():
                part = KafkaInputPartition(topic, partition, 0, 0)
                result = classify_batch(
                    records_to_batch(records, part), settings.rules, zone_name=settings.timezone
                )
                for event_key, event in result.abnormal_events:
                    kafka.produce(producer, settings.topic_abnormal, event, event_key)
                for letter in result.dead_letters:
                    kafka.produce(
                        producer,
                        settings.topic_deadletter,
                        letter.value,
                        letter.key,
                        headers=letter.headers(),
                    )
                producer.poll(0)
                statuses = result.classified.column("status").to_pylist()
                counts.update(statuses)
                counts["read"] += len(statuses)
                lake = result.classified.filter(
                    pa.compute.not_equal(result.classified.column("status"), str(Status.DEADLETTER))
                ).select(list(LAKE_COLUMNS))
                pending.append(lake)
                pending_rows += lake.num_rows
            if pending_rows >= flush_rows or (not remaining and pending):
                _write(pending, lake_path)
                pending, pending_rows = [], 0
        if producer.flush(120):
            raise kafka.KafkaUnavailableError("baseline: events left undelivered")
    finally:
        client.close()
    return BaselineResult(
        counts["read"],
        counts[str(Status.VALID)],
        counts[str(Status.ABNORMAL)],
        counts[str(Status.DEADLETTER)],
    )


def _write(batches: list[pa.RecordBatch], lake_path: str) -> None:
    ds.write_dataset(
        pa.Table.from_batches(batches),
        f"{lake_path.rstrip('/')}/readings",
        format="parquet",
        partitioning=ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.date32())]), flavor="hive"),
        existing_data_behavior="overwrite_or_ignore",
        basename_template=f"part-{id(batches)}-{{i}}.parquet",
    )
