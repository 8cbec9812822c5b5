"""Filter of the Kafka message-queue trigger that wakes the incident DAG."""

from __future__ import annotations

import json
from typing import Any


def abnormal_event(message: Any) -> dict[str, str] | None:
    """The (device, fault) of an ``iot-abnormal`` message, or None to keep waiting.

    The provider's trigger calls this for each message (by dotted path) and fires the
    asset event with what it returns; an undecodable message never fires it (the sink
    dead-letters those).
    """
    try:
        event = json.loads(message.value())
        return {"device_id": str(event["device_id"]), "fault_code": str(event["fault_code"])}
    except (ValueError, KeyError, TypeError):
        return None
