"""Where the simulator and the replay send messages: the protocol a Kafka producer fills."""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    """A keyed message sink: ``clients.kafka.ProducerSink`` in the CLI, memory in tests."""

    def emit(self, key: bytes, value: bytes) -> None:
        """Queue one message; may block while the sink's buffer is full, must not drop it."""
        ...

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for delivery; return how many messages are not delivered."""
        ...
