"""The reading contract, table-driven: every message has exactly one outcome."""

from __future__ import annotations

import json

import msgspec
import pytest

from meterflow.core import classifier, contract, thresholds, timestamps
from meterflow.core.classifier import DeadLetter, Reading, classify, evaluate
from meterflow.core.contract import FaultCode, MeterType, Status
from meterflow.core.events import abnormal_event
from meterflow.core.messages import DeadLetterReason
from meterflow.core.thresholds import Rules

NOW = timestamps.parse_timestamp_us("2024-05-28T00:00:00Z")
# The prototype's exact messages (README, "The reading contract") must be accepted unchanged.
PROTOTYPE_ELECTRICITY = b'{"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 9}'
PROTOTYPE_WATER = (
    b'{"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 18, "flow_rate": 5}'
)


def msg(**fields: object) -> bytes:
    base = {"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z"}
    return json.dumps({**base, **fields}).encode()


READINGS = [
    # (id, raw, meter type, fault code or None)
    ("prototype electricity", PROTOTYPE_ELECTRICITY, MeterType.ELECTRICITY, None),
    ("prototype water", PROTOTYPE_WATER, MeterType.WATER, None),
    ("prototype sentinel", msg(usage_kwh=-1), MeterType.ELECTRICITY, FaultCode.SENTINEL),
    (
        "water flow sentinel",
        msg(device_id="wm1", usage=3, flow_rate=-1),
        MeterType.WATER,
        FaultCode.SENTINEL,
    ),
    ("gas", msg(device_id="gm7", usage_m3=0.4), MeterType.GAS, None),
    (
        "declared type wins over prefix",
        msg(device_id="x9", meter_type="gas", usage_m3=1),
        MeterType.GAS,
        None,
    ),
    ("type from metric field", msg(device_id="house-3", usage_kwh=2), MeterType.ELECTRICITY, None),
    ("zero is a valid reading", msg(usage_kwh=0), MeterType.ELECTRICITY, None),
    ("float value", msg(usage_kwh=0.125), MeterType.ELECTRICITY, None),
    (
        "naive timestamp is UTC",
        msg(timestamp="2024-05-27T15:57:53", usage_kwh=1),
        MeterType.ELECTRICITY,
        None,
    ),
    (
        "offset timestamp",
        msg(timestamp="2024-05-27T17:57:53+02:00", usage_kwh=1),
        MeterType.ELECTRICITY,
        None,
    ),
    ("negative", msg(usage_kwh=-0.5), MeterType.ELECTRICITY, FaultCode.NEGATIVE),
    (
        "negative flow",
        msg(device_id="wm1", usage=1, flow_rate=-3),
        MeterType.WATER,
        FaultCode.NEGATIVE,
    ),
    ("above bound", msg(usage_kwh=100.5), MeterType.ELECTRICITY, FaultCode.OUT_OF_RANGE),
    ("bound itself is fine", msg(usage_kwh=100), MeterType.ELECTRICITY, None),
    (
        "flow above bound",
        msg(device_id="wm1", usage=1, flow_rate=501),
        MeterType.WATER,
        FaultCode.OUT_OF_RANGE,
    ),
    ("missing metric, type from prefix", msg(), MeterType.ELECTRICITY, FaultCode.MISSING_METRIC),
    ("null metric", msg(usage_kwh=None), MeterType.ELECTRICITY, FaultCode.MISSING_METRIC),
    (
        "water without usage",
        msg(device_id="wm2", flow_rate=2),
        MeterType.WATER,
        FaultCode.MISSING_METRIC,
    ),
    (
        "register only",
        msg(device_id="gm3", register_m3=18234.561),
        MeterType.GAS,
        None,
    ),
    (
        "usage and register",
        msg(usage_kwh=0.25, register_kwh=99999.75),
        MeterType.ELECTRICITY,
        None,
    ),
    ("type from register field", msg(device_id="w-3", register_l=12), MeterType.WATER, None),
    ("register of zero", msg(register_kwh=0), MeterType.ELECTRICITY, None),
    ("negative register", msg(register_kwh=-2), MeterType.ELECTRICITY, FaultCode.NEGATIVE),
    ("sentinel register", msg(register_kwh=-1), MeterType.ELECTRICITY, FaultCode.SENTINEL),
    (
        "a large register is no fault of its own",
        msg(device_id="wm2", register_l=9_999_999.5),
        MeterType.WATER,
        None,
    ),
    (
        "null register, no usage",
        msg(register_kwh=None),
        MeterType.ELECTRICITY,
        FaultCode.MISSING_METRIC,
    ),
    (
        "future",
        msg(timestamp="2024-05-29T00:00:00Z", usage_kwh=1),
        MeterType.ELECTRICITY,
        FaultCode.FUTURE_TIMESTAMP,
    ),
    (
        "sentinel beats future",
        msg(timestamp="2030-01-01T00:00:00Z", usage_kwh=-1),
        MeterType.ELECTRICITY,
        FaultCode.SENTINEL,
    ),
    (
        "within future tolerance",
        msg(timestamp="2024-05-28T00:04:00Z", usage_kwh=1),
        MeterType.ELECTRICITY,
        None,
    ),
    (
        "extra fields are kept, not judged",
        msg(usage_kwh=1, firmware="1.2"),
        MeterType.ELECTRICITY,
        None,
    ),
]

