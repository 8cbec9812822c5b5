"""The events the stream publishes, built from what it classified: ids and wire messages."""

from __future__ import annotations

from meterflow.core.classifier import Reading
from meterflow.core.messages import AbnormalEvent, EventSource, StatusUpdate
from meterflow.core.timestamps import format_timestamp_us


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
