"""Time in the contract: epoch microseconds inside, ISO-8601 (UTC, ``Z``) on the wire."""

from __future__ import annotations

from datetime import UTC, date, datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECONDS_PER_DAY = 86_400
US_PER_DAY = SECONDS_PER_DAY * 1_000_000


def as_date(day: date | str) -> date:
    """A day given as a date or as ``YYYY-MM-DD`` (from the CLI, Airflow's ``ds``)."""
    return date.fromisoformat(day) if isinstance(day, str) else day


def parse_timestamp_us(value: str) -> int:
    """ISO-8601 to epoch microseconds; a timestamp without a zone is UTC. Raises ValueError."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * SECONDS_PER_DAY + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp_us(micros: int) -> str:
    """Epoch microseconds to the contract's ISO-8601 form (UTC, ``Z`` suffix)."""
    seconds, rest = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{rest:06d}Z" if rest else f"{text}Z"