DEAD_LETTERS = [
    ("null value", None, DeadLetterReason.EMPTY),
    ("empty value", b"", DeadLetterReason.EMPTY),
    ("oversize", msg(usage_kwh=1, pad="x" * 20_000), DeadLetterReason.OVERSIZE),
    ("not json", b"usage=9", DeadLetterReason.NOT_JSON),
    ("truncated json", PROTOTYPE_ELECTRICITY[:-3], DeadLetterReason.NOT_JSON),
    (
        "not utf-8",
        b'{"device_id": "em\xff", "timestamp": "2024-05-27T15:57:53Z"}',
        DeadLetterReason.NOT_JSON,
    ),
    ("array", b"[1, 2]", DeadLetterReason.NOT_OBJECT),
    ("number", b"42", DeadLetterReason.NOT_OBJECT),
    (
        "no device_id",
        b'{"timestamp": "2024-05-27T15:57:53Z", "usage_kwh": 1}',
        DeadLetterReason.MISSING_FIELD,
    ),
    ("no timestamp", b'{"device_id": "em1", "usage_kwh": 1}', DeadLetterReason.MISSING_FIELD),
    ("null device_id", msg(device_id=None, usage_kwh=1), DeadLetterReason.MISSING_FIELD),
    ("numeric device_id", msg(device_id=7, usage_kwh=1), DeadLetterReason.WRONG_TYPE),
    ("empty device_id", msg(device_id="", usage_kwh=1), DeadLetterReason.WRONG_TYPE),
    ("metric as string", msg(usage_kwh="9"), DeadLetterReason.WRONG_TYPE),
    ("metric as bool", msg(usage_kwh=True), DeadLetterReason.WRONG_TYPE),
    ("epoch timestamp", msg(timestamp=1716825473, usage_kwh=1), DeadLetterReason.WRONG_TYPE),
    ("bad timestamp", msg(timestamp="yesterday", usage_kwh=1), DeadLetterReason.BAD_TIMESTAMP),
    ("unknown type", msg(meter_type="heat", usage_kwh=1), DeadLetterReason.UNKNOWN_METER_TYPE),
    ("no type evidence", msg(device_id="sensor-1"), DeadLetterReason.UNKNOWN_METER_TYPE),
    ("register as string", msg(register_kwh="12.5"), DeadLetterReason.WRONG_TYPE),
    (
        "usage and register of two types",
        msg(device_id="x1", usage_kwh=1, register_m3=1),
        DeadLetterReason.UNKNOWN_METER_TYPE,
    ),
    (
        "conflicting metrics",
        msg(device_id="x1", usage_kwh=1, usage_m3=1),
        DeadLetterReason.UNKNOWN_METER_TYPE,
    ),
]


