"""Filter of the Kafka message-queue trigger that wakes the incident DAG."""

from __future__ import annotations

from typing import Any

from meterflow.core.messages import AbnormalEvent, UndecodableError, decode


def abnormal_event(message: Any) -> dict[str, str] | None:
    """The (device, fault) of an ``iot-abnormal`` message, or None to keep waiting.

    The provider's trigger calls this for each message (by dotted path) and fires the
    asset event with what it returns; an undecodable message never fires it (the sink
    dead-letters those).
    """
    try:
        event = decode(message.value(), AbnormalEvent)
    except UndecodableError:
        return None
    return {"device_id": event.device_id, "fault_code": event.fault_code}
