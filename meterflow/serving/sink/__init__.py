"""The MongoDB sink: ``decode`` (what storage needs beyond the wire schema), ``writer``
(idempotent MongoDB writes) and ``consumer`` (the Kafka consumer loop that commits only what
MongoDB acknowledged)."""

from meterflow.core.messages import UndecodableError
from meterflow.serving.sink.consumer import Sink, SinkStats, claim_instance_id
from meterflow.serving.sink.decode import decode_abnormal, decode_status, event_document
from meterflow.serving.sink.writer import (
    RETRYABLE_MONGO_ERRORS,
    ServingWriter,
    WriteResult,
    fold_status,
)

__all__ = [
    "RETRYABLE_MONGO_ERRORS",
    "ServingWriter",
    "Sink",
    "SinkStats",
    "UndecodableError",
    "WriteResult",
    "claim_instance_id",
    "decode_abnormal",
    "decode_status",
    "event_document",
    "fold_status",
]
