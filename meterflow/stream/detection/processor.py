"""The stateful stage in Spark: :mod:`meterflow.stream.detection.rules`'s rules per meter, with
``transformWithStateInPandas`` on the RocksDB state store, checkpointed.

:func:`detect_faults` turns a stream of per-meter reading digests (the stream's tasks
publish one per meter and micro-batch on ``iot-meter-digest``; :func:`digest_rows` keys
them) into a stream of episode changes (:data:`CHANGE_SCHEMA`): one row each time a STUCK,
SPIKE, LEAK or NO_DATA episode opens or clears. Reading digests rather than ``iot-meter``
spares a second Kafka read and classification, and a row per meter instead of per reading
(docs/architecture.md, "Stateful detection", has the measurements). State is kept per
bucket of meters (:class:`MeterDetector`), as a snapshot and the deltas since, each delta
holding only the meters a batch heard from: each meter's
:class:`~meterflow.stream.detection.rules.MeterState` (a few kB at most), dropped once it
has been silent for a time to live, and one pending timer per bucket for NO_DATA:

- ``EventTime`` (replays and backfills): the timer fires when the watermark passes the
  meter's deadline, so simulated days measure silence in simulated time;
- ``ProcessingTime`` (live): it fires on the clock, since a silent meter sends nothing that
  would move event time. Silence is then the clock time since the meter's latest reading
  arrived, added to that reading's event time.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import pandas as pd
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
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
#: The processor's state variables per bucket, which Spark's state reader reads back from a
#: checkpoint (:func:`read_state`): a snapshot (an encoded :class:`Bucket`), the deltas
#: since (encoded :class:`Delta` by sequence number) and the :class:`Head` that ties them.
STATE_NAME = "bucket"
_STATE_SCHEMA = "state binary"
DELTAS_NAME = "deltas"
HEAD_NAME = "head"
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
    """A bucket's snapshot (the ``bucket`` state value): each meter's msgpack-encoded
    :class:`MeterState`, when its latest readings arrived (processing time, ms), and the
    token of the chain of :class:`Delta` it was taken at. ``timer_ms`` is the pending timer
    of a checkpoint written before the delta layout (one without a ``head``)."""

    meters: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    arrived_ms: dict[str, int] = msgspec.field(default_factory=dict)
    timer_ms: int = 0
    token: int = 0


class Delta(msgspec.Struct, array_like=True):
    """One batch's changes to a bucket (a ``deltas`` entry, keyed by its sequence number):
    the meters it touched, with when each needs the timer (:meth:`MeterDetector._due`, so
    a worker catching up decodes no state), the meters it forgot, and the chain link
    ``previous`` -> ``token`` that tells a worker whether its copy is the state this delta
    applies to."""

    previous: int
    token: int
    meters: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    arrived_ms: dict[str, int] = msgspec.field(default_factory=dict)
    gone: list[str] = msgspec.field(default_factory=list)
    due: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)


class Head(NamedTuple):
    """A bucket's ``head`` state value: the latest delta (``seq``, ``token``), the
    snapshot's (``base_seq``), the oldest delta still stored, the pending timer, the bytes
    of deltas written since the snapshot, and how many make it time for the next one."""

    seq: int = 0
    token: int = 0
    base_seq: int = 0
    kept_from: int = 1
    timer_ms: int = 0
    delta_bytes: int = 0
    snapshot_after: int = 0


_HEAD_SCHEMA = (
    "seq long, token long, base_seq long, kept_from long, timer_ms long, delta_bytes long, "
    "snapshot_after long"
)
_encoder = msgspec.msgpack.Encoder()
_bucket_decoder = msgspec.msgpack.Decoder(Bucket)
_delta_decoder = msgspec.msgpack.Decoder(Delta)
_state_decoder = msgspec.msgpack.Decoder(MeterState)


@dataclass
class _Copy:
    """A bucket as a Python worker keeps it between micro-batches: at which delta, each
    meter's encoded state, arrival and (deadline, latest reading) for the timer."""

    seq: int
    token: int
    states: dict[str, bytes]
    arrived_ms: dict[str, int]
    due: dict[str, tuple[int, int]]


