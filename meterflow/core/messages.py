"""The wire messages: one msgspec Struct per message, the only definition to encode and decode.

Every Kafka message meterflow writes or reads is one of these:

- :class:`ReadingMessage` on ``iot-meter`` (from meters, the simulator and the replay tool);
- :class:`AbnormalEvent` on ``iot-abnormal`` (one per abnormal reading, from the stream;
  one per opening or clearing of a stateful rule's episode, with its :class:`Episode`);
- :class:`StatusUpdate` on ``iot-meter-status`` (one per meter and micro-batch);
- :class:`ReadingDigest` on ``iot-meter-digest`` (a meter's readings of a micro-batch, for
  the stateful stage);
- :class:`DeadLetterMessage` on ``iot-deadletter``: the original key and value, with the
  reason and the source coordinates in Kafka headers.

Producers build the Struct and :func:`encode` it; consumers :func:`decode` the bytes into the
same Struct, which checks types and invariants in C (msgspec) and names what is wrong as a
:class:`DeadLetterReason`. Timestamps travel as ISO-8601 strings (the contract parses them,
so a message with an unparseable one can be named ``BAD_TIMESTAMP`` rather than refused
whole). This module sits at the bottom of ``core``: the contract builds on it.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

#: Kafka headers a dead letter carries; its value and key are the original bytes.
DLQ_HEADER_REASON = "meterflow.reason"
DLQ_HEADER_DETAIL = "meterflow.detail"
DLQ_HEADER_TOPIC = "meterflow.source.topic"
DLQ_HEADER_PARTITION = "meterflow.source.partition"
DLQ_HEADER_OFFSET = "meterflow.source.offset"
DLQ_HEADER_GENERATION = "meterflow.source.generation"
#: Set on a dead letter too large for Kafka: its value is then a JSON reference to the
#: lake file that keeps the original bytes (``deadletter/date=D/...``).
DLQ_HEADER_STORED = "meterflow.stored"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
#: A metric as a meter sends it: absent, null or a number (an int is accepted as a float).
Metric = float | None | UnsetType


class DeadLetterReason(StrEnum):
    """Why a message is not a reading (or not an event) at all."""

    EMPTY = "EMPTY"
    OVERSIZE = "OVERSIZE"
    NOT_JSON = "NOT_JSON"
    NOT_OBJECT = "NOT_OBJECT"
    MISSING_FIELD = "MISSING_FIELD"
    WRONG_TYPE = "WRONG_TYPE"
    BAD_TIMESTAMP = "BAD_TIMESTAMP"
    UNKNOWN_METER_TYPE = "UNKNOWN_METER_TYPE"


class UndecodableError(ValueError):
    """A message that cannot be decoded: why (a dead-letter reason) and a human detail."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Message(msgspec.Struct, kw_only=True):
    """Base of the wire messages: every field is written (null when empty, an UNSET one
    omitted); unknown fields are ignored when decoding, so producers can add some."""

    #: Whether an empty string in a required text field counts as missing (else wrong type).
    empty_is_missing: ClassVar[bool] = True


class ReadingMessage(Message, kw_only=True):
    """A reading on ``iot-meter``: the meter's id, when, and the metrics of its type.

    ``meter_type`` may be absent: the metric names (or the id prefix) reveal it. The metric
    fields are :data:`meterflow.core.contract.ALL_METRICS` (a unit test keeps them equal).
    """

    empty_is_missing: ClassVar[bool] = False  # an empty id is a wrong id, not a missing one

    device_id: NonEmpty
    timestamp: str
    meter_type: str | UnsetType | None = UNSET
    usage_kwh: Metric = UNSET
    register_kwh: Metric = UNSET
    usage: Metric = UNSET
    flow_rate: Metric = UNSET
    usage_m3: Metric = UNSET
    register_l: Metric = UNSET
    register_m3: Metric = UNSET


class EventSource(Message, kw_only=True):
    """Where an abnormal reading was read: its Kafka coordinates (and the topic's id)."""

    topic: str
    generation: str
    partition: int
    offset: int


