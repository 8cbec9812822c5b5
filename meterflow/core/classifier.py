"""The stateless rules: decode a message and classify it as valid, abnormal or a dead letter.

The rules are plain Python (msgspec to decode, numpy column-wise) so that the Spark
streaming job, the pure-Python baseline and the tests apply *the same code*.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
import numpy as np
from msgspec import UNSET

from meterflow.core import messages
from meterflow.core.contract import (
    ALL_METRICS,
    METER_SPECS,
    SENTINEL_VALUE,
    STATELESS_FAULTS,
    TYPE_ORDER,
    FaultCode,
    MeterType,
    Status,
    infer_meter_type,
)
from meterflow.core.messages import DeadLetterReason, ReadingMessage
from meterflow.core.thresholds import Rules
from meterflow.core.timestamps import parse_timestamp_us


class Reading(NamedTuple):
    """A decoded message that is a reading (valid or abnormal)."""

    device_id: str
    meter_type: MeterType
    event_time_us: int  # microseconds since the epoch, UTC
    consumption: float | None  # the type's main metric (the interval's usage), in its unit
    flow_rate: float | None  # water only
    register: float | None  # the cumulative register, in the type's unit
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
    register: np.ndarray  # float64, the cumulative register; NaN when absent
    flow_rate: np.ndarray  # float64, NaN when absent
    fault_index: np.ndarray  # int8, 0 = none, k = STATELESS_FAULTS[k - 1]
    reasons: dict[int, str]  # fault reason, or dead-letter detail
    dead_letters: dict[int, DeadLetterReason]

    def meter_type(self, i: int) -> MeterType:
        return TYPE_ORDER[int(self.type_index[i])]

    def fault_code(self, i: int) -> FaultCode | None:
        code = int(self.fault_index[i])
        return STATELESS_FAULTS[code - 1] if code else None


_TYPE_INDEX = {t: i for i, t in enumerate(TYPE_ORDER)}
_METRIC_OF = {t: spec.metric for t, spec in METER_SPECS.items()}
_REGISTER_OF = {t: spec.register for t, spec in METER_SPECS.items()}


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
    register = np.full(count, np.nan)
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
        value = getattr(wire, _REGISTER_OF[meter_type])
        if value is not None and value is not UNSET:
            register[i] = value
        if meter_type is water:
            rate = wire.flow_rate
            if rate is not None and rate is not UNSET:
                flow[i] = rate

    references = np.asarray(reference_us, dtype=np.int64)
    fault_index = _stateless_faults(
        type_index, event_us, primary, register, flow, references, rules
    )
    status = np.where(fault_index > 0, 1, 0).astype(np.int8)
    reasons: dict[int, str] = {}
    for i in np.flatnonzero(fault_index).tolist():
        reasons[i] = _fault_reason(
            STATELESS_FAULTS[fault_index[i] - 1],
            TYPE_ORDER[type_index[i]],
            float(primary[i]),
            float(register[i]),
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
        register=register,
        flow_rate=flow,
        fault_index=fault_index,
        reasons=reasons,
        dead_letters={i: letter.reason for i, letter in dead.items()},
    )


def _stateless_faults(
    type_index: np.ndarray,
    event_us: np.ndarray,
    primary: np.ndarray,
    register: np.ndarray,
    flow: np.ndarray,
    reference_us: np.ndarray,
    rules: Rules,
) -> np.ndarray:
    """:data:`STATELESS_FAULTS`, column-wise; the first rule that matches wins (int8 codes).

    A reading needs its usage or its register (MISSING_METRIC otherwise). A register has no
    upper bound here: its size says nothing until the daily validation compares it with the
    meter's previous one (docs/architecture.md, "Validated consumption").
    """
    primary_bound = np.array([rules.bounds.get(_METRIC_OF[t], np.inf) for t in TYPE_ORDER])[
        type_index
    ]
    flow_bound = rules.bounds.get(_FLOW_METRIC, np.inf)
    with np.errstate(invalid="ignore"):
        checks = [
            np.isnan(primary) & np.isnan(register),
            (primary == SENTINEL_VALUE) | (register == SENTINEL_VALUE) | (flow == SENTINEL_VALUE),
            (primary < 0) | (register < 0) | (flow < 0),
            (primary > primary_bound) | (flow > flow_bound),
            event_us > reference_us + int(rules.future_tolerance_s * 1_000_000),
        ]
    return np.select(checks, list(range(1, len(checks) + 1)), default=0).astype(np.int8)


def _fault_reason(
    fault: FaultCode,
    meter_type: MeterType,
    primary: float,
    register: float,
    flow: float,
    event_us: int,
    reference_us: int,
    rules: Rules,
) -> str:
    """A sentence a person on call understands, naming the field and the value."""
    spec = METER_SPECS[meter_type]
    metric = spec.metric
    if fault is FaultCode.MISSING_METRIC:
        return f"{meter_type} reading without {metric} or {spec.register}"
    if fault is FaultCode.FUTURE_TIMESTAMP:
        return f"timestamp {(event_us - reference_us) / 1e6:.0f} s ahead of ingestion"
    for name, value in ((metric, primary), (spec.register, register), (_FLOW_METRIC, flow)):
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
    register = float(result.register[0])
    return Reading(
        device_id,
        result.meter_type(0),
        int(result.event_time_us[0]),
        None if np.isnan(consumption) else consumption,
        None if np.isnan(flow) else flow,
        None if np.isnan(register) else register,
        result.fault_code(0),
        result.reasons.get(0),
        json.loads(raw),
    )


def status_of(outcome: Outcome) -> Status:
    if isinstance(outcome, DeadLetter):
        return Status.DEADLETTER
    return Status.VALID if outcome.fault_code is None else Status.ABNORMAL