#: The buckets this worker process last wrote or read, per detector instance and bucket.
#: Spark reuses its Python workers across micro-batches, so a worker that handles a bucket
#: again finds it here and reads only the deltas it missed (docs/architecture.md,
#: "Stateful detection").
_COPIES: dict[tuple[int, Any], _Copy] = {}


def merged_state(base: bytes | None, deltas: Mapping[int, bytes], base_seq: int, seq: int) -> bytes:
    """A bucket's whole state (an encoded :class:`Bucket`): its snapshot with the deltas
    after it up to ``seq`` applied, checking their chain. What a carried-over checkpoint
    and the tests read."""
    bucket = Bucket() if base is None else _bucket_decoder.decode(base)
    token = bucket.token
    for number in range(base_seq + 1, seq + 1):
        delta = _delta_decoder.decode(deltas[number])
        if delta.previous != token:
            raise ValueError(f"delta {number} does not follow the state before it")
        bucket.meters.update(delta.meters)
        bucket.arrived_ms.update(delta.arrived_ms)
        for device_id in delta.gone:
            bucket.meters.pop(device_id, None)
            bucket.arrived_ms.pop(device_id, None)
        token = delta.token
    return _encoder.encode(Bucket(bucket.meters, bucket.arrived_ms, 0, token))