class Episode(Message, kw_only=True):
    """A stateful rule's fault episode (STUCK, SPIKE, LEAK, NO_DATA) that opened or cleared.

    ``id`` is ``device|code|start`` (:func:`meterflow.stream.detection.rules.episode_id`): the same
    for the opening and the clearing, and again when a batch is retried. Both travel on
    ``iot-abnormal`` keyed by ``device_id``, so a consumer sees a meter's opening before its
    clearing (docs/architecture.md, "Stateful detection").
    """

    id: NonEmpty
    action: Literal["open", "clear"]
    start: str


class AbnormalEvent(Message, kw_only=True):
    """An ``iot-abnormal`` event: an abnormal reading, the reading as sent, and its source;
    or a stateful rule's episode opening or clearing (``episode`` set, ``source`` None).

    ``event_id`` is derived from the source coordinates (from the episode id and action for
    an episode), so a retried batch republishes the same id and the serving layer stores it
    once. ``timestamp`` is the event time of the reading (or the silence) that decided.
    """

    event_id: NonEmpty
    device_id: NonEmpty
    meter_type: str | None = None
    timestamp: str
    fault_code: NonEmpty
    reason: str | None = None
    reading: dict[str, Any] | None = None
    detected_at: str
    source: EventSource | None = None
    episode: Episode | None = None


class StatusUpdate(Message, kw_only=True):
    """An ``iot-meter-status`` update: one meter's latest reading in a micro-batch.

    ``last_*`` describe the meter's latest reading (by event time) in the batch;
    ``last_fault_code`` is None when that reading was good. ``readings`` and ``faults``
    count the batch's readings of this meter and ``trailing_faults`` how many of them, at
    the end in event-time order, were faulty in a row (equal to ``readings`` when all
    were). A consumer keeps the update with the greatest ``last_seen`` and extends its
    run of faults: ``trailing_faults == readings`` adds to the run, anything else resets
    it to ``trailing_faults``. Updates may arrive twice after a restart, so counts are
    indicative; the lake is the exact record.
    """

    device_id: NonEmpty
    meter_type: str | None = None
    last_seen: str
    last_value: float | None = None
    last_fault_code: str | None = None
    readings: int
    faults: int
    trailing_faults: int

    def __post_init__(self) -> None:
        """The invariants a consumer relies on, checked when built and when decoded."""
        if self.last_value is not None and not math.isfinite(self.last_value):
            raise ValueError("last_value is not finite")
        trailing, faults, readings = self.trailing_faults, self.faults, self.readings
        if not 0 <= trailing <= faults <= readings:
            raise ValueError(
                f"counts must satisfy 0 <= trailing_faults ({trailing}) <= faults ({faults}) "
                f"<= readings ({readings})"
            )
        if (self.last_fault_code is None) != (trailing == 0):
            raise ValueError(
                f"last_fault_code {self.last_fault_code!r} contradicts trailing_faults {trailing}"
            )


class ReadingDigest(Message, kw_only=True):
    """A meter's readings of one micro-batch, in event-time order, for the stateful stage.

    The stream's tasks publish one per meter and batch (``iot-meter-digest``, keyed by
    ``device_id``) when detection is on, so the detector neither reads ``iot-meter`` again
    nor classifies twice. Dead letters and FUTURE_TIMESTAMP readings are left out (no
    meter, or a clock that would move event time wrongly); ``faulty`` marks any other
    stateless fault. A retried batch publishes the same digests again: the detector skips
    readings not after the latest it has seen.
    """

    device_id: NonEmpty
    meter_type: str
    event_us: list[int]
    values: list[float | None]
    faulty: list[bool]
    #: A water meter's ``flow_rate`` per reading (null where it sent none); absent for the
    #: other types, and in digests written before it existed.
    flows: list[float | None] | None = None

    def __post_init__(self) -> None:
        if not len(self.event_us) == len(self.values) == len(self.faulty) > 0:
            raise ValueError("event_us, values and faulty must be as long, and not empty")
        if self.flows is not None and len(self.flows) != len(self.event_us):
            raise ValueError("flows must be as long as event_us")