@pytest.mark.parametrize(
    ("raw", "meter_type", "fault"), [r[1:] for r in READINGS], ids=[r[0] for r in READINGS]
)
def test_reading_outcomes(raw: bytes, meter_type: MeterType, fault: FaultCode | None) -> None:
    outcome = evaluate(raw, NOW)
    assert isinstance(outcome, Reading), outcome
    assert outcome.meter_type is meter_type
    assert outcome.fault_code is fault
    assert (outcome.reason is None) is (fault is None)
    assert classifier.status_of(outcome) is (Status.VALID if fault is None else Status.ABNORMAL)
    assert outcome.fields == json.loads(raw)


@pytest.mark.parametrize(
    ("raw", "reason"), [r[1:] for r in DEAD_LETTERS], ids=[r[0] for r in DEAD_LETTERS]
)
def test_dead_letter_outcomes(raw: bytes | None, reason: DeadLetterReason) -> None:
    outcome = evaluate(raw, NOW)
    assert isinstance(outcome, DeadLetter), outcome
    assert outcome.reason is reason
    assert outcome.detail  # a human-readable explanation, never empty


def test_batch_classification_matches_one_by_one() -> None:
    """The column-wise batch path and single messages give identical outcomes."""
    raws = [r[1] for r in READINGS] + [r[1] for r in DEAD_LETTERS]
    batch = classify(raws, [NOW] * len(raws))
    for i, raw in enumerate(raws):
        single = evaluate(raw, NOW)
        if isinstance(single, DeadLetter):
            assert batch.dead_letters[i] is single.reason
        else:
            assert i not in batch.dead_letters
            assert batch.meter_type(i) is single.meter_type
            assert batch.fault_code(i) is single.fault_code
            assert batch.reasons.get(i) == single.reason


def test_prototype_values_and_time() -> None:
    water = evaluate(PROTOTYPE_WATER, NOW)
    assert isinstance(water, Reading)
    assert (water.device_id, water.consumption, water.flow_rate) == ("wm1", 18.0, 5.0)
    assert timestamps.format_timestamp_us(water.event_time_us) == "2024-05-27T15:57:52Z"


def test_rules_are_configurable() -> None:
    strict = Rules(bounds={**Rules().bounds, "usage_kwh": 5.0}, future_tolerance_s=0)
    assert evaluate(msg(usage_kwh=6), NOW).fault_code is None
    assert evaluate(msg(usage_kwh=6), NOW, strict).fault_code is FaultCode.OUT_OF_RANGE
    small = Rules(max_message_bytes=64)
    assert evaluate(PROTOTYPE_WATER, NOW, small).reason is DeadLetterReason.OVERSIZE


def test_stateful_thresholds_come_from_the_environment() -> None:
    from meterflow.core.config import Settings
    from meterflow.core.errors import ConfigError

    assert Settings.from_env({}).detection == thresholds.DetectionRules()
    tuned = Settings.from_env(
        {
            "METERFLOW_STUCK_READINGS": "12",
            "METERFLOW_SPIKE_MIN_WATER": "400",
            "METERFLOW_LEAK_NIGHT_HOURS": "1-5",
            "METERFLOW_NODATA_INTERVALS": "6",
        }
    ).detection
    assert (tuned.stuck_readings, tuned.nodata_intervals) == (12, 6)
    assert tuned.spike_min[contract.MeterType.WATER] == 400
    assert (
        tuned.spike_min[contract.MeterType.GAS]
        == thresholds.DetectionRules().spike_min[contract.MeterType.GAS]
    )
    assert (tuned.leak_night_start_hour, tuned.leak_night_end_hour) == (1, 5)
    with pytest.raises(ConfigError, match="METERFLOW_LEAK_NIGHT_HOURS='2 to 4' must be two hours"):
        Settings.from_env({"METERFLOW_LEAK_NIGHT_HOURS": "2 to 4"})
    with pytest.raises(ConfigError, match="stateful rules: the leak night window"):
        Settings.from_env({"METERFLOW_LEAK_NIGHT_HOURS": "5-3"})
    with pytest.raises(ConfigError, match="stateful rules: detection levels"):
        Settings.from_env({"METERFLOW_SPIKE_MIN_GAS": "0"})


