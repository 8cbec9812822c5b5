"""What the sink checks beyond the wire schema before MongoDB gets a message.

:func:`meterflow.core.messages.decode` checks the shape and types (the one definition the
stream encodes with); the sink adds what only storage cares about: timestamps it can turn
into BSON dates, and field names MongoDB accepts in an update. A message failing either is
an :class:`~meterflow.core.messages.UndecodableError` and becomes a dead letter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from meterflow.core.contract import parse_timestamp_us
from meterflow.core.messages import (
    AbnormalEvent,
    DeadLetterReason,
    StatusUpdate,
    UndecodableError,
    decode,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def millis(moment: datetime) -> datetime:
    """Truncated to milliseconds, BSON's precision: a re-read value compares equal."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def stored_time(value: str, name: str = "timestamp") -> datetime:
    """An ISO-8601 field as the date MongoDB stores, or ``BAD_TIMESTAMP``."""
    try:
        micros = parse_timestamp_us(value)
    except ValueError:
        raise UndecodableError(
            DeadLetterReason.BAD_TIMESTAMP, f"unparseable {name} {value[:64]!r}"
        ) from None
    return millis(_EPOCH + timedelta(microseconds=micros))


def _check_storable(value: Any, path: str = "") -> None:
    """MongoDB refuses field names that start with ``$`` or hold a dot or NUL in updates."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key.startswith("$") or "." in key or "\0" in key:
                raise UndecodableError(
                    DeadLetterReason.WRONG_TYPE, f"field name {path + key!r} cannot be stored"
                )
            _check_storable(inner, f"{path}{key}.")
    elif isinstance(value, list):
        for inner in value:
            _check_storable(inner, path)


def decode_abnormal(raw: bytes | None) -> AbnormalEvent:
    """An ``iot-abnormal`` message MongoDB can store, or :class:`UndecodableError`."""
    event = decode(raw, AbnormalEvent)
    stored_time(event.timestamp, "timestamp")
    stored_time(event.detected_at, "detected_at")
    _check_storable(event.reading or {}, "reading.")
    return event


def decode_status(raw: bytes | None) -> StatusUpdate:
    """An ``iot-meter-status`` message the writer can fold, or :class:`UndecodableError`."""
    update = decode(raw, StatusUpdate)
    stored_time(update.last_seen, "last_seen")
    return update


def event_document(event: AbnormalEvent) -> dict[str, Any]:
    """The ``abnormal_readings`` document of a decoded event (``_id`` is its event id)."""
    source = event.source
    return {
        "_id": event.event_id,
        "event_id": event.event_id,
        "device_id": event.device_id,
        "meter_type": event.meter_type,
        "timestamp": stored_time(event.timestamp),
        "fault_code": event.fault_code,
        "reason": event.reason,
        "reading": event.reading,
        "detected_at": stored_time(event.detected_at, "detected_at"),
        "source": None
        if source is None
        else {
            "topic": source.topic,
            "generation": source.generation,
            "partition": source.partition,
            "offset": source.offset,
        },
    }
