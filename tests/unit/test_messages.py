"""The wire messages (meterflow.core.messages): one definition that producers encode with and
consumers decode with, so what the stream publishes is exactly what the sink accepts."""

from __future__ import annotations

import json

import msgspec
import pytest
from helpers import kafka_records

from meterflow.core import contract, messages, thresholds, timestamps
from meterflow.core.events import event_id, meter_status_update
from meterflow.core.messages import (
    AbnormalEvent,
    DeadLetterMessage,
    DeadLetterReason,
    ReadingMessage,
    StatusUpdate,
    UndecodableError,
    decode,
    encode,
)
from meterflow.stream.classify import classify_batch, status_updates
from simulator.faults import FaultRates
from simulator.generator import SimulationConfig, simulate

NOW = timestamps.parse_timestamp_us("2024-05-28T00:00:00Z")


def test_reading_fields_are_the_contracts_metrics() -> None:
    names = [f.name for f in msgspec.structs.fields(ReadingMessage)]
    assert names[:3] == ["device_id", "timestamp", "meter_type"]
    assert sorted(names[3:]) == sorted(contract.ALL_METRICS)


def test_simulator_bytes_are_reading_messages() -> None:
    """The simulator's fast f-string path writes the one definition, field for field."""
    sent: list[bytes] = []
    config = SimulationConfig(meters=30, days=0.05, seed=3, faults=FaultRates.none())
    simulate(config, lambda _key, value: sent.append(value))
    assert sent
    for raw in sent:
        decoded = decode(raw, ReadingMessage)
        assert decoded == msgspec.convert(json.loads(raw), ReadingMessage)
        assert json.loads(encode(decoded)) == json.loads(raw)


def _classified(values: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    import pyarrow as pa

    batch = kafka_records(list(values), NOW)
    result = classify_batch(batch, thresholds.Rules(), generation="gen1", now_us=NOW)
    events = [value for _key, value in result.abnormal_events]
    updates = [value for _key, value in status_updates(pa.Table.from_batches([result.classified]))]
    return events, updates


def test_what_the_stream_publishes_decodes_as_the_same_message() -> None:
    readings = [
        b'{"device_id": "em1", "timestamp": "2024-05-27T15:57:53Z", "usage_kwh": -1}',
        b'{"device_id": "em1", "timestamp": "2024-05-27T16:12:53Z", "usage_kwh": 2.5}',
        b'{"device_id": "wm1", "timestamp": "2024-05-27T15:57:52Z", "usage": 9, "flow_rate": 900}',
    ]
    events, updates = _classified(readings)
    assert len(events) == 2 and len(updates) == 2
    for raw in events:
        event = decode(raw, AbnormalEvent)
        assert encode(event) == raw  # decoding and re-encoding changes nothing
        assert event.source is not None and event.source.generation == "gen1"
        assert event.event_id == event_id("iot-meter", "gen1", 0, event.source.offset)
    by_device = {u.device_id: u for u in (decode(raw, StatusUpdate) for raw in updates)}
    assert by_device["em1"].last_fault_code is None and by_device["em1"].faults == 1
    assert by_device["wm1"].last_fault_code == "OUT_OF_RANGE"
    assert by_device["wm1"].trailing_faults == 1


def test_a_producer_cannot_build_an_inconsistent_status_update() -> None:
    with pytest.raises(ValueError, match="trailing_faults"):
        meter_status_update("em1", "electricity", NOW, 1.0, "SENTINEL", 2, 1, 2)
    with pytest.raises(ValueError, match="not finite"):
        meter_status_update("em1", "electricity", NOW, float("nan"), None, 1, 0, 0)


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b'{"device_id": "wm1"}', DeadLetterReason.MISSING_FIELD, "missing timestamp"),
        (b'{"usage": 1}', DeadLetterReason.MISSING_FIELD, "missing device_id, timestamp"),
        (b'{"device_id": "", "timestamp": "x"}', DeadLetterReason.WRONG_TYPE, "length >= 1"),
        (b'{"device_id": "w", "timestamp": 5}', DeadLetterReason.WRONG_TYPE, "$.timestamp"),
        (
            b'{"device_id": "w", "timestamp": "t", "usage": NaN}',
            DeadLetterReason.WRONG_TYPE,
            "malformed",
        ),
        (b'"w"', DeadLetterReason.NOT_OBJECT, "JSON str"),
        (b"{", DeadLetterReason.NOT_JSON, "not UTF-8 JSON"),
        (None, DeadLetterReason.EMPTY, "empty"),
    ],
)
def test_decoding_names_the_dead_letter_reason(
    raw: bytes | None, reason: DeadLetterReason, detail: str
) -> None:
    with pytest.raises(UndecodableError) as caught:
        decode(raw, ReadingMessage)
    assert caught.value.reason is reason
    assert detail in caught.value.detail


def test_an_empty_event_id_is_missing_not_wrong() -> None:
    raw = b'{"event_id": "", "device_id": "em1", "timestamp": "t", "fault_code": "F",'
    with pytest.raises(UndecodableError) as caught:
        decode(raw + b' "detected_at": "t"}', AbnormalEvent)
    assert (caught.value.reason, caught.value.detail) == (
        DeadLetterReason.MISSING_FIELD,
        "empty event_id",
    )


def test_dead_letter_headers_round_trip() -> None:
    letter = DeadLetterMessage(
        key=b"em1",
        value=b"\xff",
        reason=str(DeadLetterReason.NOT_JSON),
        detail="not UTF-8 JSON",
        topic="iot-meter",
        partition=2,
        offset=41,
        generation="gen1",
        stored="lake",
    )
    headers = letter.headers()
    assert dict(headers)[messages.DLQ_HEADER_STORED] == b"lake"
    assert DeadLetterMessage.from_kafka(b"em1", b"\xff", headers) == letter
    plain = msgspec.structs.replace(letter, generation="", stored="")
    names = [name for name, _ in plain.headers()]
    assert messages.DLQ_HEADER_GENERATION not in names
    assert messages.DLQ_HEADER_STORED not in names
