"""The stateful stage in Spark: :mod:`meterflow.stream.detection.rules`'s rules per meter, with
``transformWithStateInPandas`` on the RocksDB state store, checkpointed.

:func:`detect_faults` turns a stream of per-meter reading digests (the stream's tasks
publish one per meter and micro-batch on ``iot-meter-digest``; :func:`digest_rows` keys
them) into a stream of episode changes (:data:`CHANGE_SCHEMA`): one row each time a STUCK,
SPIKE, LEAK or NO_DATA episode opens or clears. Reading digests rather than ``iot-meter``
spares a second Kafka read and classification, and a row per meter instead of per reading
(docs/architecture.md, "Stateful detection", has the measurements). State is kept per
bucket of meters (:class:`MeterDetector`): each meter's :class:`~meterflow.stream.detection.rules.
MeterState` (a few kB at most), dropped once it has been silent for a time to live, and one
pending timer per bucket for NO_DATA:

- ``EventTime`` (replays and backfills): the timer fires when the watermark passes the
  meter's deadline, so simulated days measure silence in simulated time;
- ``ProcessingTime`` (live): it fires on the clock, since a silent meter sends nothing that
  would move event time. Silence is then the clock time since the meter's latest reading
  arrived, added to that reading's event time.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming.stateful_processor import (
    ExpiredTimerInfo,
    StatefulProcessor,
    StatefulProcessorHandle,
    TimerValues,
)

from meterflow.core.contract import MeterType
from meterflow.core.logs import get_logger
from meterflow.core.messages import ReadingDigest, decoder
from meterflow.core.thresholds import DetectionRules
from meterflow.core.timestamps import UTC_NAME, LocalClock
from meterflow.stream.detection.profiles import MeterProfile
from meterflow.stream.detection.rules import (
    Detection,
    Meter,
    MeterState,
    deadline,
    expire,
    observe,
)

log = get_logger(__name__)

#: What the stateful stage reads: one encoded digest of a meter's readings per row, with
#: the meter (the Kafka key) and its latest reading's time (what the watermark follows).
DIGEST_DDL = "device_id string, event_time timestamp, value binary"
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
#: The processor's one state variable (a bucket's msgpack-encoded :class:`Bucket`) and its
#: schema: what Spark's state reader reads back from a checkpoint (:func:`read_state`).
STATE_NAME = "bucket"
_STATE_SCHEMA = "state binary"
#: Buckets of meters the state is kept in (see :class:`MeterDetector`): enough to spread
#: over the shuffle partitions, few enough that each holds many meters.
DEFAULT_BUCKETS = 64
_US_PER_MS = 1_000
_digest_decoder = decoder(ReadingDigest)


def digest_rows(records: DataFrame) -> DataFrame:
    """Kafka records of ``iot-meter-digest`` (``key``, ``value``) as :data:`DIGEST_DDL` rows.

    All in the JVM: the key is the meter, and the latest reading's time is read from the
    JSON's ``event_us`` alone. The digest is decoded once, in the stateful worker: a Python
    stage here would pass every reading through Arrow and pandas twice more
    (docs/architecture.md, "Stateful detection").
    """
    latest_us = F.element_at(
        F.from_json(F.col("value").cast("string"), "event_us array<bigint>")["event_us"], -1
    )
    return records.select(
        F.col("key").cast("string").alias("device_id"),
        F.timestamp_micros(latest_us).alias("event_time"),
        F.col("value"),
    )


class Bucket(msgspec.Struct, array_like=True):
    """The state of one bucket of meters: each meter's own state, when its latest
    readings arrived (processing time, ms) and the bucket's pending timer."""

    meters: dict[str, MeterState] = msgspec.field(default_factory=dict)
    arrived_ms: dict[str, int] = msgspec.field(default_factory=dict)
    timer_ms: int = 0


_bucket_encoder = msgspec.msgpack.Encoder()
_bucket_decoder = msgspec.msgpack.Decoder(Bucket)