class MeterDetector(StatefulProcessor):
    """The rules of a bucket of meters between micro-batches (the key: see
    :func:`detect_faults`, ``pmod(hash(device_id), buckets)``).

    A key per meter would cost Spark a pandas frame and the processor a state read, a
    write and a timer call per meter and batch, which profiling showed to be most of the
    stage's time; a bucket of meters shares them (docs/architecture.md, "Stateful
    detection"). Each meter keeps its own :class:`MeterState`, and the bucket one timer, at
    the earliest of its meters' deadlines.

    A batch writes only what it changed: one :class:`Delta` of the meters it heard from,
    and now and then a :class:`Bucket` snapshot. It reads nothing but the ``head`` when the
    worker's copy is current, and the deltas it missed when not, so a batch's cost follows
    the meters it hears from, not the fleet.

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
        #: Whose copies in :data:`_COPIES` are this query's: deadlines follow the profiles.
        self.instance = random.getrandbits(63)
        self._meters: dict[str, Meter] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a Python worker: in Spark's pre-init worker, quiet its banners."""
        self.__dict__.update(state)
        _quiet_pre_init_worker()

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        self.base = handle.getValueState(STATE_NAME, _STATE_SCHEMA)
        self.head = handle.getValueState(HEAD_NAME, _HEAD_SCHEMA)
        self.deltas = handle.getMapState(DELTAS_NAME, "seq long", "delta binary")
        for key in [k for k in _COPIES if k[0] != self.instance]:
            del _COPIES[key]  # another query's (or profiles'): never read again

    def _meter(self, device_id: str, meter_type: str | None) -> Meter:
        """The meter as the rules see it. Kept: a meter changes only with its type."""
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

    def _due(self, device_id: str, state: MeterState) -> tuple[int, int]:
        """When the meter needs the timer, in event microseconds (its NO_DATA deadline, or
        once silent the end of the TTL), with its latest reading's time."""
        if state.silent_open:
            return state.last_us + self.ttl_ms * _US_PER_MS, state.last_us
        return deadline(self._meter(device_id, state.meter_type), state), state.last_us

    def _sync(self, key: Any) -> tuple[_Copy, Head]:
        """This bucket as committed: the worker's copy if current, caught up through the
        deltas it missed, else read whole (snapshot and deltas)."""
        stored = self.head.get()
        copy = _COPIES.pop((self.instance, key), None)  # back only once written
        if stored is None:  # a new bucket, or one written before the delta layout
            copy, base = self._read_base()
            return copy, Head(timer_ms=base.timer_ms)
        head = Head(*stored)
        if copy is not None and copy.seq == head.seq and copy.token == head.token:
            return copy, head
        missed = copy is not None and head.kept_from - 1 <= copy.seq < head.seq
        if copy is not None and missed and self._catch_up(copy, head):
            return copy, head
        copy, _ = self._read_base()
        copy.seq = head.base_seq
        if not self._catch_up(copy, head, own=False):
            raise RuntimeError(f"the detector's state of bucket {key} is broken: deltas missing")
        return copy, head

    def _read_base(self) -> tuple[_Copy, Bucket]:
        stored = self.base.get()
        base = Bucket() if stored is None else _bucket_decoder.decode(bytes(stored[0]))
        copy = _Copy(0, base.token, {}, dict(base.arrived_ms), {})
        for device_id, raw in base.meters.items():
            encoded = bytes(raw)
            copy.states[device_id] = encoded
            copy.due[device_id] = self._due(device_id, _state_decoder.decode(encoded))
        return copy, base

    def _catch_up(self, copy: _Copy, head: Head, own: bool = True) -> bool:
        """Apply the deltas after the copy's; False if one is gone or not its successor.
        ``own``: the copy is this query's, so are the deltas after it (a copy is never
        older than the query's start), and their deadlines follow its profiles; else each
        meter's deadline is computed again."""
        for seq in range(copy.seq + 1, head.seq + 1):
            stored = self.deltas.getValue((seq,))
            if stored is None:
                return False
            delta = _delta_decoder.decode(bytes(stored[0]))
            if delta.previous != copy.token:
                return False
            copy.states.update((d, bytes(raw)) for d, raw in delta.meters.items())
            if own:
                copy.due.update(delta.due)
            else:
                for device_id in delta.meters:
                    state = _state_decoder.decode(copy.states[device_id])
                    copy.due[device_id] = self._due(device_id, state)
            copy.arrived_ms.update(delta.arrived_ms)
            for device_id in delta.gone:
                self._forget(copy, device_id)
            copy.seq, copy.token = seq, delta.token
        return copy.token == head.token

    def _forget(self, copy: _Copy, device_id: str) -> None:
        copy.states.pop(device_id, None)
        copy.arrived_ms.pop(device_id, None)
        copy.due.pop(device_id, None)
        self._meters.pop(device_id, None)

    def _write(
        self,
        key: Any,
        copy: _Copy,
        head: Head,
        changed: Mapping[str, MeterState],
        arrived_ms: Mapping[str, int],
        gone: list[str],
        now: TimerValues,
    ) -> None:
        """Store a batch's changes as a delta (and a snapshot when the deltas since the
        last one outweigh it), re-arm the bucket's timer, and keep the copy."""
        encoded = {d: _encoder.encode(state) for d, state in changed.items()}
        for device_id, state in changed.items():
            copy.states[device_id] = encoded[device_id]
            copy.due[device_id] = self._due(device_id, state)
        copy.arrived_ms.update(arrived_ms)
        for device_id in gone:
            self._forget(copy, device_id)
        if not copy.states:  # every meter forgotten: so is the bucket
            if head.timer_ms:
                self.handle.deleteTimer(head.timer_ms)
            self.base.clear()
            self.head.clear()
            self.deltas.clear()
            return
        timer_ms = self._arm(copy, head.timer_ms, now)
        if not changed and not gone:
            if timer_ms != head.timer_ms:
                self.head.update(tuple(head._replace(timer_ms=timer_ms)))
            _COPIES[(self.instance, key)] = copy
            return
        token = random.getrandbits(63)
        delta = _encoder.encode(
            Delta(
                head.token,
                token,
                {d: msgspec.Raw(e) for d, e in encoded.items()},
                dict(arrived_ms),
                gone,
                {d: copy.due[d] for d in encoded},
            )
        )
        seq = head.seq + 1
        self.deltas.updateValue((seq,), (delta,))
        head = head._replace(seq=seq, token=token, timer_ms=timer_ms)
        head = head._replace(delta_bytes=head.delta_bytes + len(delta))
        if head.delta_bytes > head.snapshot_after:
            snapshot = _encoder.encode(
                Bucket(
                    {d: msgspec.Raw(e) for d, e in copy.states.items()},
                    copy.arrived_ms,
                    0,
                    token,
                )
            )
            self.base.update((snapshot,))
            # Deltas since the previous snapshot stay: a worker whose copy is older than
            # this one still catches up through them.
            for old in range(head.kept_from, head.base_seq + 1):
                self.deltas.removeKey((old,))
            head = head._replace(
                kept_from=max(head.kept_from, head.base_seq + 1),
                base_seq=seq,
                delta_bytes=0,
                # The next snapshot once the deltas outweigh this one, by a random factor:
                # buckets that grow alike would otherwise all take theirs in one batch.
                snapshot_after=int(len(snapshot) * random.uniform(1, 2)),
            )
        self.head.update(tuple(head))
        copy.seq, copy.token = seq, token
        _COPIES[(self.instance, key)] = copy

    def handleInputRows(  # Spark's names: it passes some by keyword
        self,
        key: Any,
        rows: Iterator[pd.DataFrame],
        timerValues: TimerValues,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        copy, head = self._sync(key)
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
        changed: dict[str, MeterState] = {}
        for device_id, (kind, readings) in batch.items():
            encoded = copy.states.get(device_id)
            state = MeterState() if encoded is None else _state_decoder.decode(encoded)
            meter = self._meter(device_id, kind or state.meter_type)
            state.meter_type = meter.meter_type.value
            out += [(meter, change) for change in observe(meter, state, readings)]
            changed[device_id] = state
        self._write(key, copy, head, changed, dict.fromkeys(changed, arrived_ms), [], timerValues)
        if out:
            yield _frame(out)

    def handleExpiredTimer(
        self,
        key: Any,
        timerValues: TimerValues,  # noqa: N803
        expiredTimerInfo: ExpiredTimerInfo,  # noqa: N803
    ) -> Iterator[pd.DataFrame]:
        copy, head = self._sync(key)
        head = head._replace(timer_ms=0)  # it fired
        if self.time_mode == EVENT_TIME:
            now_ms = timerValues.getCurrentWatermarkInMs()
        else:
            now_ms = timerValues.getCurrentProcessingTimeInMs()
        out: list[tuple[Meter, Detection]] = []
        changed: dict[str, MeterState] = {}
        gone: list[str] = []
        for device_id, (fire_us, last_us) in list(copy.due.items()):
            arrived_ms = copy.arrived_ms.get(device_id, 0)
            if self._fire_ms(fire_us, last_us, arrived_ms) > now_ms + 1:
                continue  # not due: nothing of it to look at
            state = _state_decoder.decode(copy.states[device_id])
            meter = self._meter(device_id, state.meter_type)
            now_us = self._now_us(state, arrived_ms, timerValues)
            if state.silent_open and now_us - state.last_us >= self.ttl_ms * _US_PER_MS:
                gone.append(device_id)  # silent for the whole TTL: the meter is gone
                continue
            due_us = deadline(meter, state)
            if now_us >= due_us:
                # In event time the silence became NO_DATA at its deadline, however far
                # past it this batch's watermark jumped: the episode does not depend on
                # how a catch-up was cut into batches.
                at_us = due_us if self.time_mode == EVENT_TIME else now_us
                found = expire(meter, state, at_us)
                if found:
                    out += [(meter, change) for change in found]
                    changed[device_id] = state
        self._write(key, copy, head, changed, {}, gone, timerValues)
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

    def _fire_ms(self, due_us: int, last_us: int, arrived_ms: int) -> int:
        """When, on the timer's clock, a meter due at ``due_us`` (:meth:`_due`) needs it."""
        if self.time_mode == EVENT_TIME:
            return due_us // _US_PER_MS
        return self._since_ms(arrived_ms) + (due_us - last_us) // _US_PER_MS

    def _arm(self, copy: _Copy, timer_ms: int, now: TimerValues) -> int:
        """One timer per bucket, at the earliest time one of its meters needs it; the timer
        now pending. A timer that fires early re-arms; one that would fire late is moved."""
        arrived = copy.arrived_ms
        fire_ms = min(
            self._fire_ms(due_us, last_us, arrived.get(d, 0))
            for d, (due_us, last_us) in copy.due.items()
        )
        if self.time_mode == EVENT_TIME:  # Spark takes only timers after the watermark
            fire_ms = max(fire_ms, now.getCurrentWatermarkInMs() + 1)
        if timer_ms and timer_ms <= fire_ms:
            return timer_ms
        if timer_ms:
            self.handle.deleteTimer(timer_ms)
        self.handle.registerTimer(fire_ms)
        return fire_ms

    def handleInitialState(
        self,
        key: Any,
        initialState: pd.DataFrame,  # noqa: N803
        timerValues: TimerValues,  # noqa: N803
    ) -> None:
        """A bucket carried over from a previous checkpoint (:func:`read_state`): its
        meters' states as they were; its timer is armed again here, since the old one
        belonged to the old checkpoint."""
        copy, head = self._sync(key)
        changed: dict[str, MeterState] = {}
        arrived_ms: dict[str, int] = {}
        for raw in initialState["state"]:
            carried = _bucket_decoder.decode(bytes(raw))
            changed.update({d: _state_decoder.decode(s) for d, s in carried.meters.items()})
            arrived_ms.update(carried.arrived_ms)
        self._write(key, copy, head, changed, arrived_ms, [], timerValues)

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
    ``bucket int, state binary`` rows, each state a whole :class:`Bucket` (Spark's state
    reader, ``statestore``: the snapshots with their deltas applied)."""

    def variable(name: str) -> DataFrame:
        return spark.read.format("statestore").option("stateVarName", name).load(checkpoint)

    def parts(kind: int, frame: DataFrame, seq: Column, last: Column, blob: Column) -> DataFrame:
        return frame.select(
            F.col("key.bucket").alias("bucket"),
            F.lit(kind).alias("kind"),
            seq.cast("long").alias("seq"),
            last.cast("long").alias("last"),
            blob.cast("binary").alias("blob"),
        )

    unused = F.lit(None)
    snapshots = parts(_SNAPSHOT, variable(STATE_NAME), unused, unused, F.col("value.state"))
    try:
        heads = variable(HEAD_NAME)
    except PySparkException as exc:
        if not (exc.getCondition() or "").startswith("STDS_INVALID_OPTION_VALUE"):
            raise
        # Written before the delta layout: each snapshot is its bucket's whole state.
        return snapshots.select("bucket", F.col("blob").alias("state"))
    deltas = variable(DELTAS_NAME)
    seq = F.col("user_map_key.seq")
    return (
        snapshots.unionByName(parts(_DELTA, deltas, seq, unused, F.col("user_map_value.delta")))
        .unionByName(parts(_HEAD, heads, F.col("value.base_seq"), F.col("value.seq"), unused))
        .groupBy("bucket")
        .applyInPandas(_merge_parts, "bucket int, state binary")
    )


_SNAPSHOT, _DELTA, _HEAD = 0, 1, 2


def _merge_parts(parts: pd.DataFrame) -> pd.DataFrame:
    """One bucket's snapshot, deltas and head (:func:`read_state`: ``kind``, ``seq``,
    ``last``, ``blob``; a head's ``seq`` is its snapshot's, ``last`` its latest delta's) as
    its whole state."""
    base: bytes | None = None
    base_seq = last = 0
    deltas: dict[int, bytes] = {}
    for kind, seq, latest, blob in zip(
        parts["kind"], parts["seq"], parts["last"], parts["blob"], strict=True
    ):
        if kind == _SNAPSHOT:
            base = bytes(blob)
        elif kind == _DELTA:
            deltas[int(seq)] = bytes(blob)
        else:
            base_seq, last = int(seq), int(latest)
    state = merged_state(base, deltas, base_seq, last)
    return pd.DataFrame({"bucket": [int(parts["bucket"].iloc[0])], "state": [state]})


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
