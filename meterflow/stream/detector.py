"""The stateful stage in Spark: :mod:`meterflow.stream.detect`'s rules per meter, with
``transformWithState`` on the RocksDB state store, checkpointed.

:func:`detect_faults` turns a stream of per-meter reading digests (the stream's tasks
publish one per meter and micro-batch on ``iot-meter-digest``; :func:`digest_input` decodes
them) into a stream of episode changes (:data:`CHANGE_SCHEMA`): one row each time a STUCK,
SPIKE, LEAK or NO_DATA episode opens or clears. Reading digests rather than ``iot-meter``
spares a second Kafka read and classification, and a row per meter instead of per reading
(docs/architecture.md, "Stateful detection", has the measurements). Per meter, the state is
one msgpack value (:class:`~meterflow.stream.detect.MeterState`, a few kB at most) with a
time to live, so meters that disappear do not keep state for ever, and one pending timer
for NO_DATA:

- ``EventTime`` (replays and backfills): the timer fires when the watermark passes the
  meter's deadline, so simulated days measure silence in simulated time;
- ``ProcessingTime`` (live): it fires on the clock, since a silent meter sends nothing that
  would move event time. Silence is then the clock time since the meter's latest reading
  arrived, added to that reading's event time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.streaming.stateful_processor import (
    ExpiredTimerInfo,
    StatefulProcessor,
    StatefulProcessorHandle,
    TimerValues,
)

from meterflow.core.contract import DetectionRules, MeterType
from meterflow.core.logs import get_logger
from meterflow.core.messages import ReadingDigest, UndecodableError, decode
from meterflow.stream.detect import (
    Detection,
    Meter,
    MeterState,
    Observed,
    deadline,
    decode_state,
    encode_state,
    expire,
    observe,
)

log = get_logger(__name__)

#: What the stateful stage reads: one digest of a meter's readings per row.
DIGEST_DDL = (
    "device_id string, meter_type string, event_time timestamp, event_us array<bigint>, "
    "values array<double>, faulty array<boolean>"
)
#: What it writes: one row per episode change.
CHANGE_SCHEMA = (
    "device_id string, meter_type string, fault_code string, action string, "
    "start_us long, at_us long, value double, reason string"
)
_CHANGE_COLUMNS = [
    "device_id",
    "meter_type",
    "fault_code",
    "action",
    "start_us",
    "at_us",
    "value",
    "reason",
]
EVENT_TIME = "EventTime"
PROCESSING_TIME = "ProcessingTime"
TIME_MODES = (EVENT_TIME, PROCESSING_TIME)
_STATE_SCHEMA = "state binary, arrived_ms long"
_US_PER_MS = 1_000
_DIGEST_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("meter_type", pa.string()),
        ("event_time", pa.timestamp("us", "UTC")),
        ("event_us", pa.list_(pa.int64())),
        ("values", pa.list_(pa.float64())),
        ("faulty", pa.list_(pa.bool_())),
    ]
)


def digest_input(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Kafka records of ``iot-meter-digest`` to :data:`DIGEST_DDL` rows, for ``mapInArrow``.

    ``event_time`` is the digest's latest reading (what the watermark follows). A record
    that is not a digest is logged and skipped: the stream wrote it, so it is a bug, and
    the readings are in the lake either way.
    """
    for batch in batches:
        rows: dict[str, list[Any]] = {name: [] for name in _DIGEST_SCHEMA.names}
        for raw in batch.column("value").to_pylist():
            try:
                digest = decode(raw, ReadingDigest)
            except UndecodableError as bad:
                log.error("detect=undecodable-digest reason=%s detail=%s", bad.reason, bad.detail)
                continue
            rows["device_id"].append(digest.device_id)
            rows["meter_type"].append(digest.meter_type)
            rows["event_time"].append(digest.event_us[-1])
            rows["event_us"].append(digest.event_us)
            rows["values"].append(digest.values)
            rows["faulty"].append(digest.faulty)
        yield pa.RecordBatch.from_pydict(rows, schema=_DIGEST_SCHEMA)