class MeterDetector(StatefulProcessor):
    """The rules of a bucket of meters between micro-batches (the key: see
    :func:`detect_faults`, ``pmod(hash(device_id), buckets)``).

    A key per meter would cost Spark a pandas frame and the processor a state read, a
    write and a timer call per meter and batch, which profiling showed to be most of the
    stage's time; a bucket of meters shares them (docs/architecture.md, "Stateful
    detection"). Each meter keeps its own :class:`MeterState` inside the bucket's value,
    and the bucket one timer, at the earliest of its meters' deadlines.

    ``profiles`` (:func:`meterflow.stream.detection.profiles.load_profiles`) hold the meters whose
    interval or thresholds differ from ``default_interval_s`` and ``rules``.
    """

    def __init__(
        self,
        rules: DetectionRules,
        profiles: Mapping[str, MeterProfile],
        default_interval_s: int,
        time_mode: str,
        ttl_ms: int,
        started_ms: int = 0,
        zone_name: str = UTC_NAME,
    ) -> None:
        if time_mode not in TIME_MODES:
            raise ValueError(f"time mode {time_mode!r} is not one of {', '.join(TIME_MODES)}")
        self.rules = rules
        self.profiles = dict(profiles)
        self.default_interval_s = default_interval_s
        self.time_mode = time_mode
        self.ttl_ms = ttl_ms
        self.started_ms = started_ms
        self.clock = LocalClock(zone_name)
        self._meters: dict[str, Meter] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a Python worker: in Spark's pre-init worker, quiet its banners."""
        self.__dict__.update(state)
        _quiet_pre_init_worker()

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        self.state = handle.getValueState(STATE_NAME, _STATE_SCHEMA)

    def _meter(self, device_id: str, meter_type: str | None) -> Meter:
        """The meter as the rules see it. Kept: each batch asks for every meter of its
        buckets (to arm their timer), and a meter changes only with its type."""
        meter = self._meters.get(device_id)
        if meter is not None and meter.meter_type == (meter_type or MeterType.ELECTRICITY):
            return meter
        kind = MeterType(meter_type) if meter_type else MeterType.ELECTRICITY
        profile = self.profiles.get(device_id)
        if profile is None:
            meter = Meter(device_id, kind, self.default_interval_s, self.rules, self.clock)
        else:
            interval = profile.interval_s or self.default_interval_s
            rules = profile.rules or self.rules
            meter = Meter(device_id, kind, interval, rules, self.clock, profile.constant_load)
        self._meters[device_id] = meter
        return meter

    def _load(self) -> Bucket:
        stored = self.state.get() if self.state.exists() else None
        return Bucket() if stored is None else _bucket_decoder.decode(bytes(stored[0]))

    def _save(self, bucket: Bucket, now: TimerValues) -> None:
        if not bucket.meters:
            self.state.clear()
            return
        self._arm(bucket, now)
        self.state.update((_bucket_encoder.encode(bucket),))

    def handleInputRows(  # Spark's names: it passes some by keyword
        self,
        key: Any,
        rows: Iterator[pd.DataFrame],
        timerValues: TimerValues,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        bucket = self._load()
        batch: dict[str, tuple[str, list[tuple[int, float | None, bool, float | None]]]] = {}
        for frame in rows:
            for raw in frame["value"]:
                try:
                    digest = _digest_decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as bad:
                    # The stream wrote it, so it is a bug; the readings are in the lake.
                    log.error("detect=undecodable-digest detail=%s", bad)
                    continue
                _, readings = batch.setdefault(digest.device_id, (digest.meter_type, []))
                flows = digest.flows or itertools.repeat(None, len(digest.event_us))
                readings += zip(digest.event_us, digest.values, digest.faulty, flows, strict=True)
        arrived_ms = timerValues.getCurrentProcessingTimeInMs()
        out: list[tuple[Meter, Detection]] = []
        for device_id, (kind, readings) in batch.items():
            state = bucket.meters.get(device_id) or MeterState()
            meter = self._meter(device_id, kind or state.meter_type)
            state.meter_type = meter.meter_type.value
            out += [(meter, change) for change in observe(meter, state, readings)]
            bucket.meters[device_id] = state
            bucket.arrived_ms[device_id] = arrived_ms
        self._save(bucket, timerValues)
        if out:
            yield _frame(out)

    def handleExpiredTimer(
        self,
        key: Any,
        timerValues: TimerValues,  # noqa: N803
        expiredTimerInfo: ExpiredTimerInfo,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        bucket = self._load()
        bucket.timer_ms = 0
        out: list[tuple[Meter, Detection]] = []
        for device_id, state in list(bucket.meters.items()):
            meter = self._meter(device_id, state.meter_type)
            now_us = self._now_us(state, bucket.arrived_ms.get(device_id, 0), timerValues)
            if state.silent_open and now_us - state.last_us >= self.ttl_ms * _US_PER_MS:
                del bucket.meters[device_id]  # silent for the whole TTL: the meter is gone
                bucket.arrived_ms.pop(device_id, None)
                self._meters.pop(device_id, None)
                continue
            due_us = deadline(meter, state)
            if now_us >= due_us:
                # In event time the silence became NO_DATA at its deadline, however far
                # past it this batch's watermark jumped: the episode does not depend on
                # how a catch-up was cut into batches.
                at_us = due_us if self.time_mode == EVENT_TIME else now_us
                out += [(meter, change) for change in expire(meter, state, at_us)]
        self._save(bucket, timerValues)
        if out:
            yield _frame(out)

    def _now_us(self, state: MeterState, arrived_ms: int, now: TimerValues) -> int:
        """Now in the meter's event time: the watermark, or in processing time the clock
        since its latest readings arrived, added to the latest reading's event time."""
        if self.time_mode == EVENT_TIME:
            return now.getCurrentWatermarkInMs() * _US_PER_MS
        elapsed_ms = now.getCurrentProcessingTimeInMs() - self._since_ms(arrived_ms)
        return state.last_us + max(0, elapsed_ms) * _US_PER_MS

    def _since_ms(self, arrived_ms: int) -> int:
        """Since when, on the clock, a meter's silence counts: its latest readings' arrival,
        but not before this query started. While the detector is down nothing arrives; that
        is no meter's silence, so each gets its whole NO_DATA window again after a restart
        (a meter that stays silent is reported that much later, with the same start)."""
        return max(arrived_ms, self.started_ms)

    def _fire_ms(self, meter: Meter, state: MeterState, arrived_ms: int) -> int:
        """When this meter needs the timer: its NO_DATA deadline, or once silent, the end of
        the TTL (when its state is forgotten)."""
        if state.silent_open:
            due_us = state.last_us + self.ttl_ms * _US_PER_MS
        else:
            due_us = deadline(meter, state)
        if self.time_mode == EVENT_TIME:
            return due_us // _US_PER_MS
        return self._since_ms(arrived_ms) + (due_us - state.last_us) // _US_PER_MS

    def _arm(self, bucket: Bucket, now: TimerValues) -> None:
        """One timer per bucket, at the earliest time one of its meters needs it. A timer
        that fires early re-arms; one that would fire late is moved."""
        fire_ms = min(
            self._fire_ms(self._meter(d, s.meter_type), s, bucket.arrived_ms.get(d, 0))
            for d, s in bucket.meters.items()
        )
        if self.time_mode == EVENT_TIME:  # Spark takes only timers after the watermark
            fire_ms = max(fire_ms, now.getCurrentWatermarkInMs() + 1)
        if bucket.timer_ms and bucket.timer_ms <= fire_ms:
            return
        if bucket.timer_ms:
            self.handle.deleteTimer(bucket.timer_ms)
        bucket.timer_ms = fire_ms
        self.handle.registerTimer(fire_ms)

    def handleInitialState(
        self,
        key: Any,
        initialState: pd.DataFrame,  # noqa: N803
        timerValues: TimerValues,  # noqa: N803
    ) -> None:
        """A bucket carried over from a previous checkpoint (:func:`read_state`): its
        meters' states as they were; its timer is armed again here, since the old one
        belonged to the old checkpoint."""
        bucket = self._load()
        for raw in initialState["state"]:
            carried = _bucket_decoder.decode(bytes(raw))
            bucket.meters.update(carried.meters)
            bucket.arrived_ms.update(carried.arrived_ms)
        bucket.timer_ms = 0
        self._save(bucket, timerValues)

    def close(self) -> None:
        pass


#: The module of the Python process Spark starts on the driver, once per start of the
#: query, to ask the processor for its state variables before the first batch.
PRE_INIT_WORKER = "pyspark.sql.streaming.transform_with_state_driver_worker"


def _quiet_pre_init_worker() -> None:
    """Send the pre-init worker's stdout nowhere, if this process is that worker.

    It prints its UDF's repr and schema as multi-line banners on stdout, which Spark copies
    to the driver's stderr; it talks to Spark over a socket, so stdout carries nothing else.
    Unpickling the processor is the first code of meterflow's it runs (its first line,
    "Starting ... Python worker.", is printed before).
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) == PRE_INIT_WORKER:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # for the process's lifetime


def _frame(changes: list[tuple[Meter, Detection]]) -> pd.DataFrame:
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
            for meter, change in changes
        ],
        columns=_CHANGE_COLUMNS,
    )


def detect_faults(
    digests: DataFrame,
    rules: DetectionRules,
    profiles: Mapping[str, MeterProfile],
    default_interval_s: int,
    time_mode: str = PROCESSING_TIME,
    watermark_delay: str = "10 minutes",
    ttl_ms: int = 7 * 24 * 3_600_000,
    buckets: int = DEFAULT_BUCKETS,
    started_ms: int | None = None,
    initial_state: DataFrame | None = None,
    zone_name: str = UTC_NAME,
) -> DataFrame:
    """The episode changes of a streaming DataFrame of digests (:data:`DIGEST_DDL`);
    ``profiles`` are the meters that differ from ``rules`` and ``default_interval_s``;
    hour-of-day rules read local time in ``zone_name``.
    ``started_ms`` (default: now) is when this start of the query began, on the clock.
    ``initial_state`` (:func:`read_state` of a previous checkpoint, the same ``buckets``)
    is where a fresh checkpoint's meters start from; Spark reads it in the first batch."""
    source = digests.select(
        "device_id",
        "event_time",
        "value",
        F.pmod(F.hash("device_id"), F.lit(buckets)).alias("bucket"),
    )
    if time_mode == EVENT_TIME:
        source = source.withWatermark("event_time", watermark_delay)
    return source.groupBy("bucket").transformWithStateInPandas(
        MeterDetector(
            rules,
            profiles,
            default_interval_s,
            time_mode,
            ttl_ms,
            int(time.time() * 1000) if started_ms is None else started_ms,
            zone_name,
        ),
        CHANGE_SCHEMA,
        "Append",
        time_mode,
        initialState=None if initial_state is None else initial_state.groupBy("bucket"),
    )


def read_state(spark: SparkSession, checkpoint: str) -> DataFrame:
    """The buckets a detector's checkpoint holds after its last committed batch, as
    ``bucket int, state binary`` rows (Spark's state reader, ``statestore``)."""
    stored = spark.read.format("statestore").option("stateVarName", STATE_NAME).load(checkpoint)
    return stored.select(F.col("key.bucket").alias("bucket"), F.col("value.state").alias("state"))


def count_state(state: DataFrame) -> tuple[int, int]:
    """Buckets and meters in a :func:`read_state` frame (one Spark job, nothing collected
    but the two counts)."""
    meters = F.pandas_udf(_meters_in, "int")  # type: ignore[call-overload]  # stubs: no Series
    row = state.agg(F.count("*").alias("buckets"), F.sum(meters("state")).alias("meters")).first()
    return (int(row["buckets"]), int(row["meters"] or 0)) if row is not None else (0, 0)


def _meters_in(states: pd.Series) -> pd.Series:
    """How many meters each bucket's state holds (a module function: Spark pickles it by
    name, not with the decoder it uses)."""
    return states.map(lambda raw: len(_bucket_decoder.decode(bytes(raw)).meters))