class DeadLetterMessage(Message, kw_only=True):
    """A dead letter: the original key and value, why, and where it was read.

    On Kafka the reason and the source travel as headers (:meth:`headers`), so the value
    stays the original bytes for whoever repairs and replays it.
    """

    key: bytes | None
    value: bytes | None
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    generation: str = ""
    #: Where the original bytes are kept when they are too large for Kafka ("lake").
    stored: str = ""

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            (DLQ_HEADER_REASON, self.reason.encode()),
            (DLQ_HEADER_DETAIL, self.detail.encode()),
            (DLQ_HEADER_TOPIC, self.topic.encode()),
            (DLQ_HEADER_PARTITION, str(self.partition).encode()),
            (DLQ_HEADER_OFFSET, str(self.offset).encode()),
        ]
        if self.generation:
            headers.append((DLQ_HEADER_GENERATION, self.generation.encode()))
        if self.stored:
            headers.append((DLQ_HEADER_STORED, self.stored.encode()))
        return headers

    @classmethod
    def from_kafka(
        cls, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None
    ) -> DeadLetterMessage:
        """The dead letter a consumer of ``iot-deadletter`` received."""
        found = {name: raw.decode() for name, raw in headers or []}
        return cls(
            key=key,
            value=value,
            reason=found.get(DLQ_HEADER_REASON, ""),
            detail=found.get(DLQ_HEADER_DETAIL, ""),
            topic=found.get(DLQ_HEADER_TOPIC, ""),
            partition=int(found.get(DLQ_HEADER_PARTITION, -1)),
            offset=int(found.get(DLQ_HEADER_OFFSET, -1)),
            generation=found.get(DLQ_HEADER_GENERATION, ""),
            stored=found.get(DLQ_HEADER_STORED, ""),
        )


M = TypeVar("M", bound=Message)
_encoder = msgspec.json.Encoder()


def encode(message: Message) -> bytes:
    """The message as compact JSON."""
    return _encoder.encode(message)


@cache
def decoder(kind: type[M]) -> msgspec.json.Decoder[M]:
    """One reusable decoder per message type (building one costs more than decoding)."""
    return msgspec.json.Decoder(kind)


def decode(raw: bytes | None, kind: type[M]) -> M:
    """``raw`` as a ``kind``, or :class:`UndecodableError` naming the dead-letter reason."""
    if not raw:
        raise UndecodableError(DeadLetterReason.EMPTY, "empty message (null or zero-length)")
    try:
        message: M = decoder(kind).decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise diagnose(raw, exc, kind) from None
    return message


def diagnose(raw: bytes, error: Exception, kind: type[Message]) -> UndecodableError:
    """Name why msgspec refused ``raw``, using the standard library to look closer.

    msgspec stops at the first problem; the reason a person reads should name them all
    when fields are missing, and tell "not JSON" from "JSON of the wrong shape".
    """
    try:
        fields = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # includes UnicodeDecodeError
        return UndecodableError(DeadLetterReason.NOT_JSON, f"not UTF-8 JSON: {exc}")
    if type(fields) is not dict:
        return UndecodableError(
            DeadLetterReason.NOT_OBJECT, f"JSON {type(fields).__name__}, not an object"
        )
    required = [f.name for f in msgspec.structs.fields(kind) if f.required]
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        return UndecodableError(DeadLetterReason.MISSING_FIELD, f"missing {', '.join(missing)}")
    if kind.empty_is_missing:
        empty = [name for name in required if fields.get(name) == ""]
        if empty:
            return UndecodableError(DeadLetterReason.MISSING_FIELD, f"empty {', '.join(empty)}")
    return UndecodableError(DeadLetterReason.WRONG_TYPE, str(error))
