"""What the sink checks beyond the wire schema before MongoDB gets a message.

:func:`meterflow.core.messages.decode` checks the shape and types (the one definition the
stream encodes with); the sink adds what only storage cares about: timestamps it can turn
into BSON dates, field names MongoDB accepts in an update, and an episode whose ids agree
with its device, code and start (the incident's ``_id`` is the episode id, so a wrong one
would open an incident no clear ever closes). A message failing any of these is an
:class:`~meterflow.core.messages.UndecodableError` and becomes a dead letter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from meterflow.core.contract import STATEFUL_FAULTS
from meterflow.core.messages import (
    AbnormalEvent,
    DeadLetterReason,
    StatusUpdate,
    UndecodableError,
    decode,
)
from meterflow.core.timestamps import parse_timestamp_us

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


_STATEFUL_CODES = frozenset(str(code) for code in STATEFUL_FAULTS)


def _check_episode(event: AbnormalEvent) -> None:
    """An episode's ids must be the ones its producer derives (docs/architecture.md,
    "Episodes in the serving layer"): the open and the clear must name one incident."""
    episode = event.episode
    if episode is None:
        return
    if event.fault_code not in _STATEFUL_CODES:
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE,
            f"episode of fault code {event.fault_code[:32]!r}, not a stateful rule's",
        )
    stored_time(episode.start, "episode.start")
    expected = f"{event.device_id}|{event.fault_code}|{parse_timestamp_us(episode.start)}"
    if episode.id != expected:
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE,
            f"episode id {episode.id[:128]!r} is not device|code|start ({expected[:128]!r})",
        )
    if event.event_id != f"{episode.id}|{episode.action}":
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE,
            f"event_id {event.event_id[:128]!r} is not the episode id and its action",
        )


def decode_abnormal(raw: bytes | None) -> AbnormalEvent:
    """An ``iot-abnormal`` message MongoDB can store, or :class:`UndecodableError`."""
    event = decode(raw, AbnormalEvent)
    stored_time(event.timestamp, "timestamp")
    stored_time(event.detected_at, "detected_at")
    _check_storable(event.reading or {}, "reading.")
    _check_episode(event)
    return event


def decode_status(raw: bytes | None) -> StatusUpdate:
    """An ``iot-meter-status`` message the writer can fold, or :class:`UndecodableError`."""
    update = decode(raw, StatusUpdate)
    stored_time(update.last_seen, "last_seen")
    return update


def event_document(event: AbnormalEvent) -> dict[str, Any]:
    """The ``abnormal_readings`` document of a decoded event (``_id`` is its event id).

    An episode's opening also names its episode, the ``_id`` of its incident.
    """
    source = event.source
    episode = event.episode
    document: dict[str, Any] = {
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
    if episode is not None:
        document["episode"] = {
            "id": episode.id,
            "action": episode.action,
            "start": stored_time(episode.start, "episode.start"),
        }
    return document