def test_fault_reasons_name_field_and_value() -> None:
    outcome = evaluate(msg(device_id="wm1", usage=3, flow_rate=612.5), NOW)
    assert outcome.reason == "flow_rate 612.5 is above the physical bound 500"
    assert "usage_kwh is -1" in evaluate(msg(usage_kwh=-1), NOW).reason
    assert evaluate(msg(register_kwh=-2.5), NOW).reason == "register_kwh is negative (-2.5)"
    missing = evaluate(msg(device_id="gm1"), NOW).reason
    assert missing == "gas reading without usage_m3 or register_m3"


def test_a_register_is_kept_with_or_without_usage() -> None:
    both = evaluate(msg(usage_kwh=0.25, register_kwh=1234.5), NOW)
    only = evaluate(msg(device_id="gm1", register_m3=18234.561), NOW)
    assert isinstance(both, Reading) and isinstance(only, Reading)
    assert (both.consumption, both.register) == (0.25, 1234.5)
    assert (only.consumption, only.register, only.fault_code) == (None, 18234.561, None)
    batch = classify([msg(register_kwh=7.0), PROTOTYPE_ELECTRICITY], [NOW, NOW])
    assert batch.register[0] == 7.0 and batch.register[1] != batch.register[1]  # NaN: absent


def test_abnormal_event_document() -> None:
    reading = evaluate(msg(usage_kwh=-1), NOW)
    event = msgspec.to_builtins(abnormal_event(reading, "iot-meter", "AaIrU8Vb", 3, 1234, NOW))
    # The topic id keeps ids unique when a recreated topic starts its offsets again.
    assert event["event_id"] == "iot-meter-AaIrU8Vb-3-1234"
    again = msgspec.to_builtins(abnormal_event(reading, "iot-meter", "Bx0qZ1Ty", 3, 1234, NOW))
    assert again["event_id"] != event["event_id"]
    assert event["fault_code"] == "SENTINEL"
    assert event["reading"] == {
        "device_id": "em1",
        "timestamp": "2024-05-27T15:57:53Z",
        "usage_kwh": -1,
    }
    assert event["source"] == {
        "topic": "iot-meter",
        "generation": "AaIrU8Vb",
        "partition": 3,
        "offset": 1234,
    }
    assert event["detected_at"] == "2024-05-28T00:00:00Z"
    json.dumps(event)  # serialisable as is


def test_every_metric_maps_to_one_type() -> None:
    for spec in contract.METER_SPECS.values():
        assert contract.PREFIX_TO_TYPE[spec.id_prefix] is spec.meter_type
        for name in (spec.metric, *spec.extra_metrics):
            assert contract.METRIC_TO_TYPE[name] is spec.meter_type
            assert name in Rules().bounds


def test_stateful_codes_are_never_given_by_the_stateless_rules() -> None:
    stateful, stateless = set(contract.STATEFUL_FAULTS), set(contract.STATELESS_FAULTS)
    assert stateful.isdisjoint(stateless) and stateful | stateless == set(FaultCode)
    assert FaultCode.NO_DATA in stateful
    # What the stateful rules look for is a valid reading on its own: a repeated value, a
    # spike below the bound, a zero.
    rules = thresholds.DetectionRules()
    for value in (0, 3.5, rules.spike_min[MeterType.ELECTRICITY] * 20):
        assert evaluate(msg(usage_kwh=value), NOW).fault_code is None


def test_detection_rules_defaults_and_checks() -> None:
    rules = thresholds.DetectionRules()
    assert (rules.stuck_readings, rules.spike_factor, rules.nodata_intervals) == (8, 10.0, 4)
    assert rules.stuck_duration_s(900) == 7200 and rules.nodata_after_s(900) == 3600
    assert rules.in_leak_night(2.0) and rules.in_leak_night(3.99) and not rules.in_leak_night(4)
    assert set(rules.spike_min) == set(rules.stuck_min) == set(MeterType)
    for meter_type, level in rules.spike_min.items():  # a spike can be valid to the contract
        assert level < Rules().bounds[contract.METER_SPECS[meter_type].metric]
    with pytest.raises(ValueError, match="stuck_readings"):
        thresholds.DetectionRules(stuck_readings=1)
    with pytest.raises(ValueError, match="night window"):
        thresholds.DetectionRules(leak_night_hours=(4, 2))
    with pytest.raises(ValueError, match="above 0"):
        thresholds.DetectionRules(leak_min_night_flow=0)
