"""Messages for the sink tests, built with the contract's own functions, and what the
tests check in MongoDB (tests/unit/test_sink.py, tests/integration/test_sink_kafka.py)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from meterflow.clients import mongo
from meterflow.core import classifier, contract, messages, timestamps
from meterflow.core.events import abnormal_event, meter_status_update
from meterflow.stream.detection.rules import episode_id

START_US = timestamps.parse_timestamp_us("2024-05-27T00:00:00Z")
DETECTED_US = timestamps.parse_timestamp_us("2026-11-20T12:00:00.123456Z")
INTERVAL_S = 900
GENERATION = "a-topic-id"  # the source topic's Kafka topic id, part of every event id


# -- building messages with the contract's own functions ------------------------------


def event_json(device: str, offset: int, minute: int, value: float = -1) -> bytes:
    """An abnormal event exactly as the streaming job publishes it."""
    raw = json.dumps(
        {
            "device_id": device,
            "timestamp": timestamps.format_timestamp_us(START_US + minute * 60_000_000),
            "usage_kwh": value,
        }
    ).encode()
    reading = classifier.evaluate(raw, START_US + 10**12)
    assert isinstance(reading, classifier.Reading) and reading.fault_code is not None
    event = abnormal_event(reading, "iot-meter", GENERATION, offset % 3, offset, DETECTED_US)
    return messages.encode(event)


def episode_json(
    device: str,
    code: str,
    start_minute: int,
    action: str,
    at_minute: int,
    reason: str = "",
    value: float | None = 1.5,
    **overrides: Any,
) -> bytes:
    """A stateful rule's episode opening or clearing, as the detector publishes it."""
    start_us = START_US + start_minute * 60_000_000
    episode = messages.Episode(
        id=episode_id(device, contract.FaultCode(code), start_us),
        action=action,
        start=timestamps.format_timestamp_us(start_us),
    )
    event = messages.AbnormalEvent(
        event_id=f"{episode.id}|{action}",
        device_id=device,
        meter_type="electricity",
        timestamp=timestamps.format_timestamp_us(START_US + at_minute * 60_000_000),
        fault_code=code,
        reason=reason or f"{code} {action}",
        reading=None if value is None else {"value": value},
        detected_at=timestamps.format_timestamp_us(DETECTED_US),
        episode=episode,
    )
    if not overrides:
        return messages.encode(event)
    return json.dumps({**json.loads(messages.encode(event)), **overrides}).encode()


def at_minute(minute: int) -> datetime:
    return datetime.fromtimestamp(START_US / 1e6 + minute * 60, UTC)


def status_json(device: str, flags: list[bool], first_index: int) -> bytes:
    """The status update of one micro-batch of a meter's readings (True = faulty)."""
    trailing = 0
    for faulty in reversed(flags):
        if not faulty:
            break
        trailing += 1
    last_us = START_US + (first_index + len(flags) - 1) * INTERVAL_S * 1_000_000
    update = meter_status_update(
        device,
        "electricity",
        last_us,
        -1.0 if flags[-1] else 1.5,
        "SENTINEL" if flags[-1] else None,
        len(flags),
        sum(flags),
        trailing,
    )
    return messages.encode(update)


def status_batches(flags: list[bool], sizes: Iterable[int]) -> list[tuple[int, list[bool]]]:
    """Split a meter's reading sequence into micro-batches (first index, flags)."""
    batches, start = [], 0
    for size in sizes:
        if start >= len(flags):
            break
        batches.append((start, flags[start : start + size]))
        start += size
    if start < len(flags):
        batches.append((start, flags[start:]))
    return batches


def true_run(flags: list[bool]) -> tuple[int, int | None]:
    """Length of the trailing run of faults and the index of its first reading."""
    run = 0
    for faulty in reversed(flags):
        if not faulty:
            break
        run += 1
    return run, (len(flags) - run if run else None)


def at_index(index: int) -> datetime:
    return datetime.fromtimestamp(START_US / 1e6 + index * INTERVAL_S, UTC)


def expected_events(values: Iterable[bytes]) -> dict[str, dict[str, Any]]:
    """Unique events by id, decoded with the standard library (not the sink's decoder)."""
    return {json.loads(v)["event_id"]: json.loads(v) for v in values}


def assert_events_stored(db: Any, events: dict[str, dict[str, Any]]) -> None:
    stored = {doc["_id"]: doc for doc in db[mongo.ABNORMAL_READINGS].find()}
    assert set(stored) == set(events)
    for event_id, event in events.items():
        doc = stored[event_id]
        for name in ("event_id", "device_id", "meter_type", "fault_code", "reason", "reading"):
            assert doc[name] == event[name]
        assert doc["source"] == event["source"]
        timestamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert doc["timestamp"].replace(tzinfo=UTC) == timestamp
        detected = datetime.fromisoformat(event["detected_at"].replace("Z", "+00:00"))
        assert abs(doc["detected_at"].replace(tzinfo=UTC) - detected) < timedelta(milliseconds=1)
        assert doc["counted"] is True
    per_device = Counter(e["device_id"] for e in events.values())
    for device, count in per_device.items():
        status = db[mongo.METER_STATUS].find_one({"_id": device})
        assert status["fault_count"] == count, device
        assert not status.get("pending_fault_ids")


GOOD_EVENT = json.loads(event_json("em1", 7, 0))


class SimulatedCrashError(RuntimeError):
    """The process dies here: nothing after this point happens."""


class CrashingDatabase:
    """Lets bulk writes through until call ``crash_on`` (1-based), which applies only its
    first ``keep`` operations and then dies."""

    def __init__(self, db: Any, crash_on: int, keep: int) -> None:
        self.db, self.crash_on, self.keep, self.calls = db, crash_on, keep, 0

    def __getitem__(self, name: str) -> Any:
        return _CrashingCollection(self, self.db[name])


class _CrashingCollection:
    def __init__(self, owner: CrashingDatabase, collection: Any) -> None:
        self.owner, self.collection = owner, collection

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)

    def bulk_write(self, operations: list, **options: Any) -> Any:
        self.owner.calls += 1
        if self.owner.calls != self.owner.crash_on:
            return self.collection.bulk_write(operations, **options)
        if self.owner.keep:
            self.collection.bulk_write(operations[: self.owner.keep], **options)
        raise SimulatedCrashError(f"crash in bulk write {self.owner.calls}")
