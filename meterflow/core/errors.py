"""Errors a user acts on: each carries a one-line message with the remedy and an exit code."""

from __future__ import annotations


class MeterflowError(RuntimeError):
    """Base of meterflow's user-facing errors; ``str(error)`` is the whole message."""

    exit_code = 2


class DataLossError(MeterflowError):
    """Offsets are gone from Kafka: the message names them and how to continue."""

    exit_code = 3


class StreamUnavailableError(MeterflowError):
    """Kafka (or the lake's storage) stayed unavailable through every retry."""

    exit_code = 4
