"""The reading contract: the only home of topic names, meter fields, fault codes and rules.

Everything that produces, checks or stores readings imports from here: the simulator,
the replay tool, the Spark streaming job, the pure-Python baseline and the tests. The
rules are plain Python so that the streaming job and the baseline apply *the same code*.

A message on ``iot-meter`` is a UTF-8 JSON object keyed by ``device_id``::

    {"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 9}
    {"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 18, "flow_rate": 5}

Every message ends in exactly one of three outcomes: a valid reading, an abnormal reading
(with a :class:`FaultCode`), or a dead letter (with a :class:`DeadLetterReason`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
import numpy as np
from msgspec import UNSET

from meterflow.core import messages
from meterflow.core.messages import (
    AbnormalEvent,
    DeadLetterReason,
    EventSource,
    ReadingMessage,
    StatusUpdate,
)

TOPIC_READINGS = "iot-meter"
TOPIC_ABNORMAL = "iot-abnormal"
TOPIC_DEADLETTER = "iot-deadletter"
#: Per micro-batch, one message per meter seen: its latest reading and whether it was good.
#: Keyed by ``device_id``; the sink folds it into MongoDB ``meter_status`` (see
#: :func:`meter_status_update`), which is how incidents learn that a meter recovered.
TOPIC_STATUS = "iot-meter-status"
#: Per micro-batch, one message per meter: its readings, for the stateful stage (issue 12).
TOPIC_DIGEST = "iot-meter-digest"

#: A metric equal to this is the meter's own fault signal (the prototype's rule).
SENTINEL_VALUE = -1


class MeterType(StrEnum):
    ELECTRICITY = "electricity"
    WATER = "water"
    GAS = "gas"


@dataclass(frozen=True)
class MeterSpec:
    """What a meter type sends: its id prefix, main metric, unit and extra metrics."""

    meter_type: MeterType
    id_prefix: str
    metric: str
    unit: str
    extra_metrics: tuple[str, ...] = ()
    #: Physical upper bound per reading for the main metric and each extra metric.
    default_bounds: dict[str, float] = field(default_factory=dict)


METER_SPECS: dict[MeterType, MeterSpec] = {
    MeterType.ELECTRICITY: MeterSpec(
        MeterType.ELECTRICITY, "em", "usage_kwh", "kWh", (), {"usage_kwh": 100.0}
    ),
    MeterType.WATER: MeterSpec(
        MeterType.WATER,
        "wm",
        "usage",
        "L",
        ("flow_rate",),
        {"usage": 10_000.0, "flow_rate": 500.0},
    ),
    MeterType.GAS: MeterSpec(MeterType.GAS, "gm", "usage_m3", "m3", (), {"usage_m3": 100.0}),
}

#: Which metric field names reveal which meter type (used when ``meter_type`` is absent).
METRIC_TO_TYPE: dict[str, MeterType] = {
    name: spec.meter_type
    for spec in METER_SPECS.values()
    for name in (spec.metric, *spec.extra_metrics)
}
PREFIX_TO_TYPE: dict[str, MeterType] = {s.id_prefix: s.meter_type for s in METER_SPECS.values()}
ALL_METRICS: tuple[str, ...] = tuple(METRIC_TO_TYPE)


class FaultCode(StrEnum):
    """Why a meter is abnormal: a reading on its own (stateless) or its recent history (stateful).

    The stateless codes are what :func:`classify` gives a reading; the stateful ones
    (:data:`STATEFUL_FAULTS`) need a meter's history, so a stateful stage raises them, never
    :func:`classify`.
    """

    MISSING_METRIC = "MISSING_METRIC"
    SENTINEL = "SENTINEL"
    NEGATIVE = "NEGATIVE"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"
    STUCK = "STUCK"
    SPIKE = "SPIKE"
    LEAK = "LEAK"
    NO_DATA = "NO_DATA"


#: The stateless rules, in the order they are checked: the first that matches wins.
STATELESS_FAULTS: tuple[FaultCode, ...] = (
    FaultCode.MISSING_METRIC,
    FaultCode.SENTINEL,
    FaultCode.NEGATIVE,
    FaultCode.OUT_OF_RANGE,
    FaultCode.FUTURE_TIMESTAMP,
)
#: The stateful rules (issue 12): per meter, over its history; see :class:`DetectionRules`.
STATEFUL_FAULTS: tuple[FaultCode, ...] = (
    FaultCode.STUCK,
    FaultCode.SPIKE,
    FaultCode.LEAK,
    FaultCode.NO_DATA,
)

#: How urgent an incident of each code is (``incidents.severity``): a leak wastes water and
#: money every hour; a silent or stuck meter hides consumption; a spike or a bad reading is
#: one number to correct.
SEVERITY: dict[FaultCode, str] = {
    FaultCode.LEAK: "critical",
    FaultCode.NO_DATA: "major",
    FaultCode.STUCK: "major",
    FaultCode.SPIKE: "minor",
    **{code: "minor" for code in STATELESS_FAULTS},
}


class Status(StrEnum):
    VALID = "valid"
    ABNORMAL = "abnormal"
    DEADLETTER = "deadletter"


@dataclass(frozen=True)
class Rules:
    """Tunable limits of the stateless rules (see :mod:`meterflow.core.config` for the env vars)."""

    max_message_bytes: int = 16_384
    future_tolerance_s: float = 300.0
    bounds: dict[str, float] = field(
        default_factory=lambda: {
            name: bound
            for spec in METER_SPECS.values()
            for name, bound in spec.default_bounds.items()
        }
    )


def _per_type(electricity: float, water: float, gas: float) -> dict[MeterType, float]:
    return {MeterType.ELECTRICITY: electricity, MeterType.WATER: water, MeterType.GAS: gas}


@dataclass(frozen=True)
class DetectionRules:
    """Thresholds of the stateful rules (:data:`STATEFUL_FAULTS`): their one home.

    The stateful detector applies them per meter; the simulator shapes the episodes it
    injects from them, so that each episode trips its rule and normal traffic trips none.
    Levels are per reading in each type's unit (kWh, L, m3); flows in L/h. Not wired to
    environment variables yet (the detector's settings will do that).
    """

    #: STUCK: this many readings in a row with the same non-zero value, i.e. for this many
    #: intervals (the meter's ``interval_seconds``) of time.
    stuck_readings: int = 8
    #: ... and a value above this level. Three decimals quantise tiny readings (a small
    #: flat in summer uses ~0.001 m3 of gas in 15 minutes at night) to a handful of
    #: values, so long runs of one of them are normal; above these levels two consecutive
    #: normal readings agree less than 6% of the time and eight in a row never do.
    stuck_min: dict[MeterType, float] = field(default_factory=lambda: _per_type(0.02, 0.5, 0.02))
    #: SPIKE: a reading above this many times the meter's baseline: the highest good
    #: reading at its hour of day on each of the last 7 days (the median of its recent
    #: good readings until it has a day's), so ordinary daily peaks are not spikes ...
    spike_factor: float = 10.0
    #: ... and above this absolute level, so tiny meters do not alarm. Water is idle in
    #: many intervals, so its baseline median is often 0 (at night, and by day while its
    #: history is short) and this level alone guards it: it is above the largest normal
    #: 15-minute use (a big household's morning peak, ~16 L/min x 15 min, x4 scale, noise).
    spike_min: dict[MeterType, float] = field(default_factory=lambda: _per_type(1.0, 250.0, 1.0))
    #: A baseline needs at least this much of a meter's history; the simulator injects no
    #: episode in a meter's first this-long (nor within this long after another episode).
    baseline_history_s: float = 86_400.0
    #: LEAK (water only): the night window, hours of the day in UTC (the simulated city's
    #: local time), from ``leak_night_start_hour`` inclusive to ``leak_night_end_hour``.
    leak_night_start_hour: int = 2
    leak_night_end_hour: int = 4
    #: LEAK: a minimum flow over the night window's readings above this, in L/h, is a
    #: leak. A household is idle most of 02:00-04:00, so its minimum night flow is 0; a
    #: dripping tap wastes ~0.6 L/h (15 L a day), a leaking toilet 8-17 L/h (200-400 L a
    #: day). 6 L/h (144 L a day, 40% of a household's use) catches a leaking toilet or
    #: worse and stays clear of a dripping tap and of the meter's resolution.
    leak_min_night_flow: float = 6.0
    #: LEAK: no zero-usage interval for this long is continuous flow.
    leak_dry_window_s: float = 86_400.0
    #: NO_DATA: no reading for this many times the meter's expected interval.
    nodata_intervals: int = 4

    def __post_init__(self) -> None:
        if self.stuck_readings < 2 or self.nodata_intervals < 1:
            raise ValueError("stuck_readings must be at least 2 and nodata_intervals at least 1")
        if self.spike_factor <= 1:
            raise ValueError("spike_factor must be above 1")
        if not 0 <= self.leak_night_start_hour < self.leak_night_end_hour <= 24:
            raise ValueError("the leak night window must be hours 0-24, start before end")
        levels = (*self.stuck_min.values(), *self.spike_min.values(), self.leak_min_night_flow)
        if min(levels) <= 0 or self.baseline_history_s < 0 or self.leak_dry_window_s <= 0:
            raise ValueError("detection levels and windows must be above 0")

    def stuck_duration_s(self, interval_s: float) -> float:
        """How long a STUCK value lasts before it is one: ``stuck_readings`` intervals."""
        return self.stuck_readings * interval_s

    def nodata_after_s(self, interval_s: float) -> float:
        """How long a meter reading every ``interval_s`` may be silent before NO_DATA."""
        return self.nodata_intervals * interval_s

    def in_leak_night(self, hour_of_day: float) -> bool:
        """Whether an instant ``hour_of_day`` hours after midnight UTC is in the night window."""
        return self.leak_night_start_hour <= hour_of_day < self.leak_night_end_hour


class Reading(NamedTuple):
    """A decoded message that is a reading (valid or abnormal)."""

    device_id: str
    meter_type: MeterType
    event_time_us: int  # microseconds since the epoch, UTC
    consumption: float | None  # the type's main metric, in its unit
    flow_rate: float | None  # water only
    fault_code: FaultCode | None
    reason: str | None
    fields: dict[str, Any]  # the decoded JSON object, as sent


class DeadLetter(NamedTuple):
    """A message that is not a reading, with the reason and a human detail."""

    reason: DeadLetterReason
    detail: str


Outcome = Reading | DeadLetter
_DEFAULT_RULES = Rules()
_TYPE_BY_NAME: dict[str, MeterType] = {str(t): t for t in MeterType}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECONDS_PER_DAY = 86_400
US_PER_DAY = SECONDS_PER_DAY * 1_000_000


def as_date(day: date | str) -> date:
    """A day given as a date or as ``YYYY-MM-DD`` (from the CLI, Airflow's ``ds``)."""
    return date.fromisoformat(day) if isinstance(day, str) else day


def parse_timestamp_us(value: str) -> int:
    """ISO-8601 to epoch microseconds; a timestamp without a zone is UTC. Raises ValueError."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * SECONDS_PER_DAY + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp_us(micros: int) -> str:
    """Epoch microseconds to the contract's ISO-8601 form (UTC, ``Z`` suffix)."""
    seconds, rest = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{rest:06d}Z" if rest else f"{text}Z"


def infer_meter_type(present_metrics: Sequence[str], device_id: str) -> MeterType | None:
    """The type the metric fields reveal, else the one the id prefix names (em/wm/gm)."""
    found = {METRIC_TO_TYPE[name] for name in present_metrics}
    by_prefix = PREFIX_TO_TYPE.get(device_id[:2].lower())
    if len(found) == 1:
        return found.pop()
    if not found:
        return by_prefix
    return by_prefix if by_prefix in found else None


_decode_wire = messages.decoder(ReadingMessage).decode
_FLOW_METRIC = "flow_rate"


@lru_cache(maxsize=8192)
def _timestamp_or_none(value: str) -> int | None:
    """Cached: a fleet reports on aligned intervals, so a batch has few distinct stamps."""
    try:
        return parse_timestamp_us(value)
    except ValueError:
        return None


def _diagnose(raw: bytes, error: Exception) -> DeadLetter:
    undecodable = messages.diagnose(raw, error, ReadingMessage)
    return DeadLetter(undecodable.reason, undecodable.detail)


@dataclass
class Classified:
    """Column-wise outcome of :func:`classify`; index ``i`` is the ``i``-th message.

    Numeric columns are numpy arrays (NaN or a mask for null); text that only abnormal
    readings and dead letters carry is kept sparse, by index.
    """

    status: np.ndarray  # int8 index into STATUS_ORDER
    device_id: list[str | None]
    type_index: np.ndarray  # int8 index into TYPE_ORDER (meaningless for dead letters)
    event_time_us: np.ndarray  # int64
    consumption: np.ndarray  # float64, NaN when absent
    flow_rate: np.ndarray  # float64, NaN when absent
    fault_index: np.ndarray  # int8, 0 = none, k = STATELESS_FAULTS[k - 1]
    reasons: dict[int, str]  # fault reason, or dead-letter detail
    dead_letters: dict[int, DeadLetterReason]

    def meter_type(self, i: int) -> MeterType:
        return TYPE_ORDER[int(self.type_index[i])]

    def fault_code(self, i: int) -> FaultCode | None:
        code = int(self.fault_index[i])
        return STATELESS_FAULTS[code - 1] if code else None


STATUS_ORDER: tuple[Status, ...] = (Status.VALID, Status.ABNORMAL, Status.DEADLETTER)
TYPE_ORDER: tuple[MeterType, ...] = tuple(METER_SPECS)
_TYPE_INDEX = {t: i for i, t in enumerate(TYPE_ORDER)}
_METRIC_OF = {t: spec.metric for t, spec in METER_SPECS.items()}


def classify(
    values: Sequence[bytes | None], reference_us: Sequence[int], rules: Rules = _DEFAULT_RULES
) -> Classified:
    """Decode and classify a batch of messages: the contract's rules, in one place.

    ``reference_us`` is "now" per message for the future-timestamp rule. The streaming job
    passes each record's Kafka timestamp so that a replay classifies identically. Decoding
    and type checks run per message (msgspec, in C); the rules run column-wise (numpy).
    """
    count = len(values)
    dead: dict[int, DeadLetter] = {}
    device_ids: list[str | None] = [None] * count
    type_index = np.zeros(count, dtype=np.int8)
    event_us = np.zeros(count, dtype=np.int64)
    primary = np.full(count, np.nan)
    flow = np.full(count, np.nan)
    max_bytes = rules.max_message_bytes
    water = MeterType.WATER
    for i, raw in enumerate(values):
        if not raw:
            dead[i] = DeadLetter(DeadLetterReason.EMPTY, "empty message (null or zero-length)")
            continue
        if len(raw) > max_bytes:
            dead[i] = DeadLetter(
                DeadLetterReason.OVERSIZE, f"{len(raw)} bytes is over the {max_bytes}-byte limit"
            )
            continue
        try:
            wire = _decode_wire(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            dead[i] = _diagnose(raw, exc)
            continue
        stamp = _timestamp_or_none(wire.timestamp)
        if stamp is None:
            dead[i] = DeadLetter(
                DeadLetterReason.BAD_TIMESTAMP, f"unparseable timestamp {wire.timestamp[:64]!r}"
            )
            continue
        declared = wire.meter_type
        if declared is UNSET or declared is None:
            present = [name for name in ALL_METRICS if getattr(wire, name) is not UNSET]
            meter_type = infer_meter_type(present, wire.device_id)
        else:
            meter_type = _TYPE_BY_NAME.get(declared)
        if meter_type is None:
            dead[i] = DeadLetter(
                DeadLetterReason.UNKNOWN_METER_TYPE,
                f"meter type of {wire.device_id[:64]!r} unknown"
                + ("" if declared in (UNSET, None) else f" (meter_type {declared[:32]!r})"),
            )
            continue
        device_ids[i] = wire.device_id
        event_us[i] = stamp
        type_index[i] = _TYPE_INDEX[meter_type]
        value = getattr(wire, _METRIC_OF[meter_type])
        if value is not None and value is not UNSET:
            primary[i] = value
        if meter_type is water:
            rate = wire.flow_rate
            if rate is not None and rate is not UNSET:
                flow[i] = rate

    references = np.asarray(reference_us, dtype=np.int64)
    fault_index = _stateless_faults(type_index, event_us, primary, flow, references, rules)
    status = np.where(fault_index > 0, 1, 0).astype(np.int8)
    reasons: dict[int, str] = {}
    for i in np.flatnonzero(fault_index).tolist():
        reasons[i] = _fault_reason(
            STATELESS_FAULTS[fault_index[i] - 1],
            TYPE_ORDER[type_index[i]],
            float(primary[i]),
            float(flow[i]),
            int(event_us[i]),
            int(references[i]),
            rules,
        )
    for i, letter in dead.items():
        status[i] = 2
        fault_index[i] = 0
        reasons[i] = letter.detail
    return Classified(
        status=status,
        device_id=device_ids,
        type_index=type_index,
        event_time_us=event_us,
        consumption=primary,
        flow_rate=flow,
        fault_index=fault_index,
        reasons=reasons,
        dead_letters={i: letter.reason for i, letter in dead.items()},
    )


def _stateless_faults(
    type_index: np.ndarray,
    event_us: np.ndarray,
    primary: np.ndarray,
    flow: np.ndarray,
    reference_us: np.ndarray,
    rules: Rules,
) -> np.ndarray:
    """:data:`STATELESS_FAULTS`, column-wise; the first rule that matches wins (int8 codes)."""
    primary_bound = np.array([rules.bounds.get(_METRIC_OF[t], np.inf) for t in TYPE_ORDER])[
        type_index
    ]
    flow_bound = rules.bounds.get(_FLOW_METRIC, np.inf)
    with np.errstate(invalid="ignore"):
        checks = [
            np.isnan(primary),
            (primary == SENTINEL_VALUE) | (flow == SENTINEL_VALUE),
            (primary < 0) | (flow < 0),
            (primary > primary_bound) | (flow > flow_bound),
            event_us > reference_us + int(rules.future_tolerance_s * 1_000_000),
        ]
    return np.select(checks, list(range(1, len(checks) + 1)), default=0).astype(np.int8)


def _fault_reason(
    fault: FaultCode,
    meter_type: MeterType,
    primary: float,
    flow: float,
    event_us: int,
    reference_us: int,
    rules: Rules,
) -> str:
    """A sentence a person on call understands, naming the field and the value."""
    metric = METER_SPECS[meter_type].metric
    if fault is FaultCode.MISSING_METRIC:
        return f"{meter_type} reading without {metric}"
    if fault is FaultCode.FUTURE_TIMESTAMP:
        return f"timestamp {(event_us - reference_us) / 1e6:.0f} s ahead of ingestion"
    for name, value in ((metric, primary), (_FLOW_METRIC, flow)):
        bound = rules.bounds.get(name, np.inf)
        if fault is FaultCode.SENTINEL and value == SENTINEL_VALUE:
            return f"{name} is {SENTINEL_VALUE}: the meter reports a fault"
        if fault is FaultCode.NEGATIVE and value < 0:
            return f"{name} is negative ({value:g})"
        if fault is FaultCode.OUT_OF_RANGE and value > bound:
            return f"{name} {value:g} is above the physical bound {bound:g}"
    return str(fault)


def evaluate(raw: bytes | None, reference_us: int, rules: Rules = _DEFAULT_RULES) -> Outcome:
    """Classify one message (a batch of one through :func:`classify`)."""
    result = classify([raw], [reference_us], rules)
    if 0 in result.dead_letters:
        return DeadLetter(result.dead_letters[0], result.reasons[0])
    device_id = result.device_id[0]
    assert raw is not None and device_id is not None  # both present unless a dead letter
    consumption, flow = float(result.consumption[0]), float(result.flow_rate[0])
    return Reading(
        device_id,
        result.meter_type(0),
        int(result.event_time_us[0]),
        None if np.isnan(consumption) else consumption,
        None if np.isnan(flow) else flow,
        result.fault_code(0),
        result.reasons.get(0),
        json.loads(raw),
    )


def event_id(topic: str, generation: str, partition: int, offset: int) -> str:
    """The id of an abnormal event: its source coordinates, so sinks can upsert idempotently.

    ``generation`` is the topic's Kafka topic id: offsets restart at 0 when a topic is
    recreated (or a broker comes back empty), and the new events must not collide with
    the old ones. A retried batch makes the same ids.
    """
    return f"{topic}-{generation}-{partition}-{offset}"


def abnormal_event(
    reading: Reading,
    topic: str,
    generation: str,
    partition: int,
    offset: int,
    detected_at_us: int,
) -> AbnormalEvent:
    """The event published on ``iot-abnormal`` for an abnormal reading."""
    return AbnormalEvent(
        event_id=event_id(topic, generation, partition, offset),
        device_id=reading.device_id,
        meter_type=str(reading.meter_type),
        timestamp=format_timestamp_us(reading.event_time_us),
        fault_code=str(reading.fault_code),
        reason=reading.reason,
        reading=reading.fields,
        detected_at=format_timestamp_us(detected_at_us),
        source=EventSource(topic=topic, generation=generation, partition=partition, offset=offset),
    )


def status_of(outcome: Outcome) -> Status:
    if isinstance(outcome, DeadLetter):
        return Status.DEADLETTER
    return Status.VALID if outcome.fault_code is None else Status.ABNORMAL


def meter_status_update(
    device_id: str,
    meter_type: str,
    last_seen_us: int,
    last_value: float | None,
    last_fault_code: str | None,
    readings: int,
    faults: int,
    trailing_faults: int,
) -> StatusUpdate:
    """The update published on ``iot-meter-status`` for one meter and micro-batch.

    See :class:`meterflow.core.messages.StatusUpdate` for what the fields mean.
    """
    return StatusUpdate(
        device_id=device_id,
        meter_type=meter_type,
        last_seen=format_timestamp_us(last_seen_us),
        last_value=last_value,
        last_fault_code=last_fault_code,
        readings=readings,
        faults=faults,
        trailing_faults=trailing_faults,
    )
