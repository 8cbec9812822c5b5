"""The reading contract's vocabulary: topic names, meter types and their fields, fault codes.

Everything that produces, checks or stores readings names these from here: the simulator,
the replay tool, the Spark jobs, the sink and the tests. A message on ``iot-meter`` is a
UTF-8 JSON object keyed by ``device_id``::

    {"device_id": "em1", "timestamp": "2024-05-27T16:00:00Z", "usage_kwh": 9}
    {"device_id": "wm1", "timestamp": "2024-05-27T16:00:00Z", "usage": 18, "flow_rate": 5}
    {"device_id": "gm1", "timestamp": "2024-05-27T16:00:00Z", "register_m3": 18234.561}

A reading's timestamp is the *end* of the interval it measures (interval ending, as a
register read or a DLMS load profile): its usage, or its register's difference from the
previous reading, belongs to the interval before it, so the 00:00 reading closes the
previous day. A meter sends its interval usage (``usage_kwh``, ``usage``, ``usage_m3``), its
cumulative register (``register_kwh``, ``register_l``, ``register_m3``), or both.

Every message ends in exactly one of three outcomes (:class:`Status`): a valid reading, an
abnormal reading (with a :class:`FaultCode`), or a dead letter (with a
:class:`~meterflow.core.messages.DeadLetterReason`). The rules that decide are in
:mod:`meterflow.core.classifier`, their limits in :mod:`meterflow.core.thresholds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

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
    """What a meter type sends: its id prefix, main metric (the interval's usage), its
    cumulative register, their unit, and extra metrics."""

    meter_type: MeterType
    id_prefix: str
    metric: str
    register: str
    unit: str
    extra_metrics: tuple[str, ...] = ()
    #: Physical upper bound per reading for the main metric and each extra metric.
    default_bounds: dict[str, float] = field(default_factory=dict)


METER_SPECS: dict[MeterType, MeterSpec] = {
    MeterType.ELECTRICITY: MeterSpec(
        MeterType.ELECTRICITY, "em", "usage_kwh", "register_kwh", "kWh", (), {"usage_kwh": 100.0}
    ),
    MeterType.WATER: MeterSpec(
        MeterType.WATER,
        "wm",
        "usage",
        "register_l",
        "L",
        ("flow_rate",),
        {"usage": 10_000.0, "flow_rate": 500.0},
    ),
    MeterType.GAS: MeterSpec(
        MeterType.GAS, "gm", "usage_m3", "register_m3", "m3", (), {"usage_m3": 100.0}
    ),
}

#: Which metric field names reveal which meter type (used when ``meter_type`` is absent).
METRIC_TO_TYPE: dict[str, MeterType] = {
    name: spec.meter_type
    for spec in METER_SPECS.values()
    for name in (spec.metric, spec.register, *spec.extra_metrics)
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


#: Index orders of the column-wise classifier's int8 codes (and of the lake's columns).
STATUS_ORDER: tuple[Status, ...] = (Status.VALID, Status.ABNORMAL, Status.DEADLETTER)
TYPE_ORDER: tuple[MeterType, ...] = tuple(METER_SPECS)


def infer_meter_type(present_metrics: Sequence[str], device_id: str) -> MeterType | None:
    """The type the metric fields reveal, else the one the id prefix names (em/wm/gm)."""
    found = {METRIC_TO_TYPE[name] for name in present_metrics}
    by_prefix = PREFIX_TO_TYPE.get(device_id[:2].lower())
    if len(found) == 1:
        return found.pop()
    if not found:
        return by_prefix
    return by_prefix if by_prefix in found else None