class MeterDetector(StatefulProcessor):
    """One meter's rules between micro-batches (keyed by ``device_id``)."""

    def __init__(
        self,
        rules: DetectionRules,
        intervals: Mapping[str, int],
        default_interval_s: int,
        time_mode: str,
        ttl_ms: int,
    ) -> None:
        if time_mode not in TIME_MODES:
            raise ValueError(f"time mode {time_mode!r} is not one of {', '.join(TIME_MODES)}")
        self.rules = rules
        self.intervals = dict(intervals)
        self.default_interval_s = default_interval_s
        self.time_mode = time_mode
        self.ttl_ms = ttl_ms

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        # Spark allows a TTL only on the clock; in event time the forget timer does its work.
        ttl = self.ttl_ms if self.time_mode == PROCESSING_TIME else None
        self.state = handle.getValueState("meter", _STATE_SCHEMA, ttl)

    def _meter(self, device_id: str, meter_type: str | None) -> Meter:
        kind = MeterType(meter_type) if meter_type else MeterType.ELECTRICITY
        interval = self.intervals.get(device_id) or self.default_interval_s
        return Meter(device_id, kind, interval, self.rules)

    def _load(self) -> tuple[MeterState, int, str | None]:
        stored = self.state.get() if self.state.exists() else None
        if stored is None:
            return MeterState(), 0, None
        raw, arrived_ms = stored
        state = decode_state(bytes(raw))
        return state, int(arrived_ms or 0), state.meter_type or None

    def handleInputRows(  # Spark's names: it passes some by keyword
        self,
        key: Any,
        rows: Iterator[pd.DataFrame],
        timerValues: TimerValues,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        device_id = str(key[0])
        state, _, meter_type = self._load()
        readings: list[Observed] = []
        for frame in rows:
            for kind, events, values, faulty in zip(
                frame["meter_type"],
                frame["event_us"],
                frame["values"],
                frame["faulty"],
                strict=True,
            ):
                meter_type = kind or meter_type
                readings += map(Observed, events.tolist(), values.tolist(), faulty.tolist())
        meter = self._meter(device_id, meter_type)
        state.meter_type = meter.meter_type.value
        changes = observe(meter, state, readings)
        arrived_ms = timerValues.getCurrentProcessingTimeInMs()
        self._arm(meter, state, arrived_ms, timerValues)
        self.state.update((encode_state(state), arrived_ms))
        if changes:
            yield _frame(meter, changes)

    def handleExpiredTimer(
        self,
        key: Any,
        timerValues: TimerValues,  # noqa: N803
        expiredTimerInfo: ExpiredTimerInfo,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        device_id = str(key[0])
        if not self.state.exists():  # expired by TTL: a meter long gone
            return
        state, arrived_ms, meter_type = self._load()
        meter = self._meter(device_id, meter_type)
        if self.time_mode == EVENT_TIME:
            now_us = timerValues.getCurrentWatermarkInMs() * _US_PER_MS
        else:  # the clock since the latest reading arrived, in the meter's event time
            elapsed_ms = timerValues.getCurrentProcessingTimeInMs() - arrived_ms
            now_us = state.last_us + max(0, elapsed_ms) * _US_PER_MS
        state.timer_us = 0
        if state.silent_open and now_us - state.last_us >= self.ttl_ms * _US_PER_MS:
            self.state.clear()  # silent for the whole TTL: the meter is gone, so is its state
            return
        changes = expire(meter, state, now_us)
        self._arm(meter, state, arrived_ms, timerValues)
        self.state.update((encode_state(state), arrived_ms))
        if changes:
            yield _frame(meter, changes)

    def _arm(self, meter: Meter, state: MeterState, arrived_ms: int, now: TimerValues) -> None:
        """Keep one timer per meter: at the NO_DATA deadline, and once silent, at the end of
        the TTL (when the state is forgotten). A pending timer that fires early re-arms; one
        that would fire late (a forget timer of a meter reporting again) is moved."""
        if not state.last_us:
            return
        if state.silent_open:
            due_us = state.last_us + self.ttl_ms * _US_PER_MS
        else:
            due_us = deadline(meter, state)
        if self.time_mode == EVENT_TIME:  # Spark takes only timers after the watermark
            fire_ms = max(due_us // _US_PER_MS, now.getCurrentWatermarkInMs() + 1)
        else:
            fire_ms = arrived_ms + (due_us - state.last_us) // _US_PER_MS
        pending_ms = state.timer_us // _US_PER_MS
        if pending_ms and pending_ms <= fire_ms:
            return
        if pending_ms:
            self.handle.deleteTimer(pending_ms)
        state.timer_us = fire_ms * _US_PER_MS
        self.handle.registerTimer(fire_ms)

    def close(self) -> None:
        pass


def _frame(meter: Meter, changes: list[Detection]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            (
                change.device_id,
                meter.meter_type.value,
                str(change.code),
                change.action,
                change.start_us,
                change.at_us,
                change.value,
                change.reason,
            )
            for change in changes
        ],
        columns=_CHANGE_COLUMNS,
    )


def detect_faults(
    digests: DataFrame,
    rules: DetectionRules,
    intervals: Mapping[str, int],
    default_interval_s: int,
    time_mode: str = PROCESSING_TIME,
    watermark_delay: str = "10 minutes",
    ttl_ms: int = 7 * 24 * 3_600_000,
) -> DataFrame:
    """The episode changes of a streaming DataFrame of digests (:data:`DIGEST_DDL`)."""
    source = digests.select(*_DIGEST_SCHEMA.names)
    if time_mode == EVENT_TIME:
        source = source.withWatermark("event_time", watermark_delay)
    return source.groupBy("device_id").transformWithStateInPandas(
        MeterDetector(rules, intervals, default_interval_s, time_mode, ttl_ms),
        CHANGE_SCHEMA,
        "Append",
        time_mode,
    )
