"""Errors a user acts on: each carries a one-line message with the remedy and an exit code.

The others of the hierarchy live next to what raises them: ``KafkaUnavailableError``
(clients.kafka, a :class:`TransientError`), ``BrokerError`` (local.broker),
``MongoUnavailableError`` (clients.mongo), ``ViewMissingError`` (serving.loader),
``MetabaseError`` (dashboards.metabase), ``CheckFailed`` (serving.checks, exit code 1).
What to do about a failure is decided by its class, never by its wording: the stream's
supervisor retries a :class:`TransientError` and stops on any other.
"""

from __future__ import annotations


class MeterflowError(RuntimeError):
    """Base of meterflow's user-facing errors; ``str(error)`` is the whole message and
    ``exit_code`` what the command or job exits with, so no caller keeps a table of them."""

    exit_code = 2


class ConfigError(MeterflowError, ValueError):
    """A configuration value is missing or malformed: the line names the variable."""


class TransientError(MeterflowError):
    """A service is away (Kafka, say): neither a bug nor a decision, so the same work may
    succeed after a wait. Callers that can wait retry it with a backoff."""


class DataLossError(MeterflowError):
    """Offsets are gone from Kafka: the message names them and how to continue."""

    exit_code = 3


class StreamUnavailableError(MeterflowError):
    """Kafka (or the lake's storage) stayed unavailable through every retry."""

    exit_code = 4


class DiskFullError(MeterflowError):
    """The disk under a path the stream writes (``LAKE_PATH``, say) is full."""

    @classmethod
    def of(cls, variable: str, path: str, reason: str) -> DiskFullError:
        """The one line: which variable, which path, why, and what to do."""
        return cls(
            f"{variable}={path} is full ({reason}): free space or point {variable} elsewhere; "
            "the next start resumes where the lake's ledger ends"
        )
