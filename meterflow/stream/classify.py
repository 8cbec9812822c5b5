"""Classify Kafka records in Arrow batches: the per-record work of the streaming job.

The Spark job's tasks run :func:`classify_batch` (see :mod:`meterflow.stream.tasks`); the
pure-Python baseline benchmark runs the same function in a consumer loop, so both apply
identical rules.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meterflow.core import classifier, contract, messages
from meterflow.core.classifier import Reading
from meterflow.core.contract import METER_SPECS, FaultCode, MeterType, Status
from meterflow.core.events import abnormal_event, meter_status_update
from meterflow.core.lake import CLASSIFIED_SCHEMA, TIMESTAMP
from meterflow.core.messages import DeadLetterMessage
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import UTC_NAME, reading_days


@dataclass
class BatchResult:
    """A classified batch plus what must be published for it."""

    classified: pa.RecordBatch
    abnormal_events: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, JSON)
    dead_letters: list[DeadLetterMessage] = field(default_factory=list)


_TYPE_NAMES = np.array([str(t) for t in contract.TYPE_ORDER], dtype=object)
_UNIT_NAMES = np.array([METER_SPECS[t].unit for t in contract.TYPE_ORDER], dtype=object)
_FAULT_NAMES = np.array([None, *(str(f) for f in contract.STATELESS_FAULTS)], dtype=object)
_STATUS_NAMES = np.array([str(s) for s in contract.STATUS_ORDER], dtype=object)
_DEADLETTER = contract.STATUS_ORDER.index(Status.DEADLETTER)


def classify_batch(
    batch: pa.RecordBatch,
    rules: Rules,
    generation: str = "",
    now_us: int | None = None,
    zone_name: str = UTC_NAME,
) -> BatchResult:
    """Classify a batch with the Kafka source schema (key, value, topic, partition, ...).

    ``generation`` is the source topic's id (see :func:`meterflow.core.events.event_id`).
    Each reading's ``date`` is the local day (in ``zone_name``) its interval starts in
    (:func:`~meterflow.core.timestamps.reading_days`).

    The future-timestamp rule compares against each record's Kafka timestamp (so a replay
    classifies identically) and falls back to ``now_us`` when a record has none.
    """
    now_us = int(time.time() * 1_000_000) if now_us is None else now_us
    values = batch.column("value").to_pylist()
    kafka_ts = batch.column("timestamp")
    ingest_us = kafka_ts.cast(pa.int64()).fill_null(now_us).to_numpy()
    result = classifier.classify(values, ingest_us, rules)

    dead = result.status == _DEADLETTER
    fault = result.fault_index
    # A timestamp from the future says nothing about the day: file it under ingestion.
    future = fault == contract.STATELESS_FAULTS.index(FaultCode.FUTURE_TIMESTAMP) + 1
    day = reading_days(np.where(future, ingest_us, result.event_time_us), zone_name)
    count = batch.num_rows
    reasons = [result.reasons.get(i) for i in range(count)] if result.reasons else [None] * count
    columns = {
        "device_id": pa.array(result.device_id, pa.string()),
        "meter_type": pa.array(_TYPE_NAMES[result.type_index], pa.string(), mask=dead),
        "event_time": pa.array(result.event_time_us, TIMESTAMP, mask=dead),
        "consumption": pa.array(result.consumption, pa.float64(), from_pandas=True),
        "unit": pa.array(_UNIT_NAMES[result.type_index], pa.string(), mask=dead),
        "flow_rate": pa.array(result.flow_rate, pa.float64(), from_pandas=True),
        "register": pa.array(result.register, pa.float64(), from_pandas=True),
        "fault_code": pa.array(_FAULT_NAMES[fault], pa.string()),
        "reason": pa.array(reasons, pa.string()),
        "status": pa.array(_STATUS_NAMES[result.status], pa.string()),
        "source_topic": batch.column("topic"),
        "source_partition": batch.column("partition"),
        "source_offset": batch.column("offset"),
        "source_generation": pa.repeat(pa.scalar(generation, pa.string()), count),
        "ingest_time": kafka_ts,
        "date": pa.array(day.astype(np.int32), pa.int32(), mask=dead).cast(pa.date32()),
    }
    out = BatchResult(pa.RecordBatch.from_pydict(columns, schema=CLASSIFIED_SCHEMA))

    if not result.reasons:
        return out
    topics = batch.column("topic").to_pylist()
    partitions = batch.column("partition").to_pylist()
    offsets = batch.column("offset").to_pylist()
    keys = batch.column("key").to_pylist()
    for i in sorted(result.reasons):
        if i in result.dead_letters:
            out.dead_letters.append(
                DeadLetterMessage(
                    key=keys[i],
                    value=values[i],
                    reason=str(result.dead_letters[i]),
                    detail=result.reasons[i],
                    topic=topics[i],
                    partition=partitions[i],
                    offset=offsets[i],
                    generation=generation,
                )
            )
            continue
        device_id = result.device_id[i]
        assert device_id is not None  # only a dead letter has none
        reading = Reading(
            device_id,
            result.meter_type(i),
            int(result.event_time_us[i]),
            None,
            None,
            None,
            result.fault_code(i),
            result.reasons[i],
            json.loads(values[i]),
        )
        event = abnormal_event(reading, topics[i], generation, partitions[i], offsets[i], now_us)
        out.abnormal_events.append((reading.device_id.encode(), messages.encode(event)))
    return out


#: Columns of the classified rows that per-meter status updates are made from.
STATUS_COLUMNS = (
    "device_id",
    "meter_type",
    "event_time",
    "ingest_time",
    "consumption",
    "fault_code",
)
#: ... and the digests for the stateful stage: a water meter's flow tells a physical flow
#: from a frozen register (meterflow.stream.detection.rules).
DIGEST_COLUMNS = (*STATUS_COLUMNS, "flow_rate")


def status_updates(classified: pa.Table) -> list[tuple[bytes, bytes]]:
    """One ``iot-meter-status`` message per meter in ``classified`` (key, JSON value).

    Readings are ordered per meter by event time clamped to ingestion time, so a reading
    stamped a century ahead (FUTURE_TIMESTAMP) cannot freeze a meter's status until then.
    """
    rows = classified.select(list(STATUS_COLUMNS)).filter(pc.is_valid(classified["event_time"]))
    if rows.num_rows == 0:
        return []
    event_us = rows["event_time"].cast(pa.int64()).to_numpy()
    ingest_us = rows["ingest_time"].cast(pa.int64()).fill_null(event_us.max()).to_numpy()
    seen_us = np.minimum(event_us, ingest_us)
    encoded = pc.dictionary_encode(rows["device_id"]).combine_chunks()
    device_index = encoded.indices.to_numpy()
    order = np.lexsort((seen_us, device_index))
    device_index, seen_us = device_index[order], seen_us[order]
    faulty = rows["fault_code"].is_valid().to_numpy(zero_copy_only=False)[order]
    starts = np.flatnonzero(np.r_[True, device_index[1:] != device_index[:-1]])
    ends = np.r_[starts[1:], len(order)]
    lasts = ends - 1
    positions = np.arange(len(order))
    last_good = np.maximum.reduceat(np.where(faulty, -1, positions), starts)
    trailing = lasts - np.maximum(last_good, starts - 1)
    faults = np.add.reduceat(faulty.astype(np.int64), starts)
    source_rows = order[lasts]
    names = encoded.dictionary.to_pylist()
    types = rows["meter_type"].take(source_rows).to_pylist()
    values = rows["consumption"].take(source_rows).to_pylist()
    codes = rows["fault_code"].take(source_rows).to_pylist()
    updates = []
    for i, device in enumerate(device_index[lasts].tolist()):
        value = values[i]
        update = meter_status_update(
            names[device],
            types[i],
            int(seen_us[lasts[i]]),
            None if value is None or math.isnan(value) else value,  # NaN: metric missing
            codes[i],
            int(ends[i] - starts[i]),
            int(faults[i]),
            int(trailing[i]),
        )
        updates.append((names[device].encode(), messages.encode(update)))
    return updates


_WATER = str(MeterType.WATER)


def reading_digests(classified: pa.Table) -> list[tuple[bytes, bytes]]:
    """One :class:`~meterflow.core.messages.ReadingDigest` per meter in ``classified``.

    Readings in event-time order; dead letters and FUTURE_TIMESTAMP readings left out.
    """
    future = str(FaultCode.FUTURE_TIMESTAMP)
    keep = pc.and_(
        pc.is_valid(classified["event_time"]),
        pc.invert(pc.fill_null(pc.equal(classified["fault_code"], future), False)),
    )
    rows = classified.select(list(DIGEST_COLUMNS)).filter(keep)
    if rows.num_rows == 0:
        return []
    encoded = pc.dictionary_encode(rows["device_id"]).combine_chunks()
    device_index = encoded.indices.to_numpy()
    event_us = rows["event_time"].cast(pa.int64()).to_numpy()
    order = np.lexsort((event_us, device_index))
    device_index = device_index[order]
    events = event_us[order].tolist()
    # A missing value is NaN here; JSON has no NaN, and msgspec writes it as null.
    values = rows["consumption"].to_numpy(zero_copy_only=False)[order].tolist()
    faulty = rows["fault_code"].is_valid().to_numpy(zero_copy_only=False)[order].tolist()
    flow_rate = rows["flow_rate"].to_numpy(zero_copy_only=False)[order]
    names = encoded.dictionary.to_pylist()
    starts = np.flatnonzero(np.r_[True, device_index[1:] != device_index[:-1]])
    ends = np.r_[starts[1:], len(order)]
    # Each meter's type as its latest reading names it: only those rows become strings.
    types = rows["meter_type"].take(pa.array(order[ends - 1])).to_pylist()
    digests = []
    for start, end, kind in zip(starts.tolist(), ends.tolist(), types, strict=True):
        name = names[device_index[start]]
        flows = flow_rate[start:end]
        digest = messages.ReadingDigest(
            device_id=name,
            meter_type=kind,
            event_us=events[start:end],
            values=values[start:end],
            faulty=faulty[start:end],
            # Water's flow tells a steady flow from a frozen register (detection.rules).
            flows=flows.tolist() if kind == _WATER and not np.isnan(flows).all() else None,
        )
        digests.append((name.encode(), messages.encode(digest)))
    return digests
